"""Our attention processors: one kernel back-end for every layer, and cross-frame self-attention.

Back-ends (``model.attention``): ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``),
``xformers`` (``memory_efficient_attention``, a CUDA GPU and the extra) and ``eager`` (the
written-out softmax(q·kᵀ·scale)·v, softmax in float32: the reference the others are tested
against). :func:`install_cross_frame_attention` puts our processors on *every* attention layer of
the UNet, self (``attn1``) and cross (``attn2``); :func:`install_attention_backend` does the same
for the ControlNet. Never switch a back-end with diffusers' ``set_use_memory_efficient_attention_
xformers`` / ``enable_xformers_memory_efficient_attention``: it replaces every processor, the
cross-frame one included (diffusers issue #2898); :func:`attention_backends` tells which are set.

Cross-frame self-attention ("kv" inter-frame alignment): Text2Video-Zero replaces the keys/values
of every frame's self-attention with frame 0's; we generalise it: the self-attention of a row also
attends to the keys/values of *reference rows* of the same batch (frame t-1 and anchor frame 0,
re-run at the current timestep), concatenated along the token axis. Each row names its reference
rows in a fixed number of slots, so one batch can hold rows of many frames and characters.

Each distinct frame is attended to exactly once: a slot that repeats an earlier slot, or (with
``include_self``) names the row itself, is masked out of the softmax. So a row with one reference
(frame 1, or ``kv_previous``/``kv_anchor`` off) attends to ``[own, ref]``, never ``[own, ref,
ref]``, and a row whose slots all name itself is plain self-attention. The mask is computed from
the slot indices by tensor operations (no Python loop over rows), and no mask is passed to the
kernel when every slot is distinct.

The projections ``attn.to_q/to_k/to_v`` are called on the whole batch before any gathering, so
LoRA layers injected by peft (including per-row ``adapter_names``) see every row as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

Backend = Literal["sdpa", "xformers", "eager"]
BACKENDS: tuple[Backend, ...] = ("sdpa", "xformers", "eager")


@dataclass
class CrossFrameContext:
    """What the processors read on each UNet call; the caller sets it before the forward.

    ``ref_index``: LongTensor (B, R) of batch-row indices whose keys/values row b also attends to
    (pad unused slots with b itself), or None for plain self-attention in every row.
    """

    ref_index: torch.Tensor | None = None
    include_self: bool = True
    """Attend to the row's own tokens too (False = Text2Video-Zero's replacement form)."""
    _cache: tuple[Any, ...] = field(default=(), repr=False)

    def slot_keep(self) -> torch.Tensor | None:
        """(B, R) bool of the slots attended to (see :func:`slot_keep`), or None when every slot
        is kept; computed once per ``ref_index`` tensor and ``include_self`` value."""
        ref = self.ref_index
        assert ref is not None, "slot_keep() needs ref_index"
        if not (self._cache and self._cache[0] is ref and self._cache[1] == self.include_self):
            keep = slot_keep(ref, self.include_self)
            self._cache = (ref, self.include_self, None if bool(keep.all()) else keep)
        return self._cache[2]


def slot_keep(ref_index: torch.Tensor, include_self: bool) -> torch.Tensor:
    """Which reference slots a row attends to: each distinct frame once.

    Args:
        ref_index: (B, R) int64 batch-row indices.
        include_self: the row's own tokens are attended to anyway, so slots naming the row itself
            are dropped too.

    Returns:
        (B, R) bool: False for a slot equal to an earlier slot of its row, or (``include_self``)
        equal to the row's own index.
    """
    same = ref_index[:, :, None] == ref_index[:, None, :]  # [b, j, i]: slot j equals slot i
    keep = ~torch.tril(same, diagonal=-1).any(-1)
    if include_self:
        rows = torch.arange(ref_index.shape[0], device=ref_index.device)[:, None]
        keep = keep & (ref_index != rows)
    return keep


class BackendAttnProcessor:
    """Plain self- or cross-attention with the chosen kernel back-end (any diffusers Attention)."""

    def __init__(self, backend: Backend = "sdpa"):
        if backend not in BACKENDS:
            raise ValueError(f"attention back-end {backend!r} is not one of {', '.join(BACKENDS)}")
        if backend == "xformers":
            _require_xformers()
        self.backend = backend

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # (B, C, H, W) → (B, H·W, C)
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            source = hidden_states
        else:
            source = encoder_hidden_states
            if attn.norm_cross:
                source = attn.norm_encoder_hidden_states(source)
        key, value = attn.to_k(source), attn.to_v(source)
        bias = self._bias(attn, attention_mask, key.shape[1], query.shape[0])
        if encoder_hidden_states is None:
            key, value, bias = self._extend(key, value, bias)
        out = self._attend(attn, query, key, value, bias)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _extend(
        self, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Hook of the cross-frame processor: self-attention keys/values and bias as they are."""
        return key, value, bias

    @staticmethod
    def _bias(
        attn: Attention, mask: torch.Tensor | None, keys: int, batch: int
    ) -> torch.Tensor | None:
        """diffusers' attention mask → additive float bias (B, heads, Nq or 1, Nk), or None."""
        if mask is None:
            return None
        mask = attn.prepare_attention_mask(mask, keys, batch)
        return mask.view(batch, attn.heads, -1, mask.shape[-1])

    def _attend(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, Nq, C), (B, Nk, C), (B, Nk, C), additive bias broadcastable to (B, heads, Nq, Nk)
        (or None) → (B, Nq, C): multi-head attention with ``attn.heads`` heads."""
        batch, _, inner = key.shape
        head_dim = inner // attn.heads
        q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, Nq, d)
        k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if bias is not None:
            bias = bias.to(q.dtype)
        if self.backend == "xformers":
            out = _xformers(q, k, v, attn.scale, bias)
        elif self.backend == "eager":
            scores = (q @ k.transpose(-1, -2)).float() * attn.scale
            if bias is not None:
                scores = scores + bias.float()
            out = scores.softmax(-1).to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        return out.transpose(1, 2).reshape(batch, -1, inner).to(query.dtype)


class CrossFrameAttnProcessor(BackendAttnProcessor):
    """Self-attention over the row's own tokens plus its reference rows' tokens (each distinct
    frame once); cross-attention and calls without references are plain attention."""

    def __init__(self, context: CrossFrameContext, backend: Backend = "sdpa"):
        super().__init__(backend)
        self.context = context

    def _extend(
        self, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, N, C) → (B, [N +] R·N, C) keys/values: the reference rows' tokens after the row's
        own (unless ``include_self`` is off), and the bias masking repeated slots."""
        ref = self.context.ref_index
        if ref is None:
            return key, value, bias
        batch, tokens, _ = key.shape
        if ref.shape[0] != batch:
            raise ValueError(f"ref_index has {ref.shape[0]} rows for a batch of {batch}")
        if bias is not None:
            raise ValueError(
                "cross-frame self-attention does not take an attention mask; set "
                "CrossFrameContext.ref_index=None for masked self-attention"
            )
        own = self.context.include_self
        key, value = _with_references(key, ref, own), _with_references(value, ref, own)
        keep = self.context.slot_keep()
        if keep is None:
            return key, value, None
        if own:
            keep = torch.cat([keep.new_ones(batch, 1), keep], dim=1)
        allowed = keep.repeat_interleave(tokens, dim=1)  # (B, Nk)
        bias = torch.zeros(allowed.shape, dtype=key.dtype, device=key.device)
        bias = bias.masked_fill(~allowed, float("-inf"))
        return key, value, bias[:, None, None, :]


def _with_references(x: torch.Tensor, ref: torch.Tensor, include_self: bool) -> torch.Tensor:
    """(B, N, C) → (B, [N +] R·N, C): the reference rows' tokens, after the row's own."""
    gathered = x[ref].flatten(1, 2)
    return torch.cat([x, gathered], dim=1) if include_self else gathered


def _xformers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None
) -> torch.Tensor:
    """(B, h, N, d) tensors → (B, h, Nq, d) with xformers' memory-efficient kernel.

    xformers wants a materialised bias whose last dimension is allocated to a multiple of 8, so
    the bias is copied into such a buffer and sliced (not run on this CPU-only build machine).
    """
    import xformers.ops  # optional extra; checked when the processor was built

    if bias is not None:
        batch, heads, n_q, n_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        buffer = bias.new_zeros(batch, heads, n_q, -(-n_k // 8) * 8)[..., :n_k]
        buffer.copy_(bias.expand(batch, heads, n_q, n_k))
        bias = buffer
    out = xformers.ops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2)


def _require_xformers() -> None:
    try:
        import xformers.ops  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "model.attention=xformers needs the xformers extra (pip install 'dancing-avatar[xformers]') "
            f"and a CUDA GPU; use model.attention=sdpa ({e})"
        ) from None


def install_cross_frame_attention(
    unet: nn.Module, context: CrossFrameContext, backend: Backend = "sdpa"
) -> int:
    """Put our processors with kernel ``backend`` on every attention layer of ``unet``.

    Self-attention (``attn1``) gets a :class:`CrossFrameAttnProcessor` reading ``context``;
    every other attention layer (cross-attention ``attn2``) a :class:`BackendAttnProcessor`.
    Returns how many self-attention layers got the cross-frame processor.
    """
    cross_frame = CrossFrameAttnProcessor(context, backend)
    plain = BackendAttnProcessor(backend)
    count = 0
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            is_self = name.endswith("attn1")
            module.set_processor(cross_frame if is_self else plain)
            count += is_self
    return count


def install_attention_backend(module: nn.Module, backend: Backend = "sdpa") -> int:
    """Put a :class:`BackendAttnProcessor` on every attention layer of ``module`` (e.g. the
    ControlNet); returns how many."""
    processor = BackendAttnProcessor(backend)
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.set_processor(processor)
    return len(layers)


def attention_backends(module: nn.Module) -> dict[str, str]:
    """{layer name: back-end} of every attention layer of ``module``; ``foreign:<class>`` for a
    processor that is not ours (e.g. one diffusers' xformers switch installed)."""
    out: dict[str, str] = {}
    for name, layer in module.named_modules():
        if isinstance(layer, Attention):
            p = layer.processor
            ours = isinstance(p, BackendAttnProcessor)
            out[name] = p.backend if ours else f"foreign:{type(p).__name__}"
    return out
