"""benchmarks/accel.py at micro sizes: the LoRA-case rows and the DeepCache rows, checked through
their records (the numbers themselves are the benchmark's to report, not a test's)."""

from __future__ import annotations

import math

import pytest

from benchmarks import accel


def test_lora_cases_micro():
    rows = accel.bench_steps("tiny", 4, ["eager"], repeats=1)
    assert [r["lora"] for r in rows] == [
        "no LoRA loaded",
        "LoRA loaded, no row uses it",
        accel.MIXED,
        accel.MIXED + " (peft per-row)",
    ]
    assert rows[0]["vs_same_backend_no_lora"] == 1.0
    for r in rows:
        assert r["ms_per_step"] > 0
        assert r["vs_same_backend_no_lora"] == pytest.approx(
            r["ms_per_step"] / rows[0]["ms_per_step"]
        )


def test_deep_cache_micro():
    rows = accel.bench_deep_cache("tiny", characters=2, steps=3, intervals=[0, 2], repeats=1)
    off, deep = rows
    assert (off["interval"], deep["interval"]) == (0, 2)
    assert off["mean_abs_vs_off"] == 0 and math.isinf(off["psnr_vs_off_db"])
    assert off["pose_effect_cosine"] == pytest.approx(1.0) and off["speedup"] == 1.0
    assert deep["mean_abs_vs_off"] > 0, "one of three steps ran the shallow branch"
    assert 0 < deep["pose_effect_cosine"] <= 1.0 + 1e-9 and deep["s_per_batch"] > 0
