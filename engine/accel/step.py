"""The denoise step interface: one ControlNet + UNet noise prediction over a batch of rows.

:class:`EagerStep` is the PyTorch step (per-row LoRA as one batched low-rank update per adapted
projection, :class:`EagerLora`, the math the compiled graphs trace);
:class:`GraphStep` is the base of the compiled ones (``compile``, ``onnx``, ``tensorrt``): it
picks a graph variant per batch (plain or ``kv`` with its ``include_self``, with or without LoRA
inputs), builds each variant once, and feeds it :class:`StepInputs` as tensors, with the LoRA of
the batch's rows packed as runtime inputs (:mod:`engine.accel.graph`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.accel.graph import (
    LoraLayout,
    StepModule,
    adapter_rank,
    add_low_rank,
    controlnet_unet,
    lora_layout,
    pack_adapters,
    select_lora,
    slot_modules,
)
from engine.appearance.lora import lora_generation, lora_layers, per_row_adapters
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


class LoraPacks:
    """The runtime LoRA inputs of a batch, with the packed matrices cached.

    ``lora_a`` / ``lora_b`` of a set of adapters are packed once (:func:`pack_adapters`) and
    reused until that set, the rank or the UNet's adapters (:func:`lora_generation`) change; only
    the per-row ``lora_index`` is built per call.
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.key: tuple | None = None
        """(adapters, rank, adapter generation) of the cached pack."""
        self._pack: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None
        self._layouts: dict[int, LoraLayout] = {}
        self._generation = -1

    def layout(self, rank: int) -> LoraLayout:
        """The :func:`lora_layout` of the UNet at ``rank`` (cached per adapter generation)."""
        generation = lora_generation(self.unet)
        if generation != self._generation:
            self._layouts, self._generation = {}, generation
        if rank not in self._layouts:
            self._layouts[rank] = lora_layout(self.unet, rank)
        return self._layouts[rank]

    def inputs(
        self, names: Sequence[str | None], wanted: list[str], rank: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``lora_a`` (N, Ta), ``lora_b`` (N, Tb) of ``wanted`` and ``lora_index`` (B,) int64 of
        rows ``names`` (None = base)."""
        key = (tuple(wanted), rank, lora_generation(self.unet))
        if key != self.key or self._pack is None:
            lora_a, lora_b, _ = pack_adapters(self.unet, wanted, self.layout(rank))
            self.key, self._pack = key, (lora_a, lora_b, wanted)
        lora_a, lora_b, order = self._pack
        index = [0 if n is None else 1 + order.index(n) for n in names]
        return lora_a, lora_b, torch.tensor(index, device=lora_a.device)


class EagerLora:
    """Per-row LoRA in the eager step: each adapted projection computes ``base(x) + (x ·
    A[idx]ᵀ) · B[idx]ᵀ`` (:func:`add_low_rank`, the compiled graphs' math) while armed.

    Arming replaces the forward of each slot's peft layer by that one expression (an instance
    attribute, deleted by :meth:`disarm`: peft's layer is untouched); armed with no adapters it is
    the base ``F.linear`` alone (bitwise what peft's disabled layer computes). A forward hook
    would leave peft's own forward running too, and peft's dispatch per layer cost +4-5 % of a
    tiny step. The per-row matrices are gathered once per (adapter pack, row order) and reused by
    every step of the batch: rows x rank x (in + out) floats per projection, held until the next.
    """

    def __init__(self, unet: torch.nn.Module, layout: LoraLayout):
        self.layout = layout
        self.modules = slot_modules(unet, layout)
        self._key: tuple | None = None
        self._forwards: list[Callable[..., torch.Tensor]] = []

    def arm(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, key: tuple):
        """Apply packed ``inputs`` (:func:`pack_adapters`; None = base) from now on; ``key``
        names them (an equal key reuses the last gather and forwards)."""
        if inputs is None:
            key = ("base",)
        if key != self._key:
            if inputs is None:
                pairs: list = [None] * len(self.modules)
            else:
                spans = zip(self.layout.slots, self.layout.offsets(), strict=True)
                r = self.layout.rank
                pairs = [
                    tuple(m.contiguous() for m in select_lora(inputs, s, r, oa, ob))
                    for s, (oa, ob) in spans
                ]
            self._forwards = [
                _low_rank_forward(getattr(m, "base_layer", m), pair)
                for m, pair in zip(self.modules, pairs, strict=True)
            ]
            self._key = key
        for module, forward in zip(self.modules, self._forwards, strict=True):
            module.__dict__["forward"] = forward  # nn.Module.__setattr__ costs 5 µs a call

    def disarm(self) -> None:
        """Give each projection its own forward back."""
        for module in self.modules:
            module.__dict__.pop("forward", None)


def _low_rank_forward(base: torch.nn.Module, pair: tuple[torch.Tensor, torch.Tensor] | None):
    assert isinstance(base, torch.nn.Linear)  # lora_layout checked every slot
    weight, bias = base.weight, base.bias
    linear = torch.nn.functional.linear
    if pair is None:
        return lambda x, *_, **__: linear(x, weight, bias)
    at, bt = pair
    return lambda x, *_, **__: add_low_rank(x, linear(x, weight, bias), at, bt)


class EagerStep:
    """The PyTorch step: diffusers ControlNet + UNet; per-row LoRA as one batched low-rank update
    per adapted projection (:class:`EagerLora`, armed for the call). Equal to peft's per-row
    ``adapter_names`` path within fp rounding (tests/test_accel_lora.py: 1e-5), whose loop over
    adapters per layer cost +35-45 % per step on ``tiny``; this costs +7 % there (32 extra small
    matmul pairs) and +3-5 % on ``small`` (benchmarks/accel.py). A batch where no row has an
    adapter runs the base projections only (bitwise the base model)."""

    name = "eager"

    def __init__(self, parts: DiffusionComponents, context: CrossFrameContext):
        self.parts, self.context = parts, context
        self._packs = LoraPacks(parts.unet)
        self._loras: dict[int, EagerLora] = {}  # by rank (0: the base alone)

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        ctx = self.context
        ctx.ref_index = inputs.ref_index
        ctx.include_self = inputs.include_self
        lora = self._arm(inputs.adapters)
        try:
            with per_row_adapters(self.parts.unet, [None]):  # peft layers (if any) run the base
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
            if lora is not None:
                lora.disarm()

    def _arm(self, names: Sequence[str | None]) -> EagerLora | None:
        """The projections armed with the batch's adapters (or the base when no row has one);
        None when the UNet has no LoRA layers."""
        unet = self.parts.unet
        if not lora_layers(unet):
            return None
        wanted = sorted({n for n in names if n is not None})
        rank = adapter_rank(unet, wanted) if wanted else 0
        layout = self._packs.layout(rank)
        lora = self._loras.get(rank)
        if lora is None or lora.layout is not layout:
            lora = self._loras[rank] = EagerLora(unet, layout)
        inputs = self._packs.inputs(names, wanted, rank) if wanted else None
        lora.arm(inputs, (self._packs.key, tuple(names)))
        return lora


VariantKey = tuple[bool, bool, int, tuple[int, ...]]
"""(kv, include_self, LoRA rank (0 = no LoRA inputs), sample shape (h, w)) of a graph."""
Runner = Callable[[list[torch.Tensor]], torch.Tensor]


class GraphStep(ABC):
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
        self._packs = LoraPacks(parts.unet)

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        wanted = sorted({n for n in inputs.adapters if n is not None})
        rank = adapter_rank(self.parts.unet, wanted) if wanted else 0
        kv = inputs.ref_index is not None
        key: VariantKey = (kv, inputs.include_self or not kv, rank, tuple(inputs.sample.shape[2:]))
        runner = self._runners.get(key)
        if runner is None:
            layout = self._packs.layout(rank) if rank else None
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
            tensors += self._packs.inputs(inputs.adapters, wanted, rank)
        with per_row_adapters(self.parts.unet, [None]):  # peft layers (if any) run the base
            return runner(tensors)

    @abstractmethod
    def _build(self, module: StepModule, key: VariantKey) -> Runner:
        """Compile ``module`` (one graph variant) into a callable over its input tensors."""
