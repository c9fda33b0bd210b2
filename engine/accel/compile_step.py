"""``model.backend: compile``: the denoise step under ``torch.compile`` (inductor).

The same :class:`~engine.accel.graph.StepModule` as the exported graphs (cross-frame attention
from an input index, LoRA as runtime inputs), compiled once per variant. ``dynamic=True`` (the
default) compiles shape-generic kernels, so a new batch size or reference count does not
recompile (tests/test_compile_shapes.py); ``dynamic=False`` specialises on the first shape (and
recompiles per new shape), the setting benchmarks/accel.py ``--compile-static`` measures.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx.experimental._config as fx_config

from engine.accel.graph import StepModule
from engine.accel.step import GraphStep, Runner, VariantKey
from engine.attention import CrossFrameContext
from engine.models.registry import DiffusionComponents


class CompileStep(GraphStep):
    """The denoise step compiled by ``torch.compile(dynamic=...)`` (``mode`` default: no CUDA
    graphs, ``reduce-overhead`` off); ``backend`` is torch.compile's (tests trace with a cheap
    one)."""

    name = "compile"

    def __init__(
        self,
        parts: DiffusionComponents,
        context: CrossFrameContext,
        *,
        dynamic: bool = True,
        backend: str | Callable = "inductor",
    ):
        super().__init__(parts, context)
        self.dynamic, self.backend = dynamic, backend

    def _build(self, module: StepModule, key: VariantKey) -> Runner:
        compiled = torch.compile(module, dynamic=self.dynamic, backend=self.backend)
        # Duck sizing would tie sizes that happen to be equal when first traced (8 rows of an 8×8
        # latent): the next batch size then breaks that guard and recompiles (≈200 s on tiny).
        shapes = fx_config.patch(use_duck_shape=not self.dynamic)  # type: ignore[attr-defined]

        def run(tensors: list[torch.Tensor]) -> torch.Tensor:
            with torch.no_grad(), shapes:
                return compiled(*tensors)

        return run
