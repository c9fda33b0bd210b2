"""The benchmarks end to end at micro sizes (tiny preset, 2 characters × 2 frames × 2 steps):
throughput (in-process variants), latency and memory, each checked through its JSON.

The Ray variants of the throughput benchmark ((c), (d)) run the same ``run_core`` on
``actors.executor.RayExecutor``; a local Ray instance costs tens of seconds to start, so they are
exercised by the benchmark runs themselves, and the executor by tests/test_cluster*.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from benchmarks import latency, memory
from benchmarks.throughput import (
    RATIOS,
    Case,
    check_targets,
    compute_ratios,
    main,
    paired_ratios,
    parse_cases,
)
from benchmarks.throughput_runs import option_overrides

IN_PROCESS = ("plain", "plain_batched", "engine", "bare")


def test_parse_cases_and_ratios():
    assert parse_cases("tiny,small:4x4x10", 8, 8, 20) == [
        Case("tiny", 8, 8, 20),
        Case("small", 4, 4, 10),
    ]
    assert parse_cases("small:3x5", 8, 8, 20) == [Case("small", 3, 5, 20)]
    ratios = compute_ratios({"ray": {"frames_per_s": 3.0}, "plain_batched": {"frames_per_s": 2.0}})
    assert ratios["ray_over_plain_batched"] == 1.5
    assert ratios["engine_over_ray"] is None  # a missing run gives no ratio
    # Paired by round: (b) took 5, 6, 4 s where bare took 5, 5, 4 s → ratios 1, 5/6, 1.
    runs = {
        "engine": {"frames": 8, "samples_s": [5.0, 6.0, 4.0]},
        "bare": {"frames": 8, "samples_s": [5.0, 5.0, 4.0]},
    }
    paired = paired_ratios(runs)
    assert paired["engine_over_bare"] == 1.0 and paired["engine_over_ray"] is None
    met = {t["ratio"]: t["met"] for t in check_targets({"engine_over_bare": 0.8}, paired)}
    assert met["engine_over_bare"] is True  # judged on the paired median, not the ratio of bests


def test_options_name_their_overrides():
    assert option_overrides("onnx") == (["model.backend=onnx"], ["model.backend=onnx"])
    assert option_overrides("dpmpp_2m:14") == (
        [],
        ["sampler.scheduler=dpmpp_2m", "sampler.steps=14"],
    )
    assert option_overrides("deep_cache:3") == ([], ["sampler.deep_cache=3"])
    for bad in ("tensorrt", "dpmpp_2m", "deep_cache:x"):
        with pytest.raises(ValueError, match="use one of onnx, compile"):
            option_overrides(bad)


def test_throughput_benchmark_micro(tmp_path: Path):
    threads = torch.get_num_threads()
    out = tmp_path / "throughput.json"
    argv = ["--presets", "tiny:2x2x2", "--out", str(out), "--repeat", "2", "--skip-ray"]
    argv += ["--options", "deep_cache:2"]
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # restored

    report = json.loads(out.read_text())
    assert {"platform", "cpu_count", "torch", "torch_threads"} <= report["machine"].keys()
    assert out.with_suffix(".md").read_text().startswith("### tiny: 2 characters × 2 frames")
    result = report["presets"]["tiny"]
    assert (result["characters"], result["frames"], result["steps"]) == (2, 2, 2)
    assert result["size"] == [64, 64] and result["max_batch"] == 2
    runs = result["runs"]
    assert set(runs) == {*IN_PROCESS, "engine[deep_cache:2]"}
    option = runs.pop("engine[deep_cache:2]")  # (b) again with DeepCache on
    assert option["frames"] == 4 and len(option["samples_s"]) == 2
    assert result["ratios"]["engine[deep_cache:2]_over_engine"] == pytest.approx(
        option["frames_per_s"] / runs["engine"]["frames_per_s"], rel=1e-3
    )
    assert 0 < result["checks"]["engine[deep_cache:2]_vs_engine"]["mean_abs"] < 2
    for name in IN_PROCESS:
        assert runs[name]["frames"] == 4, name
        assert runs[name]["seconds"] == min(runs[name]["samples_s"]), name  # best of two
        assert len(runs[name]["samples_s"]) == 2, name
    assert runs["plain"]["batch"] == 1 and runs["plain_batched"]["batch"] == 2
    # The core batched frame t of both characters together, and the bare replay computed the
    # very same forward passes (rows per UNet call, padding included).
    assert runs["engine"]["batch_sizes"] == runs["bare"]["batch_sizes"] == [2, 2]
    assert runs["engine"]["unet_rows"] == runs["bare"]["unet_rows"] == [4] * 4
    assert 0 < runs["engine"]["sampler_busy_s"] <= runs["engine"]["seconds"]
    for name, (top, bottom, _) in RATIOS.items():
        if top in runs and bottom in runs:
            expected = runs[top]["frames_per_s"] / runs[bottom]["frames_per_s"]
            assert result["ratios"][name] == pytest.approx(expected, rel=1e-3), name
        else:
            assert result["ratios"][name] is None, name
    # Like for like: the same frames from diffusers (batch 1 and batched), the core and bare.
    checks = result["checks"]
    assert checks["bare_vs_engine"]["max_abs"] == 0  # same forward shapes: bit-identical
    assert checks["plain_vs_engine"]["max_abs"] <= 2
    assert checks["plain_batched_vs_engine"]["max_abs"] <= 2


def test_latency_benchmark_micro(tmp_path: Path):
    out = tmp_path / "latency.json"
    argv = ["--frames", "2", "--steps", "2", "--lora-steps", "1", "--references", "1"]
    argv += ["--inpaint-steps", "1", "--mask-source", "pose", "--out", str(out)]
    assert latency.main(argv) == 0
    report = json.loads(out.read_text())
    stages = report["stages_s"]
    assert list(stages) == list(latency.STAGES)
    for name in ("references", "lora_training", "plate", "chain", "encode"):
        assert stages[name] > 0, name
    # Every stage happened inside the timed render, and the stages do not overlap.
    assert sum(stages.values()) <= report["wall_s"]
    assert report["per_frame_s"] == pytest.approx(stages["chain"] / 2, abs=1e-3)
    assert len(report["frame_gaps_s"]) == 1  # two frame events
    assert report["settings"]["config"]["appearance"]["steps"] == 1


def test_memory_benchmark_micro(tmp_path: Path):
    args = argparse.Namespace(preset="tiny", steps=1, threads=1, character_frames=2, timeout=300.0)
    chars = memory.child("characters", 2, args, tmp_path / "chars")
    assert chars["frames"] == 4 and chars["max_open_sessions"] == 2
    sessions = chars["sessions_bytes"]
    # Two characters of one size: the Sampler holds the same bytes for each (embeddings, plate
    # and its latent, cached maps), and each has its own LoRA on the UNet.
    assert len(sessions) == 2 and len(set(sessions.values())) == 1
    assert min(sessions.values()) > 64 * 64 * 3  # at least the plate
    assert len(chars["adapter_bytes"]) == 2 and min(chars["adapter_bytes"].values()) > 0
    short = memory.run_child("frames", 2, args, tmp_path)  # a fresh process: its own peak
    assert short["frames"] == 2 and short["peak_rss_mb"] >= short["rss_after_build_mb"] > 0
    summary = memory.summarize([short, {**short, "count": 3}], [chars])
    assert summary["peak_ratio"] == 1.0 and summary["peak_ratio_met"]
    assert summary["sampler_bytes_per_character"] == next(iter(sessions.values()))
