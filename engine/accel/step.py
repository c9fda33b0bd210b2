"""The denoise step interface: one ControlNet + UNet noise prediction over a batch of rows.

:class:`EagerStep` is the PyTorch step (per-row LoRA through peft's ``adapter_names``);
:class:`GraphStep` is the base of the compiled ones (``compile``, ``onnx``, ``tensorrt``): it
picks a graph variant per batch (plain or ``kv`` with its ``include_self``, with or without LoRA
inputs), builds each variant once, and feeds it :class:`StepInputs` as tensors, with the LoRA of
the batch's rows packed as runtime inputs (:mod:`engine.accel.graph`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.accel.graph import (
    LoraLayout,
    StepModule,
    adapter_rank,
    controlnet_unet,
    lora_layout,
    pack_adapters,
)
from engine.appearance.lora import lora_generation, per_row_adapters
from engine.attention import CrossFrameContext
from engine.models.registry import DiffusionComponents


@dataclass
class StepInputs:
    """One denoising step of a batch of B rows (every character's uncond/cond rows, reference
    rows, padding), on the components' device and dtype."""

    sample: torch.Tensor
    """(B, 4, h, w) scaled model input."""
    timestep: torch.Tensor
    """(B,) int64 timesteps."""
    text: torch.Tensor
    """(B, 77, D) text embeddings."""
    pose: torch.Tensor
    """(B, 3, H, W) pose maps in [0, 1]."""
    control_scale: torch.Tensor
    """(B, 1, 1, 1) ControlNet residual weight per row."""
    ref_index: torch.Tensor | None
    """(B, R) int64 reference rows of each row (``kv``), or None."""
    include_self: bool
    """``kv``: rows attend to their own tokens besides the references'."""
    adapters: Sequence[str | None]
    """Appearance LoRA per row (None = base model), names loaded on the UNet."""


class DenoiseStep(Protocol):
    """Anything that maps :class:`StepInputs` to (B, 4, h, w) noise predictions."""

    name: str

    def __call__(self, inputs: StepInputs) -> torch.Tensor: ...


class EagerStep:
    """The PyTorch step: diffusers ControlNet + UNet, per-row LoRA through peft."""

    name = "eager"

    def __init__(self, parts: DiffusionComponents, context: CrossFrameContext):
        self.parts, self.context = parts, context

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        ctx = self.context
        ctx.ref_index = inputs.ref_index
        ctx.include_self = inputs.include_self
        try:
            with per_row_adapters(self.parts.unet, inputs.adapters):
                return controlnet_unet(
                    self.parts.unet,
                    self.parts.controlnet,
                    inputs.sample,
                    inputs.timestep,
                    inputs.text,
                    inputs.pose,
                    inputs.control_scale,
                )
        finally:
            ctx.ref_index = None


VariantKey = tuple[bool, bool, int, tuple[int, ...]]
"""(kv, include_self, LoRA rank (0 = no LoRA inputs), sample shape (h, w)) of a graph."""
Runner = Callable[[list[torch.Tensor]], torch.Tensor]


class GraphStep:
    """Base of the compiled steps: variant choice, LoRA packing, one runner per variant.

    Subclasses implement :meth:`_build` (a :class:`StepModule` → a runner taking its inputs in
    ``StepModule.input_names()`` order). A batch where no row has an adapter runs the variant
    without LoRA inputs (no LoRA cost at all); otherwise the variant whose rank is the largest
    of the UNet's loaded adapters.
    """

    name = "graph"

    def __init__(self, parts: DiffusionComponents, context: CrossFrameContext):
        self.parts, self.context = parts, context
        self._runners: dict[VariantKey, Runner] = {}
        self._packs: dict[tuple, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        wanted = sorted({n for n in inputs.adapters if n is not None})
        rank = adapter_rank(self.parts.unet, wanted) if wanted else 0
        kv = inputs.ref_index is not None
        key: VariantKey = (kv, inputs.include_self or not kv, rank, tuple(inputs.sample.shape[2:]))
        runner = self._runners.get(key)
        if runner is None:
            layout = lora_layout(self.parts.unet, rank) if rank else None
            module = StepModule(
                self.parts.unet,
                self.parts.controlnet,
                self.context,
                kv=kv,
                include_self=key[1],
                layout=layout,
            )
            runner = self._runners[key] = self._build(module, key)
        tensors = [inputs.sample, inputs.timestep, inputs.text, inputs.pose, inputs.control_scale]
        tensors += [inputs.ref_index] if inputs.ref_index is not None else []
        if rank:
            tensors += self._lora_inputs(inputs.adapters, wanted, rank)
        with per_row_adapters(self.parts.unet, [None]):  # peft layers (if any) run the base
            return runner(tensors)

    def _lora_inputs(
        self, names: Sequence[str | None], wanted: list[str], rank: int
    ) -> list[torch.Tensor]:
        """``lora_a``, ``lora_b`` of ``wanted`` (cached until adapters are added or removed) and
        the per-row ``lora_index``."""
        unet = self.parts.unet
        cache_key = (tuple(wanted), rank, lora_generation(unet))
        if cache_key not in self._packs:
            layout: LoraLayout = lora_layout(unet, rank)
            lora_a, lora_b, _ = pack_adapters(unet, wanted, layout)
            self._packs = {cache_key: (lora_a, lora_b, wanted)}  # keep only the current set
        lora_a, lora_b, order = self._packs[cache_key]
        index = [0 if n is None else 1 + order.index(n) for n in names]
        return [lora_a, lora_b, torch.tensor(index, device=lora_a.device)]

    def _build(self, module: StepModule, key: VariantKey) -> Runner:
        raise NotImplementedError
