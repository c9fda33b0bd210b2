"""benchmarks/gpu.py on this CPU: the whole ``--smoke`` command path (tiny preset, 64², 1 step)
with the packages the GPU image lacks made unimportable, the budget's skips, and a failing item
failing the run. The numbers are the benchmark's to report; here only that every section is
there, measured or skipped with a reason, is checked."""

from __future__ import annotations

import itertools
import json
import sys
import time

import pytest

from benchmarks import gpu
from benchmarks.gpu_cases import MODES, SMOKE
from benchmarks.gpu_report import SECTIONS

ABSENT_ON_THE_GPU_IMAGE = (
    "av",
    "imageio_ffmpeg",
    "ray",
    "xformers",
    "tensorrt",
    "segment_anything",
)


def test_smoke_measures_every_section_without_the_missing_packages(tmp_path, monkeypatch):
    for name in ABSENT_ON_THE_GPU_IMAGE:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    assert gpu.main(["--smoke", "--out", str(tmp_path), "--budget-s", "900"]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report["sections"]) == set(SECTIONS)
    assert report["status"] == {name: "measured" for name in SECTIONS}, report["sections"]
    s = report["sections"]
    main_dtype, other_dtype = SMOKE.dtypes
    engine_rows = [r for r in s["batches"]["rows"] if "mode" in r]
    assert {(r["mode"], r["batch"]) for r in engine_rows} == set(
        itertools.product(MODES, SMOKE.batches)
    )
    for r in engine_rows:
        assert r["dtype"] == main_dtype and r["s_per_frame"] > 0
        assert r["decode_s"] > 0 and 0 < r["decode_share"] < 1
        assert r["s_per_frame"] == pytest.approx(
            (r["denoise_s"] + r["decode_s"]) / r["batch"], abs=1e-3
        )
        assert r["finite_latents"] == f"{r['batch']}/{r['batch']}"
        assert r["peak_gpu_gib"] is None and r["weights_gib"] > 0  # a CPU: no GPU memory
    assert {r["batch"] for r in s["diffusers_peer"]["rows"]} == set(SMOKE.batches)
    assert {r["dtype"] for r in s["other_dtype"]["rows"] if "mode" in r} == {other_dtype}
    lora = s["lora"]["rows"][0]
    assert lora["mixed_3_adapters_and_base"]["s_per_frame"] > 0
    core = s["core_utilisation"]["rows"][0]
    assert core["frames"] == SMOKE.core_characters * SMOKE.core_frames
    assert 0 < core["sampler_busy_share"] <= 1
    assert core["video"].startswith("skipped: PyAV is not installed")
    assert s["deep_cache"]["rows"][0]["deep_cache"] == SMOKE.deep_cache
    assert s["compile"]["rows"][0]["warmup_s"] > 0
    assert len(s["vae_share"]["rows"]) == len(engine_rows)
    main_rows = [c for c in report["comparisons"] if c["section"] == "batches"]
    assert main_rows and all(c["vs_peer"] is not None for c in main_rows)
    md = (tmp_path / "gpu.md").read_text()
    assert "| section | dtype | inter_frame |" in md and "- skipped:" not in md


def test_a_budget_too_small_skips_every_section_with_its_reason(tmp_path):
    assert gpu.main(["--smoke", "--out", str(tmp_path), "--budget-s", "1e-9"]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["status"] == {name: "skipped" for name in SECTIONS}
    for name, section in report["sections"].items():
        assert section["skipped"] and all(s["reason"] for s in section["skipped"]), name
    assert "skipped: batches build float32: needs" in (tmp_path / "gpu.md").read_text()


def test_a_failing_item_is_recorded_and_fails_the_run(tmp_path):
    run = gpu.Run(SMOKE, tmp_path, budget_s=60)

    def broken() -> dict:
        raise RuntimeError("CUDA error: an illegal memory access")

    assert run.do("lora", "float32 b=2", 0.0, broken) is None
    run.do("compile", "float32 b=2", 1e9, broken)  # over the budget: skipped, never called
    run.close()
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["status"]["lora"] == "error" and report["status"]["compile"] == "skipped"
    assert "illegal memory access" in report["sections"]["lora"]["errors"][0]["error"]
    assert "FAILED: lora float32 b=2" in (tmp_path / "gpu.md").read_text()


def test_an_item_running_past_budget_and_grace_is_recorded_and_ends_the_run(tmp_path):
    ended: list[int] = []
    run = gpu.Run(SMOKE, tmp_path, budget_s=0.5, grace_s=0.3, on_overrun=ended.append)

    def slow() -> dict:
        time.sleep(2.0)  # the watchdog fires at 0.8 s
        return {}

    run.do("compile", "float32 b=2", 0.0, slow)
    run.close()
    assert ended == [3]
    report = json.loads((tmp_path / "gpu.json").read_text())
    (stopped,) = report["sections"]["compile"]["skipped"]
    assert stopped["item"] == "float32 b=2" and stopped["reason"].startswith("stopped: still")
    assert report["sections"]["compile"]["rows"] == []  # nothing written after the stop


def test_the_full_run_needs_a_gpu_and_a_positive_budget(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        gpu.main(["--out", str(tmp_path)])
    assert "no CUDA device here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.main(["--smoke", "--out", str(tmp_path), "--budget-s", "0"])
    assert "--budget-s must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.main(["--smoke", "--out", str(tmp_path), "--grace-s", "-1"])
    assert "--grace-s >= 0" in capsys.readouterr().err


def test_only_measures_the_named_sections(tmp_path):
    """``--only lora``: the model build and the calibrating batch row run (the estimates' unit),
    LoRA is measured, every other item is recorded as skipped, saying why."""
    assert gpu.main(["--smoke", "--out", str(tmp_path), "--budget-s", "900", "--only", "lora"]) == 0
    s = json.loads((tmp_path / "gpu.json").read_text())["sections"]
    assert s["lora"]["rows"] and not s["lora"]["skipped"]
    assert len([r for r in s["batches"]["rows"] if "mode" in r]) == 1  # the calibrating row
    for name in ("diffusers_peer", "other_dtype", "core_utilisation", "deep_cache", "compile"):
        assert not s[name]["rows"], name
        assert all("not selected (--only lora)" in k["reason"] for k in s[name]["skipped"]), name
    with pytest.raises(SystemExit):
        gpu.main(["--smoke", "--out", str(tmp_path), "--only", "lora,warp"])
