"""``model.backend: compile``: the denoise step under ``torch.compile`` (inductor).

The same :class:`~engine.accel.graph.StepModule` as the exported graphs (cross-frame attention
from an input index, LoRA as runtime inputs), compiled once per variant with dynamic shapes, so
a new batch size or reference count does not recompile.
"""

from __future__ import annotations

import torch

from engine.accel.graph import StepModule
from engine.accel.step import GraphStep, Runner, VariantKey


class CompileStep(GraphStep):
    """The denoise step compiled by ``torch.compile(dynamic=True)``."""

    name = "compile"

    def _build(self, module: StepModule, key: VariantKey) -> Runner:
        compiled = torch.compile(module, dynamic=True)

        def run(tensors: list[torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                return compiled(*tensors)

        return run
