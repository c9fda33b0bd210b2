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
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.accel.deepcache import (
    DeepFeatures,
    check_supported,
    keep_deep_features,
    shallow_step,
)
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
    pose_features: torch.Tensor | None = None
    """(B, C, h, w) the ControlNet's embedding of ``pose`` (:func:`pose_features`: the same at
    every step of a frame, so computed once), or None: the step embeds ``pose`` itself. Read by
    steps whose ``takes_pose_features`` is true (the eager one)."""
    deep: DeepFeatures | None = None
    """DeepCache (``sampler.deep_cache``): keep the deep features (key step) or run the shallow
    branch on kept ones; None = the whole step, nothing kept. Eager step only."""


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

    def __init__(self, unet: torch.nn.Module, *, strict: bool = True):
        self.unet = unet
        self.strict = strict
        """Refuse adapters of modules outside the layout (compiled steps; the eager step runs
        those through peft)."""
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
            layout = self.layout(rank)
            lora_a, lora_b, _ = pack_adapters(self.unet, wanted, layout, strict=self.strict)
            self.key, self._pack = key, (lora_a, lora_b, wanted)
        lora_a, lora_b, order = self._pack
        index = [0 if n is None else 1 + order.index(n) for n in names]
        return lora_a, lora_b, torch.tensor(index, device=lora_a.device)


MERGED_BYTES = 256 * 2**20
"""Largest total size of the per-row merged weights :class:`EagerLora` builds (rows x every
slot's in x out); a batch over it uses the low-rank update instead (``sd15`` at 16 rows would
need ≈3 GB)."""


class EagerLora:
    """Per-row LoRA in the eager step, armed for a batch whose rows use different adapters.

    Arming replaces the forward of each slot's peft layer (an instance attribute, deleted by
    :meth:`disarm`: peft's layer is untouched) by one of:

    - **merged** (when the rows' weights fit :data:`MERGED_BYTES`): each row's own weight
      ``W + s·B[idx]·A[idx]``, built once per (adapter pack, row order) and reused by every step
      of the batch, applied in one ``baddbmm`` — the same single kernel a plain ``Linear`` is, so
      a mixed batch costs almost what a base batch does (3 adapters + base rows, benchmarks/
      accel.py: tiny +0.9-1.9 % merged vs +7.6 % low-rank; small +1.3-2.3 % vs +3.7 %);
    - **low-rank**: ``base(x) + (x · A[idx]ᵀ) · B[idx]ᵀ`` (:func:`add_low_rank`, the compiled
      graphs' math), for models whose per-row weights would not fit;
    - **base** (no adapter in the batch): the base ``F.linear`` alone, bitwise what peft's
      disabled layer computes.

    A forward hook would leave peft's own forward running too, and peft's dispatch per layer cost
    +4-5 % of a tiny step.
    """

    def __init__(self, unet: torch.nn.Module, layout: LoraLayout):
        self.layout = layout
        self.modules = slot_modules(unet, layout)
        self.mode = "base"
        """How the last :meth:`arm` applies the adapters: ``base``, ``merged`` or ``low-rank``."""
        self._key: tuple | None = None
        self._forwards: list[Callable[..., torch.Tensor]] = []

    def arm(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, key: tuple):
        """Apply packed ``inputs`` (:func:`pack_adapters`; None = base) from now on; ``key``
        names them (an equal key reuses the last gather and forwards)."""
        if inputs is None:
            key = ("base",)
        if key != self._key:
            bases = [getattr(m, "base_layer", m) for m in self.modules]
            if inputs is None:
                self.mode, self._forwards = "base", [_base_forward(b) for b in bases]
            else:
                spans = zip(self.layout.slots, self.layout.offsets(), strict=True)
                r = self.layout.rank
                pairs = [select_lora(inputs, s, r, oa, ob) for s, (oa, ob) in spans]
                rows = int(inputs[2].shape[0])
                size = inputs[0].element_size() * rows
                merged = size * sum(s.in_features * s.out_features for s in self.layout.slots)
                self.mode = "merged" if merged <= MERGED_BYTES else "low-rank"
                row_forward = _merged_forward if self.mode == "merged" else _low_rank_forward
                self._forwards = [row_forward(b, p) for b, p in zip(bases, pairs, strict=True)]
            self._key = key
        for module, forward in zip(self.modules, self._forwards, strict=True):
            module.__dict__["forward"] = forward  # nn.Module.__setattr__ costs 5 µs a call

    def disarm(self) -> None:
        """Give each projection its own forward back."""
        for module in self.modules:
            module.__dict__.pop("forward", None)


def _linear(base: torch.nn.Module) -> torch.nn.Linear:
    assert isinstance(base, torch.nn.Linear)  # lora_layout checked every slot
    return base


def _base_forward(base: torch.nn.Module) -> Callable[..., torch.Tensor]:
    linear_layer = _linear(base)
    weight, bias = linear_layer.weight, linear_layer.bias
    linear = torch.nn.functional.linear
    return lambda x, *_, **__: linear(x, weight, bias)


def _low_rank_forward(base: torch.nn.Module, pair: tuple[torch.Tensor, torch.Tensor]):
    linear_layer = _linear(base)
    weight, bias = linear_layer.weight, linear_layer.bias
    linear = torch.nn.functional.linear
    at, bt = (m.contiguous() for m in pair)
    return lambda x, *_, **__: add_low_rank(x, linear(x, weight, bias), at, bt)


def _merged_forward(base: torch.nn.Module, pair: tuple[torch.Tensor, torch.Tensor]):
    """``x · (W + B·A)ᵀ[row] + bias`` with each row's merged weight ``(rows, in, out)``."""
    linear_layer = _linear(base)
    weight, bias = linear_layer.weight, linear_layer.bias
    at, bt = pair  # (rows, in, r), (rows, r, out)
    wt = torch.baddbmm(weight.t().unsqueeze(0), at, bt).contiguous()
    rows, size_in, size_out = wt.shape
    if bias is None:
        bias = wt.new_zeros(size_out)

    def forward(x: torch.Tensor, *_, **__) -> torch.Tensor:
        out = torch.baddbmm(bias, x.reshape(rows, -1, size_in), wt)
        return out.reshape(*x.shape[:-1], size_out)

    return forward


class EagerStep:
    """The PyTorch step: diffusers ControlNet + UNet; per-row LoRA by :class:`EagerLora` (each
    row's merged weight in one ``baddbmm`` per projection, or the batched low-rank update for
    models too large to merge), armed for the call. Equal to peft's per-row ``adapter_names``
    path within fp rounding (tests/test_accel_lora.py: 1e-5), whose loop over adapters per layer
    cost +35-45 % per step on ``tiny``. A batch where no row has an adapter runs the base
    projections only (bitwise the base model)."""

    name = "eager"
    takes_pose_features = True

    def __init__(self, parts: DiffusionComponents, context: CrossFrameContext):
        self.parts, self.context = parts, context
        self._packs = LoraPacks(parts.unet, strict=False)
        self._loras: dict[int, EagerLora] = {}  # by rank (0: the base alone)
        self._unarmed_at: tuple[int, bool] = (-1, True)
        self._deep_checked = False

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        ctx = self.context
        ctx.ref_index = inputs.ref_index
        ctx.include_self = inputs.include_self
        lora = self._arm(inputs.adapters)
        # Armed projections bypass peft; any other peft layer (an imported LoRA's feed-forward or
        # proj_in, appearance.lora) applies each row's adapter through peft's per-row path.
        # Entering peft's context costs ≈1 % of a tiny step, so it is skipped when nothing is
        # left to it.
        rest = (
            per_row_adapters(self.parts.unet, inputs.adapters) if self._unarmed() else nullcontext()
        )
        deep = inputs.deep
        keep = None
        if deep is not None and not self._deep_checked:
            check_supported(self.parts.unet, self.parts.controlnet)
            self._deep_checked = True
        parts = self.parts
        sample, timestep, text, pose = inputs.sample, inputs.timestep, inputs.text, inputs.pose
        args = (parts.unet, parts.controlnet, sample, timestep, text, pose, inputs.control_scale)
        try:
            with rest:
                if deep is not None and deep.reuse is not None:
                    return shallow_step(*args, deep.reuse, inputs.pose_features)
                if deep is not None:
                    keep = keep_deep_features(parts.unet, deep)
                return controlnet_unet(*args, inputs.pose_features)
        finally:
            ctx.ref_index = None
            if keep is not None:
                keep.remove()
            if lora is not None:
                lora.disarm()

    def _unarmed(self) -> bool:
        """Whether the UNet has peft LoRA layers outside the armed slots (cached per adapter
        generation; the layout takes every ``UNET_TARGETS`` projection, so normally False)."""
        unet = self.parts.unet
        generation = lora_generation(unet)
        if self._unarmed_at[0] != generation:
            slots = {id(m) for m in slot_modules(unet, self._packs.layout(0))}
            self._unarmed_at = (generation, any(id(m) not in slots for m in lora_layers(unet)))
        return self._unarmed_at[1]

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
    takes_pose_features = False  # the pose embedding is inside the graph

    def __init__(self, parts: DiffusionComponents, context: CrossFrameContext):
        self.parts, self.context = parts, context
        self._runners: dict[VariantKey, Runner] = {}
        self._packs = LoraPacks(parts.unet)

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        if inputs.deep is not None:
            raise ValueError(
                f"sampler.deep_cache runs on model.backend=eager only, not {self.name}"
            )
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
