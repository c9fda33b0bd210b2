"""Our attention processors against hand-written attention: cross-frame exactness (each distinct
frame attended to once), every back-end against ``eager``, and processors that stay ours."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from engine.attention import (
    BackendAttnProcessor,
    CrossFrameAttnProcessor,
    CrossFrameContext,
    attention_backends,
    install_attention_backend,
    install_cross_frame_attention,
    slot_keep,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}
"""fp32 attention of 10-40 tokens: kernels differ only in summation order (measured ≤ 1e-6)."""
UNET_TOL = 1e-4
"""Max abs difference of a 2-step tiny denoise between two back-ends (measured ≈ 1e-6)."""


def xformers_usable() -> str | None:
    """None when the xformers back-end can run here, else the reason it cannot."""
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return (
            "xformers is an optional extra (pip install 'dancing-avatar[xformers]'), not installed"
        )
    if not torch.cuda.is_available():
        return "xformers kernels need a CUDA GPU; this machine has none"
    return None


BACKENDS = [
    "sdpa",
    "eager",
    pytest.param(
        "xformers",
        marks=pytest.mark.skipif(xformers_usable() is not None, reason=str(xformers_usable())),
    ),
]


def make_attention(cross_dim: int | None = None) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=cross_dim, heads=2, dim_head=8).eval()


def manual(attn: Attention, x: torch.Tensor, keys_from: list[torch.Tensor]) -> torch.Tensor:
    """Multi-head attention of x's queries over the concatenated tokens of ``keys_from``."""
    src = torch.cat(keys_from, dim=0)[None]
    q, k, v = attn.to_q(x[None]), attn.to_k(src), attn.to_v(src)
    heads = attn.heads
    split = lambda t: t.view(1, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    w = (split(q) @ split(k).transpose(-1, -2) * attn.scale).softmax(-1)
    out = (w @ split(v)).transpose(1, 2).reshape(1, -1, q.shape[-1])
    return attn.to_out[0](out)[0]


def distinct_sources(row: int, slots: list[int], include_self: bool) -> list[int]:
    """The frames row ``row`` must attend to: itself (if kept), then each distinct slot once."""
    out = [row] if include_self else []
    for s in slots:
        if s not in out:
            out.append(s)
    return out


# Rows 0 and 1 are frames being denoised; rows 2 and 3 their reference frames. Slot lists as the
# batch denoiser writes them (fewer references than slots: repeated), plus a self-padded form.
ONE_REFERENCE = [[2, 2], [1, 3], [2, 2], [3, 3]]
TWO_REFERENCES = [[2, 3], [3, 2], [2, 2], [3, 3]]


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("include_self", [True, False], ids=["with-self", "replace-self"])
@pytest.mark.parametrize("slots", [ONE_REFERENCE, TWO_REFERENCES], ids=["1-ref", "2-refs"])
def test_each_distinct_frame_is_attended_once(slots, include_self: bool, backend: str):
    attn = make_attention()
    ctx = CrossFrameContext(ref_index=torch.tensor(slots), include_self=include_self)
    attn.set_processor(CrossFrameAttnProcessor(ctx, backend))  # type: ignore[arg-type]
    x = torch.randn(4, 10, 16, generator=torch.Generator().manual_seed(1))
    out = attn(x)
    for row in range(4):
        sources = [x[s] for s in distinct_sources(row, slots[row], include_self)]
        torch.testing.assert_close(out[row], manual(attn, x[row], sources), **TOL)
    # The frame with one reference attends to [own, ref], not [own, ref, ref].
    if include_self and slots is ONE_REFERENCE:
        doubled = manual(attn, x[0], [x[0], x[2], x[2]])
        assert (out[0] - doubled).abs().max() > 1e-3


def test_slot_keep_drops_repeats_and_self():
    ref = torch.tensor([[2, 2], [1, 3], [0, 3], [3, 3]])
    assert slot_keep(ref, True).tolist() == [
        [True, False],
        [False, True],
        [True, True],
        [False, False],
    ]
    assert slot_keep(ref, False).tolist() == [
        [True, False],
        [True, True],
        [True, True],
        [True, False],
    ]


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_and_cross_attention_match_diffusers(backend: str):
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(2))
    text = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(3))
    attn = make_attention()
    ours = attn.processor = CrossFrameAttnProcessor(CrossFrameContext(), backend)  # type: ignore[arg-type]
    torch.testing.assert_close(ours(attn, x), AttnProcessor()(attn, x), **TOL)
    cross = make_attention(cross_dim=12)
    got = BackendAttnProcessor(backend)(cross, x, encoder_hidden_states=text)  # type: ignore[arg-type]
    torch.testing.assert_close(got, AttnProcessor2_0()(cross, x, encoder_hidden_states=text), **TOL)
    torch.testing.assert_close(got, AttnProcessor()(cross, x, encoder_hidden_states=text), **TOL)


@pytest.fixture(scope="module")
def private_parts():
    """Tiny components of our own: installing back-ends must not touch the shared tiny_chain."""
    from engine.config import ModelConfig
    from engine.models.registry import build_components

    return build_components(ModelConfig(preset="tiny", device="cpu", seed=3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_layer_keeps_our_processor(private_parts, backend: str):
    ctx = CrossFrameContext()
    count = install_cross_frame_attention(private_parts.unet, ctx, backend)  # type: ignore[arg-type]
    controlnet_layers = install_attention_backend(private_parts.controlnet, backend)  # type: ignore[arg-type]
    unet = attention_backends(private_parts.unet)
    assert count == sum(1 for n in unet if n.endswith("attn1")) > 0
    assert any(n.endswith("attn2") for n in unet) and controlnet_layers > 0
    assert set(unet.values()) == {backend}
    assert set(attention_backends(private_parts.controlnet).values()) == {backend}
    for name, layer in private_parts.unet.named_modules():
        if name.endswith("attn1"):
            assert isinstance(layer.processor, CrossFrameAttnProcessor)
            assert layer.processor.context is ctx
    # A processor swapped in behind our back (diffusers' xformers switch does this) shows up.
    first = next(m for m in private_parts.unet.modules() if isinstance(m, Attention))
    first.set_processor(AttnProcessor2_0())
    assert "foreign:AttnProcessor2_0" in attention_backends(private_parts.unet).values()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_backends_agree_with_eager_on_a_kv_batch(private_parts, backend: str):
    """A 2-step kv batch (frames with 0, 1 and 2 references) under each back-end equals eager."""
    from test_batching import make_jobs

    from engine.batching import BatchDenoiser
    from engine.chain import FrameChain

    results = {}
    for name in ("eager", backend):
        chain = FrameChain(private_parts, name)  # type: ignore[arg-type]
        jobs = make_jobs(chain, steps=2)
        results[name] = torch.cat(BatchDenoiser(chain).denoise(jobs))
    diff = (results[backend] - results["eager"]).abs().max().item()
    assert diff <= UNET_TOL, f"{backend} vs eager: max abs {diff:.2e} > {UNET_TOL}"
    assert results["eager"].abs().mean() > 0.1  # a real output, not zeros


def test_unknown_or_unavailable_backend_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        BackendAttnProcessor("flash")  # type: ignore[arg-type]
    reason = xformers_usable()
    if reason is not None and "not installed" in reason:
        with pytest.raises(RuntimeError, match=r"model\.attention=sdpa"):
            BackendAttnProcessor("xformers")
