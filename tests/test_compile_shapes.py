"""``model.backend: compile`` with ``dynamic=True`` traces the step once for every batch size.

Traced with a counting torch.compile back-end that runs the captured graph as is (no inductor:
seconds, not minutes); which graphs dynamo captures, and when it recompiles, does not depend on
the back-end. Inductor's numerics are checked in tests/test_accel_compile.py (slow)."""

from __future__ import annotations

import torch
from accel_helpers import random_step_inputs

from engine.accel import EagerStep
from engine.accel.compile_step import CompileStep


@torch.no_grad()
def test_dynamic_compile_traces_once_for_every_batch_size(tiny_chain):
    graphs: list[torch.fx.GraphModule] = []

    def counting(gm: torch.fx.GraphModule, _example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = CompileStep(tiny_chain.parts, tiny_chain.context, backend=counting)
    eager = EagerStep(tiny_chain.parts, tiny_chain.context)
    # 8 rows of an 8x8 latent first: duck sizing would tie the batch to the latent size, and
    # the next batch size would recompile.
    for rows in (8, 4, 6):
        inputs = random_step_inputs(rows, rows)
        assert torch.allclose(compiled(inputs), eager(inputs), atol=1e-5), rows
        assert len(graphs) == 1, f"{rows} rows: traced {len(graphs)} graphs, not 1"
