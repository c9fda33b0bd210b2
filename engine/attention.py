"""Cross-frame self-attention: inter-frame alignment by shared keys/values ("kv" mechanism).

Text2Video-Zero replaces the keys/values of every frame's self-attention with frame 0's; we
generalise it: the self-attention of a row also attends to the keys/values of *reference rows* of
the same batch (frame t-1 and anchor frame 0, re-run at the current timestep), concatenated along
the token axis. Each row names its own references, so one batch can hold rows of many frames and
characters (cross-character batching) and rows with no reference (they point at themselves, which
is exactly plain self-attention: duplicated keys with duplicated values leave softmax attention
unchanged).

The projections ``attn.to_q/to_k/to_v`` are called on the whole batch before any gathering, so
LoRA layers injected by peft (including per-row ``adapter_names``) see every row as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn


@dataclass
class CrossFrameContext:
    """What the processors read on each UNet call; the caller sets it before the forward.

    ``ref_index``: LongTensor (B, R) of batch-row indices whose keys/values row b also attends to
    (pad with b itself), or None for plain self-attention in every row.
    """

    ref_index: torch.Tensor | None = None
    include_self: bool = True
    """Attend to the row's own tokens too (False = Text2Video-Zero's replacement form)."""


class CrossFrameAttnProcessor:
    """Self-attention over the row's own tokens plus its reference rows' tokens (SDPA/xformers)."""

    def __init__(
        self,
        context: CrossFrameContext,
        backend: Literal["sdpa", "xformers"] = "sdpa",
    ):
        self.context = context
        self.backend = backend
        self._plain = AttnProcessor2_0()
        if backend == "xformers":
            _require_xformers()

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
        ref = self.context.ref_index
        if ref is None or encoder_hidden_states is not None or hidden_states.ndim != 3:
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, _tokens, _ = hidden_states.shape
        if ref.shape[0] != batch:
            raise ValueError(f"ref_index has {ref.shape[0]} rows for a batch of {batch}")
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        # Gather after the projections: (B, R, N, C) → (B, R·N, C), appended to the row's own.
        key = self._with_references(key, ref)
        value = self._with_references(value, ref)
        out = self._attend(attn, query, key, value)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _with_references(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """(B, N, C) → (B, [N +] R·N, C): the reference rows' tokens, after the row's own unless
        ``context.include_self`` is off (Text2Video-Zero's replacement form)."""
        gathered = x[ref].flatten(1, 2)
        return torch.cat([x, gathered], dim=1) if self.context.include_self else gathered

    def _attend(
        self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """(B, Nq, C), (B, Nk, C) → (B, Nq, C) multi-head attention with ``attn.heads`` heads."""
        batch, _, inner = key.shape
        head_dim = inner // attn.heads
        q = query.view(batch, -1, attn.heads, head_dim)
        k = key.view(batch, -1, attn.heads, head_dim)
        v = value.view(batch, -1, attn.heads, head_dim)
        if self.backend == "xformers":
            import xformers.ops  # optional extra; checked in __init__

            out = xformers.ops.memory_efficient_attention(q, k, v, scale=attn.scale)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=attn.scale
            ).transpose(1, 2)
        return out.reshape(batch, -1, inner).to(query.dtype)


def _require_xformers() -> None:
    try:
        import xformers.ops  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "model.attention=xformers needs the xformers extra (pip install 'dancing-avatar[xformers]') "
            f"and a CUDA GPU; use model.attention=sdpa ({e})"
        ) from None


def install_cross_frame_attention(
    unet: nn.Module,
    context: CrossFrameContext,
    backend: Literal["sdpa", "xformers"] = "sdpa",
) -> int:
    """Put a :class:`CrossFrameAttnProcessor` on every self-attention (``attn1``) of ``unet``.

    Cross-attention (``attn2``, text) keeps the plain SDPA processor. Returns how many were set.
    """
    processor = CrossFrameAttnProcessor(context, backend)
    count = 0
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            if name.endswith("attn1"):
                module.set_processor(processor)
                count += 1
            else:
                module.set_processor(AttnProcessor2_0())
    return count
