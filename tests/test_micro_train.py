"""The micro preset's training module: a few steps from nothing lower the loss, checkpoints resume,
and a text encoder moves to the micro vocabulary keeping what it learned."""

from __future__ import annotations

import time

import pytest
import torch

from engine.micro import arch
from engine.micro.data import _refined, build_pool, negative_bank
from engine.micro.loop import Checkpoints, Clock, TrainConfig
from engine.micro.stages import VTarget, encode_pool, train_unet, train_vae, training_noise

SIZE = 32
"""Frames of the tests: the architectures are fully convolutional; 32² keeps CPU steps cheap."""


@pytest.fixture(scope="module")
def pool():  # type: ignore[no-untyped-def]
    return build_pool(seed=0, n=64, size=SIZE, workers=1)


def _cfg(**steps: int) -> TrainConfig:
    cfg = TrainConfig(device="cpu", log_every=4, warmup=5, ckpt_every_s=1e9)
    cfg.steps.update(steps)
    cfg.batch.update({"vae": 4, "unet": 8})
    return cfg


def _drop(curve: list[list[float]]) -> tuple[float, float]:
    """Mean loss of the first two and of the last two points of a loss curve."""
    first = sum(p[2] for p in curve[:2]) / 2
    last = sum(p[2] for p in curve[-2:]) / 2
    return first, last


def test_the_pool_is_deterministic_and_tokenized(pool) -> None:  # type: ignore[no-untyped-def]
    again = build_pool(seed=0, n=8, size=SIZE, workers=1)
    assert torch.equal(again.images, pool.images[:8])
    assert torch.equal(again.poses, pool.poses[:8])
    tok = arch.build_tokenizer()
    for caption in pool.captions[:16]:  # refined prompts fit the 77-token window whole
        full, background = _refined(caption)
        assert len(tok(full).input_ids) <= 77, full
        assert len(tok(background).input_ids) <= 77, background


@torch.no_grad()
def _unet_loss(nets: dict[str, torch.nn.Module], pool, latents: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    """The weighted v-prediction loss on one fixed batch (fixed rows, timesteps and noise)."""
    gen = torch.Generator().manual_seed(5)
    idx = torch.arange(16)
    t = torch.linspace(0, 999, 16).long()
    z0 = latents[idx]
    zt, v, w = VTarget(torch.device("cpu"), 5.0)(z0, torch.randn(z0.shape, generator=gen), t)
    emb = nets["text_encoder"](pool.caption_ids[idx])[0]
    down, mid = nets["controlnet"](zt, t, encoder_hidden_states=emb,
                                   controlnet_cond=pool.poses[idx].float() / 255, return_dict=False)  # fmt: skip
    pred = nets["unet"](zt, t, emb, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample  # fmt: skip
    return float((w * ((pred - v) ** 2).mean(dim=(1, 2, 3))).mean())


def test_vae_and_unet_losses_fall_from_nothing(pool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(vae=16, unet=30)
    clock, ckpts, cpu = Clock(1e9), Checkpoints(tmp_path, resume=False), torch.device("cpu")
    far = time.monotonic() + 1e9
    torch.manual_seed(0)
    _, log = train_vae(pool, cfg, cpu, far, ckpts, clock, {})
    first, last = _drop(log["curve"])
    assert last < 0.8 * first, log["curve"]  # reconstruction loss (L1 + MSE) falls
    latents = encode_pool(arch.build_vae(), pool.images, cpu)  # any fixed latents will do
    latents = latents / latents.std()
    torch.manual_seed(cfg.seed + 21)  # what train_unet seeds before building its modules
    start = {"unet": arch.build_unet(), "controlnet": arch.build_controlnet(),
             "text_encoder": arch.build_text_encoder(arch.build_tokenizer())}  # fmt: skip
    before = _unet_loss({k: m.eval() for k, m in start.items()}, pool, latents)
    trained, _ = train_unet(pool, latents, cfg, cpu, far, ckpts, clock, negative_bank(0), {})
    after = _unet_loss(trained, pool, latents)
    # measured: 0.288 → 0.164 after 30 steps of batch 8 (this CPU)
    assert after < 0.8 * before, (before, after)


def test_a_stage_resumes_from_its_checkpoint(pool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    far = time.monotonic() + 1e9
    cfg = _cfg(vae=4)
    cfg.ckpt_every_s = 0.0  # checkpoint after every step
    _, first = train_vae(pool, cfg, torch.device("cpu"), far, Checkpoints(tmp_path, False),
                         Clock(1e9), {})  # fmt: skip
    assert (tmp_path / "ckpt" / "vae.latest.pt").is_file()
    cfg.steps["vae"] = 8
    _, resumed = train_vae(pool, cfg, torch.device("cpu"), far, Checkpoints(tmp_path, True),
                           Clock(1e9), {})  # fmt: skip
    assert first["steps"] == 4 and resumed["steps"] == 8
    assert resumed["curve"][0] == first["curve"][0]  # the curve goes on, not restarts


def test_text_encoder_moves_to_the_micro_vocabulary() -> None:
    old, new = arch.build_tokenizer("offline"), arch.build_tokenizer("micro")
    assert len(new) > len(old) and new.eos_token_id == old.eos_token_id
    torch.manual_seed(0)
    state = arch.build_text_encoder(old).state_dict()
    grown = arch.extend_text_encoder(state, old, new)
    key = "embeddings.token_embedding.weight"
    assert torch.equal(grown[key][: len(old)], state[key])
    word = new.convert_tokens_to_ids("turquoise")
    pieces = old("turquoise", add_special_tokens=False).input_ids
    assert torch.allclose(grown[key][word], state[key][pieces].mean(dim=0))
    model = arch.build_text_encoder(new)
    model.load_state_dict(grown)  # loads: the shapes match the micro vocabulary


def test_offset_noise_adds_one_constant_per_sample_and_channel() -> None:
    shape = (512, 4, 16, 16)
    plain = training_noise(shape, torch.Generator().manual_seed(3), 0.0)
    offset = training_noise(shape, torch.Generator().manual_seed(3), 0.1)
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    shift = offset - plain  # the same base noise plus a constant per (sample, channel)
    assert float((shift - shift[:, :, :1, :1]).abs().max()) < 1e-6
    # the constants are N(0, 0.1²): std of 2,048 draws within 10 % (standard error 1.6 %)
    assert abs(float(shift[:, :, 0, 0].std()) - 0.1) < 0.01
    # so an image's mean is no longer fixed by its noise: the spatial means' std grows from
    # 1/16 (plain noise, 256 pixels) to sqrt(1/256 + 0.01)
    assert abs(float(plain.mean(dim=(2, 3)).std()) - 1 / 16) < 0.1 / 16
    assert abs(float(offset.mean(dim=(2, 3)).std()) - (1 / 256 + 0.01) ** 0.5) < 0.012


def test_the_unet_stage_draws_its_noise_with_the_cli_offset(pool, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engine.micro import stages, train

    runs: list[TrainConfig] = []
    monkeypatch.setattr(train, "run", lambda cfg, out, **_: runs.append(cfg))
    train.main(["--out", str(tmp_path), "--offset-noise", "0.1"])
    assert runs[0].offset_noise == 0.1 and TrainConfig().offset_noise == 0.0
    seen: list[float] = []
    real = stages.training_noise

    def spy(shape, gen, offset):  # type: ignore[no-untyped-def]
        seen.append(offset)
        return real(shape, gen, offset)

    monkeypatch.setattr(stages, "training_noise", spy)
    cfg = _cfg(unet=2)
    cfg.offset_noise = runs[0].offset_noise
    latents = torch.randn(len(pool.images), 4, SIZE // 2, SIZE // 2)
    train_unet(pool, latents, cfg, torch.device("cpu"), time.monotonic() + 1e9,
               Checkpoints(tmp_path, False), Clock(1e9), negative_bank(0), {})  # fmt: skip
    assert seen == [0.1, 0.1]  # one draw per step, with the offset
