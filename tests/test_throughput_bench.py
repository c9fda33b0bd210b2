"""The throughput benchmark end to end at a micro size (2 characters × 2 frames × 2 steps).

Runs every variant — plain diffusers, the engine in-process (with and without output writes),
the bare batched loop, the engine on a local Ray instance and the full method on Ray — and checks
the JSON: timings, batch sizes, ratios, targets and the like-for-like frame checks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
pytest.importorskip("ray")

from benchmarks.throughput import (
    RATIOS,
    Case,
    compute_ratios,
    main,
    parse_cases,
    targets_for,
)

RUNS = ("plain", "engine", "engine_io", "bare", "ray", "ray_full")


def test_parse_cases_and_targets():
    assert parse_cases("tiny,small:4x4x10", 8, 8, 20) == [
        Case("tiny", 8, 8, 20),
        Case("small", 4, 4, 10),
    ]
    assert parse_cases("small:3x5", 8, 8, 20) == [Case("small", 3, 5, 20)]
    assert [t.ratio for t in targets_for("tiny")] == [
        "ray_over_plain",
        "engine_over_ray",
        "engine_over_bare",
    ]
    assert [t.ratio for t in targets_for("sd15")] == ["engine_over_ray", "engine_over_bare"]
    ratios = compute_ratios({"ray": {"frames_per_s": 3.0}, "plain": {"frames_per_s": 2.0}})
    assert ratios["ray_over_plain"] == 1.5
    assert ratios["engine_over_ray"] is None  # a missing run gives no ratio


def test_throughput_benchmark_micro(tmp_path: Path):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "throughput.json"
    argv = ["--presets", "tiny:2x2x2", "--out", str(out), "--timeout", "120", "--repeat", "2"]
    argv += ["--lora-steps", "1", "--references", "1", "--inpaint-steps", "1"]
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # restored

    report = json.loads(out.read_text())
    assert {"platform", "cpu_count", "torch", "torch_threads"} <= report["machine"].keys()
    assert out.with_suffix(".md").read_text().startswith("### tiny: 2 characters × 2 frames")
    result = report["presets"]["tiny"]
    assert (result["characters"], result["frames"], result["steps"]) == (2, 2, 2)
    assert result["size"] == [64, 64] and result["max_batch"] == 2
    runs = result["runs"]
    assert set(runs) == set(RUNS)
    for name in RUNS:
        assert runs[name]["frames"] == 4, name
        assert runs[name]["seconds"] > 0 and runs[name]["frames_per_s"] > 0, name
        if name != "ray_full":  # best of two runs
            assert runs[name]["seconds"] == min(runs[name]["samples_s"]), name
            assert len(runs[name]["samples_s"]) == 2, name
    # Both in-process loops and the replay ran the same two full batches.
    assert runs["engine"]["batch_sizes"] == runs["bare"]["batch_sizes"] == [2, 2]
    assert sum(runs["ray"]["batch_sizes"]) == 4
    assert runs["ray"]["actor_start_s"] > 0 and runs["ray"]["sampler_threads"] == 1
    assert runs["ray"]["profile"]["sampler_busy_s"] > 0
    # Every ratio is computed, and is the quotient of the runs' frames/s.
    for name, (top, bottom, _) in RATIOS.items():
        expected = runs[top]["frames_per_s"] / runs[bottom]["frames_per_s"]
        assert result["ratios"][name] == pytest.approx(expected, rel=1e-3), name
    assert [t["ratio"] for t in result["targets"]] == [t.ratio for t in targets_for("tiny")]
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    # Like for like: the same frames, from diffusers' own loop and from Ray (bit-identical).
    assert result["checks"]["plain_vs_engine"]["max_abs"] <= 2
    assert result["checks"]["ray_vs_engine"]["max_abs"] == 0
