"""``model.backend: compile``: the denoise step under ``torch.compile`` (inductor).

The same :class:`~engine.accel.graph.StepModule` as the exported graphs (cross-frame attention
from an input index, LoRA as runtime inputs), compiled once per variant. ``dynamic=True`` (the
default) compiles shape-generic kernels, so a new batch size or reference count does not
recompile; ``dynamic=False`` specialises on the first shape (and recompiles per new shape), the
setting benchmarks/accel.py ``--compile-static`` measures.
"""

from __future__ import annotations

import torch

from engine.accel.graph import StepModule
from engine.accel.step import GraphStep, Runner, VariantKey
from engine.attention import CrossFrameContext
from engine.models.registry import DiffusionComponents


class CompileStep(GraphStep):
    """The denoise step compiled by ``torch.compile(dynamic=...)`` (``mode`` default: no CUDA
    graphs, ``reduce-overhead`` off)."""

    name = "compile"

    def __init__(
        self, parts: DiffusionComponents, context: CrossFrameContext, *, dynamic: bool = True
    ):
        super().__init__(parts, context)
        self.dynamic = dynamic

    def _build(self, module: StepModule, key: VariantKey) -> Runner:
        compiled = torch.compile(module, dynamic=self.dynamic)

        def run(tensors: list[torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                return compiled(*tensors)

        return run
