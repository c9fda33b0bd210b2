"""The cross-frame attention processor against a hand-written reference computation."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from engine.attention import (
    CrossFrameAttnProcessor,
    CrossFrameContext,
    install_cross_frame_attention,
)


def make_attention() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8).eval()


def manual(attn: Attention, x: torch.Tensor, keys_from: list[torch.Tensor]) -> torch.Tensor:
    """Multi-head attention of x's queries over the concatenated tokens of ``keys_from``."""
    src = torch.cat(keys_from, dim=0)[None]
    q, k, v = attn.to_q(x[None]), attn.to_k(src), attn.to_v(src)
    heads = attn.heads
    split = lambda t: t.view(1, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    w = (split(q) @ split(k).transpose(-1, -2) * attn.scale).softmax(-1)
    out = (w @ split(v)).transpose(1, 2).reshape(1, -1, q.shape[-1])
    return attn.to_out[0](out)[0]


@torch.no_grad()
@pytest.mark.parametrize("include_self", [True, False])
def test_rows_attend_to_their_references(include_self: bool):
    attn = make_attention()
    ctx = CrossFrameContext(
        ref_index=torch.tensor([[2, 3], [2, 3], [2, 2], [3, 3]]), include_self=include_self
    )
    attn.set_processor(CrossFrameAttnProcessor(ctx))
    x = torch.randn(4, 10, 16)
    out = attn(x)
    for row in (0, 1):
        sources = [x[row], x[2], x[3]] if include_self else [x[2], x[3]]
        torch.testing.assert_close(out[row], manual(attn, x[row], sources), atol=1e-5, rtol=1e-5)
    # A row whose references are itself is plain self-attention (when its own tokens are kept).
    plain = AttnProcessor2_0()(attn, x)
    if include_self:
        torch.testing.assert_close(out[2], plain[2], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_no_references_is_plain_attention_and_cross_attention_untouched():
    attn = make_attention()
    attn.set_processor(CrossFrameAttnProcessor(CrossFrameContext()))
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(attn(x), AttnProcessor2_0()(attn, x))


def test_install_only_on_self_attention(tiny_components):
    ctx = CrossFrameContext()
    count = install_cross_frame_attention(tiny_components.unet, ctx)
    kinds = {name: type(p).__name__ for name, p in tiny_components.unet.attn_processors.items()}
    assert count == sum(1 for n in kinds if "attn1" in n) > 0
    assert all(v == "CrossFrameAttnProcessor" for n, v in kinds.items() if "attn1" in n)
    assert all(v == "AttnProcessor2_0" for n, v in kinds.items() if "attn2" in n)


def test_xformers_backend_is_optional():
    pytest.importorskip("xformers", reason="xformers is an optional extra and needs a CUDA GPU")
    if not torch.cuda.is_available():
        pytest.skip("xformers kernels need a CUDA GPU")
    CrossFrameAttnProcessor(CrossFrameContext(), backend="xformers")
