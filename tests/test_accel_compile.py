"""``model.backend: compile``: the torch.compile (inductor) step equals the eager step.

Compiling the tiny ControlNet + UNet takes minutes on the 2-core build machine (measured in
benchmarks/accel.py ``--compile-static``), so the test is marked slow and runs only with
``AVATAR_SLOW_TESTS=1``.
"""

from __future__ import annotations

import os

import pytest
import torch
from accel_helpers import random_step_inputs

from engine.accel import EagerStep, StepInputs
from engine.accel.compile_step import CompileStep

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("AVATAR_SLOW_TESTS"),
        reason="torch.compile of the tiny step takes minutes on 2 cores; AVATAR_SLOW_TESTS=1",
    ),
]

TOL = 1e-4
"""Max abs error of the compiled step vs eager (fp32, CPU: inductor fuses and reorders sums)."""


def batch(rows: int, seed: int) -> StepInputs:
    return random_step_inputs(rows, seed)


@torch.no_grad()
def test_compiled_step_equals_eager(tiny_chain):
    eager = EagerStep(tiny_chain.parts, tiny_chain.context)
    compiled = CompileStep(tiny_chain.parts, tiny_chain.context, dynamic=False)
    for seed in (1, 2):  # one shape, two inputs: the second call runs the cached kernels
        inputs = batch(4, seed)
        want = eager(inputs)
        err = (compiled(inputs) - want).abs().max().item()
        assert err < TOL, f"seed {seed}: max abs error {err:.2e} vs eager"
        assert want.abs().mean() > 0.1  # the outputs are not trivially small
