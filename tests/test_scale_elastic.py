"""The elastic-pools benchmark's simulation (benchmarks/scale_elastic.py) on a small cluster,
checked through its JSON: every frame is made, no run beats the work's lower bound, and elastic
pools finish a full-method queue several times sooner than the static counts."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.scale_elastic import main


def test_small_cluster_elastic_beats_static(tmp_path: Path):
    out = tmp_path / "scale_elastic.json"
    argv = ["--gpus", "8", "--renders", "40", "--frames", "4", "--actor-start-s", "10",
            "--core-gpus", "8", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    runs = {r["config"]: r for r in report["runs"]}
    assert set(runs) == {"elastic", "elastic-shared", "static-hand", "static-default"}
    for r in runs.values():
        assert r["frames"] == 40 * 4  # every frame made
        assert r["makespan_s"] >= r["lower_bound_s"]  # work ÷ GPUs: nothing beats it
        assert 0 < r["efficiency"] <= 1
        idle = r["gpus"] * r["makespan_s"] * (1 - r["efficiency"])
        assert abs(r["gpu_s_idle"] - idle) <= 0.01 * r["gpus"] * r["makespan_s"] + 1
    # one trainer behind 7 Samplers: preparation is the limit (40 LoRAs x 60 s in a row)
    assert runs["static-hand"]["makespan_s"] >= 40 * 60
    assert runs["elastic"]["makespan_s"] * 3 < runs["static-hand"]["makespan_s"]
    # sd15 as shipped (one DeviceWorker per GPU does all three stages): elastic as well
    assert runs["elastic-shared"]["makespan_s"] * 3 < runs["static-hand"]["makespan_s"]
    ratio = report["elastic_over_static"]["static-hand"]["efficiency"]
    assert ratio == round(runs["elastic"]["efficiency"] / runs["static-hand"]["efficiency"], 2)
    (core,) = report["scheduler_only"]
    assert core["gpus"] == 8 and core["frames"] == 8 * 8 * 8  # GPUs x B renders x 8 frames
    assert core["core_cpu_ms_per_frame"] > 0
