"""The denoise step as one traceable module, with per-row LoRA as runtime inputs.

:class:`StepModule` wraps ControlNet + UNet for a batch of rows: the cross-frame attention of
:mod:`engine.attention` reads the per-row reference index from the module's *input* (so the
reference gathering is inside an exported graph, with the batch size and the reference count
both dynamic), and per-character LoRA is applied S-LoRA/Punica style from three inputs:

- ``lora_a`` (N, Ta) float: row k holds adapter k's A matrices of every adapted projection,
  flattened and concatenated (row 0 = zeros = the base model);
- ``lora_b`` (N, Tb) float: adapter k's B matrices times its scaling (alpha / r), likewise;
- ``lora_index`` (B,) int64: which adapter each batch row uses (0 = none).

For projection ``p`` with input x (B, L, in): ``out = base(x) + (x · A[idx]ᵀ) · B[idx]ᵀ``,
one batched matmul pair per projection whatever the mix of adapters in the batch. Adapters of a
smaller rank than the layout's are zero-padded (exact). :func:`pack_adapters` builds the three
inputs from the peft adapters loaded on the UNet.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from engine.appearance.lora import UNET_TARGETS, lora_layers
from engine.attention import CrossFrameContext, slot_keep
from engine.models.components import text_kwargs


@dataclass(frozen=True)
class LoraSlot:
    """One adapted projection of the UNet (an ``nn.Linear``, possibly wrapped by peft)."""

    name: str
    """Module path inside the UNet, e.g. ``down_blocks.0.attentions.0...attn1.to_q``."""
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LoraLayout:
    """Which projections take runtime LoRA, at which rank, and where they sit in the packs."""

    rank: int
    slots: tuple[LoraSlot, ...]

    @property
    def a_size(self) -> int:
        """Ta: floats of one adapter's flattened A matrices."""
        return sum(self.rank * s.in_features for s in self.slots)

    @property
    def b_size(self) -> int:
        """Tb: floats of one adapter's flattened (scaled) B matrices."""
        return sum(s.out_features * self.rank for s in self.slots)

    def offsets(self) -> list[tuple[int, int]]:
        """(offset in A, offset in B) of each slot."""
        out, a, b = [], 0, 0
        for s in self.slots:
            out.append((a, b))
            a += self.rank * s.in_features
            b += s.out_features * self.rank
        return out


def _is_target(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layout(unet: nn.Module, rank: int, targets: Sequence[str] = UNET_TARGETS) -> LoraLayout:
    """The :class:`LoraLayout` of every ``targets`` projection of ``unet`` at ``rank``."""
    slots = []
    for name, module in unet.named_modules():
        if not _is_target(name, targets):
            continue
        linear = getattr(module, "base_layer", module)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRA target {name} is a {type(linear).__name__}, not nn.Linear")
        slots.append(LoraSlot(name, linear.in_features, linear.out_features))
    return LoraLayout(rank, tuple(slots))


def adapter_rank(unet: nn.Module, names: Sequence[str]) -> int:
    """The largest LoRA rank among adapters ``names`` on ``unet`` (0 when ``names`` is empty)."""
    ranks = [0]
    for layer in lora_layers(unet):
        ranks += [layer.r[n] for n in names if n in layer.r]  # type: ignore[attr-defined]
    return max(ranks)


def pack_adapters(
    unet: nn.Module, names: Sequence[str | None], layout: LoraLayout, *, strict: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The runtime LoRA inputs of a batch whose row i uses adapter ``names[i]`` (None = base).

    Returns ``lora_a`` (N, Ta), ``lora_b`` (N, Tb) in the UNet's dtype and ``lora_index`` (B,)
    int64, N = 1 + distinct adapters (slot 0 = zeros). Raises ValueError when an adapter is not
    loaded, has a rank above ``layout.rank``, or (``strict``, the compiled steps) adapts a module
    outside the layout; the eager step packs the layout's slots and runs the rest through peft.
    """
    wanted = sorted({n for n in names if n is not None})
    modules = dict(unet.named_modules())
    ref = next(iter(unet.parameters()))
    lora_a = ref.new_zeros((1 + len(wanted), layout.a_size))
    lora_b = ref.new_zeros((1 + len(wanted), layout.b_size))
    slot_names = {s.name for s in layout.slots}
    for name, module in modules.items():
        stray = [n for n in wanted if n in getattr(module, "lora_A", {})]
        if strict and stray and name not in slot_names:
            raise ValueError(f"adapter {stray[0]!r} adapts {name}, which the compiled step lacks")
    for k, adapter in enumerate(wanted, start=1):
        found = False
        for slot, (oa, ob) in zip(layout.slots, layout.offsets(), strict=True):
            layer = modules[slot.name]
            if adapter not in getattr(layer, "lora_A", {}):
                continue
            found = True
            a = layer.lora_A[adapter].weight  # type: ignore[index]  # (r, in)
            b = layer.lora_B[adapter].weight * layer.scaling[adapter]  # type: ignore[index]
            r = a.shape[0]
            if r > layout.rank:
                raise ValueError(f"adapter {adapter!r} has rank {r} > the step's {layout.rank}")
            pa = a.new_zeros((layout.rank, slot.in_features))
            pa[:r] = a
            pb = b.new_zeros((slot.out_features, layout.rank))
            pb[:, :r] = b
            lora_a[k, oa : oa + pa.numel()] = pa.flatten()
            lora_b[k, ob : ob + pb.numel()] = pb.flatten()
        if not found:
            raise ValueError(f"adapter {adapter!r} is not loaded on the UNet; load_adapter() it")
    index = torch.tensor([0 if n is None else 1 + wanted.index(n) for n in names])
    return lora_a, lora_b, index.to(ref.device)


def select_lora(
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    slot: LoraSlot,
    rank: int,
    oa: int,
    ob: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's A and B of one slot: ``(Aᵀ[idx] (B, in, r), Bᵀ[idx] (B, r, out))`` from the
    packed ``(lora_a, lora_b, lora_index)`` (slot offsets ``oa``/``ob`` from the layout)."""
    lora_a, lora_b, index = inputs
    a = lora_a[:, oa : oa + rank * slot.in_features].reshape(-1, rank, slot.in_features)
    b = lora_b[:, ob : ob + slot.out_features * rank].reshape(-1, slot.out_features, rank)
    return a[index].transpose(1, 2), b[index].transpose(1, 2)


def add_low_rank(x: torch.Tensor, out: torch.Tensor, at: torch.Tensor, bt: torch.Tensor):
    """``out + (x · Aᵀ) · Bᵀ`` per row: x (B, …, in), out (B, …, out), at/bt from
    :func:`select_lora`; two batched matmuls whatever the mix of adapters."""
    rows = x.shape[0]
    h = torch.bmm(x.reshape(rows, -1, at.shape[1]), at)  # (B, L, r)
    return torch.baddbmm(out.reshape(rows, -1, bt.shape[2]), h, bt).reshape(out.shape)


class RuntimeLora:
    """Forward hooks adding ``(x · A[idx]ᵀ) · B[idx]ᵀ`` to each slot's output while armed.

    The batched low-rank update of the compiled graphs (:class:`StepModule`), traced with the
    rows selected inside the graph (:func:`select_lora`, :func:`add_low_rank`; the eager step runs
    the same two functions, :class:`~engine.accel.step.EagerLora`). The slots' modules are
    resolved once; :meth:`attach` / :meth:`close` add and remove the hooks, and :attr:`inputs`
    arms them, or None (the hooks pass outputs through). Run the peft layers with adapters
    disabled meanwhile.
    """

    def __init__(self, unet: nn.Module, layout: LoraLayout):
        self.layout = layout
        self.inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        """``(lora_a (N, Ta), lora_b (N, Tb), lora_index (B,) int64)`` (:func:`pack_adapters`)."""
        self.modules = slot_modules(unet, layout)
        self.hooks: list = []

    def attach(self) -> RuntimeLora:
        """Register the hooks (idempotent); returns self."""
        if not self.hooks:
            spans = zip(self.modules, self.layout.slots, self.layout.offsets(), strict=True)
            self.hooks = [
                m.register_forward_hook(self._hook(s, oa, ob)) for m, s, (oa, ob) in spans
            ]
        return self

    def _hook(self, slot: LoraSlot, oa: int, ob: int):
        r = self.layout.rank

        def add_delta(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if self.inputs is None:
                return None
            return add_low_rank(args[0], out, *select_lora(self.inputs, slot, r, oa, ob))

        return add_delta

    def close(self) -> None:
        """Remove the hooks (:meth:`attach` adds them again)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def slot_modules(unet: nn.Module, layout: LoraLayout) -> list[nn.Module]:
    """The module of each slot of ``layout`` (peft's LoRA layer, or the plain Linear)."""
    modules = dict(unet.named_modules())
    return [modules[s.name] for s in layout.slots]


class StepModule(nn.Module):
    """ControlNet + UNet noise prediction for a batch of rows, ready for tracing/compiling.

    forward(sample (B, 4, h, w), timestep (B,) int64, text (B, 77, D), pose (B, 3, H, W) in
    [0, 1], control_scale (B, 1, 1, 1), [ref_index (B, R) int64 when ``kv``], [lora_a (N, Ta),
    lora_b (N, Tb), lora_index (B,) int64 when ``layout``]) → eps (B, 4, h, w).

    ``kv`` and ``include_self`` are fixed per instance (they select the graph); the batch size,
    the reference count R and the adapter count N are free. Hooks go onto the shared UNet while
    the module lives with a ``layout``: call :meth:`close` when done.
    """

    def __init__(
        self,
        unet: nn.Module,
        controlnet: nn.Module,
        context: CrossFrameContext,
        *,
        kv: bool,
        include_self: bool = True,
        layout: LoraLayout | None = None,
    ):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        self.context = context
        self.kv, self.include_self = kv, include_self
        self.layout = layout
        self._lora = RuntimeLora(unet, layout).attach() if layout is not None else None

    def input_names(self) -> list[str]:
        """Names of forward's tensor inputs, in order (the ONNX graph's inputs)."""
        names = ["sample", "timestep", "text", "pose", "control_scale"]
        names += ["ref_index"] if self.kv else []
        return names + (["lora_a", "lora_b", "lora_index"] if self.layout is not None else [])

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        pose: torch.Tensor,
        control_scale: torch.Tensor,
        *extra: torch.Tensor,
    ) -> torch.Tensor:
        ref_index = extra[0] if self.kv else None
        lora = extra[1:] if self.kv else extra
        if self._lora is not None:
            self._lora.inputs = (lora[0], lora[1], lora[2])
        self.context.ref_index = ref_index
        self.context.include_self = self.include_self
        if ref_index is not None:
            _prime_slot_mask(self.context, ref_index, self.include_self)
        try:
            return controlnet_unet(
                self.unet, self.controlnet, sample, timestep, text, pose, control_scale
            )
        finally:
            self.context.ref_index = None
            if self._lora is not None:
                self._lora.inputs = None

    def close(self) -> None:
        """Remove the LoRA hooks from the UNet."""
        if self._lora is not None:
            self._lora.close()


def _prime_slot_mask(context: CrossFrameContext, ref: torch.Tensor, include_self: bool) -> None:
    """Make the processors take the masked path whatever the example's slots are.

    ``CrossFrameContext.slot_keep()`` drops the mask when every slot of the batch is distinct, a
    data-dependent Python branch that tracing would bake into the graph (a graph exported from
    distinct slots would then attend twice to a repeated reference). Seeding its per-tensor cache
    with the mask itself keeps the mask in the graph; an all-kept mask changes nothing.
    """
    context._cache = (ref, include_self, slot_keep(ref, include_self))


def pose_features(controlnet: nn.Module, pose: torch.Tensor) -> torch.Tensor:
    """The ControlNet's embedding of pose maps (B, 3, H, W) in [0, 1] → (B, C, h, w): what it
    adds to its input at every step, a function of the pose alone, so a frame's is computed once
    and reused by all its steps (:class:`~engine.batching.BatchDenoiser`; diffusers' pipeline
    recomputes it at every step: ≈23 % of a tiny step)."""
    if controlnet.config.controlnet_conditioning_channel_order == "bgr":  # type: ignore[union-attr]
        pose = torch.flip(pose, dims=[1])  # what ControlNetModel.forward does before embedding
    return controlnet.controlnet_cond_embedding(pose)  # type: ignore[operator]


@contextmanager
def embedded_pose(controlnet: nn.Module, features: torch.Tensor | None) -> Iterator[None]:
    """Inside the block the ControlNet's pose embedding returns ``features`` (from
    :func:`pose_features`, rows aligned with the call's) instead of embedding the pose maps it
    is given; None changes nothing."""
    if features is None:
        yield
        return
    module = controlnet.controlnet_cond_embedding
    module.__dict__["forward"] = lambda _pose: features  # an instance attribute, removed after
    try:
        yield
    finally:
        module.__dict__.pop("forward", None)


def controlnet_unet(
    unet: nn.Module,
    controlnet: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    text: torch.Tensor,
    pose: torch.Tensor,
    control_scale: torch.Tensor,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """ControlNet residuals (times each row's ``control_scale``) fed into the UNet → eps;
    ``features``: the pose maps' embedding, precomputed (:func:`pose_features`), or None."""
    with embedded_pose(controlnet, features):
        down, mid = controlnet(
            sample,
            timestep,
            controlnet_cond=pose,
            conditioning_scale=1.0,
            return_dict=False,
            **text_kwargs(controlnet, text, sample),
        )
    return unet(
        sample,
        timestep,
        down_block_additional_residuals=[d * control_scale for d in down],
        mid_block_additional_residual=mid * control_scale,
        return_dict=False,
        **text_kwargs(unet, text, sample),
    )[0]
