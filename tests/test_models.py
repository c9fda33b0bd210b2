"""Model registry: tiny components, the ControlNet responds to poses, real weights fail fast."""

from __future__ import annotations

import time

import pytest
import torch

from engine.config import ModelConfig
from engine.models.registry import MODEL_REGISTRY, WeightsNotFoundError, build_components
from engine.models.tokenizer import build_offline_tokenizer


def test_registry_and_tiny_components(tiny_components):
    assert set(MODEL_REGISTRY) == {
        *("tiny", "small", "micro", "sd15", "sd15-random"),
        *("sdxl", "sdxl-random", "sdxl-tiny"),
    }
    c = tiny_components
    assert c.vae_scale == 8 and c.unet.config.in_channels == 4
    assert c.text_encoder.config.vocab_size == len(c.tokenizer)
    assert not c.unet.training and not any(p.requires_grad for p in c.unet.parameters())


def test_random_builders_are_seeded():
    a = build_components(ModelConfig(preset="tiny", seed=3))
    b = build_components(ModelConfig(preset="tiny", seed=3))
    for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_controlnet_residuals_depend_on_the_pose(tiny_components):
    cn = tiny_components.controlnet
    torch.manual_seed(0)
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    blank = torch.zeros(1, 3, 64, 64)
    pose = blank.clone()
    pose[:, 0, 20:44, 30:34] = 1.0  # a red limb
    with torch.no_grad():
        down_a, mid_a = cn(
            x, 500, encoder_hidden_states=text, controlnet_cond=blank, return_dict=False
        )
        _down_b, mid_b = cn(
            x, 500, encoder_hidden_states=text, controlnet_cond=pose, return_dict=False
        )
    assert all(r.abs().mean() > 0 for r in down_a)  # zero convs were given weights
    assert (mid_a - mid_b).abs().mean() > 1e-2 * mid_a.abs().mean()


def test_offline_tokenizer_is_clip_like():
    tok = build_offline_tokenizer()
    ids = tok("A woman in a RED dress", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:3]) == [
        "a</w>",
        "woman</w>",
    ] or "red</w>" in tok.convert_ids_to_tokens(ids)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base": "/nonexistent/sd15"}, r"/nonexistent/sd15 does not exist"),
        ({"offline": True}, "not in the local hub cache"),
    ],
)
def test_real_weights_fail_fast_with_a_clear_message(overrides, message):
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match=message):
        build_components(ModelConfig(preset="sd15", device="cpu", **overrides))
    assert time.monotonic() - start < 30  # never minutes of hub retries


@pytest.mark.timeout(60)
def test_a_folder_without_weights_is_named(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(
        WeightsNotFoundError, match=r"text encoder: .* does not hold loadable weights"
    ):
        build_components(
            ModelConfig(preset="sd15", device="cpu", base=str(tmp_path), controlnet=str(tmp_path))
        )


def test_sd15_random_has_sd15s_architecture():
    """Built on the meta device (no memory, <1 s): SD-1.5's published parameter counts."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from engine.models.registry import SD15_UNET, SD15_VAE

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        controlnet = ControlNetModel(cross_attention_dim=768)
        vae = AutoencoderKL(**SD15_VAE)
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in [("u", unet), ("v", vae)]}
    assert count == {"u": 859_520_964, "v": 83_653_863}
    assert 3.6e8 < sum(p.numel() for p in controlnet.parameters()) < 3.62e8
    assert unet.config.sample_size * 8 == 512 and controlnet.config.block_out_channels == (
        unet.config.block_out_channels
    )


def test_threads_auto_is_half_the_cores_at_least_one(monkeypatch):
    from engine.models.registry import cpu_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(2)))
    assert cpu_threads(ModelConfig(threads=0)) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)))
    assert cpu_threads(ModelConfig(threads=0)) == 8
    assert cpu_threads(ModelConfig(threads=3)) == 3
