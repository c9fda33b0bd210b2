"""The training stages of the micro preset (see :mod:`engine.micro.train`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from engine.micro import arch
from engine.micro.data import Pool
from engine.micro.loop import (
    Checkpoints,
    Clock,
    TrainConfig,
    _autocast,
    _optimizer,
    _pixels,
    train_loop,
)

Init = dict[str, dict[str, torch.Tensor]]
"""Initial weights per module (``--init``: continue from earlier weights), or empty."""


def _init(module: torch.nn.Module, name: str, init: Init) -> torch.nn.Module:
    if name in init:
        module.load_state_dict(init[name])
    return module


def train_vae(pool: Pool, cfg: TrainConfig, dev: torch.device, deadline: float,
              ckpts: Checkpoints, clock: Clock, init: Init) -> tuple[AutoencoderKL, dict[str, Any]]:  # fmt: skip
    """The 2× VAE on the posterior mode: L1 + MSE on figures and empty scenes."""
    vae: AutoencoderKL = _init(arch.build_vae(), "vae", init).to(dev).train()  # type: ignore[assignment]
    opt = _optimizer(vae.parameters(), cfg.lr["vae"], dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + 11)
    n, b = len(pool.images), cfg.batch["vae"]

    def step_fn(step: int) -> torch.Tensor:
        idx = torch.randint(n, (b,), generator=gen, device=gen.device)
        src = torch.where(
            (torch.arange(b, device=dev) % 4 == 0)[:, None, None, None],
            pool.scenes[idx],
            pool.images[idx],
        )
        x = _pixels(src, dev)
        with _autocast(dev):
            z = vae.encode(x).latent_dist.mode()
            rec = vae.decode(z).sample.float()
        return (rec - x).abs().mean() + ((rec - x) ** 2).mean() + 1e-6 * (z.float() ** 2).mean()

    log_ = train_loop("vae", step_fn, {"vae": vae}, opt, cfg, deadline, ckpts, clock)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # a point-mass posterior: sample() == mode() for every caller
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -30.0
    return vae, log_


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """(n, 3, H, W) uint8 → (n, 4, H/2, W/2) float32 unscaled latents (posterior mode), on dev."""
    out = []
    for chunk in x.split(512):
        with _autocast(dev):
            out.append(vae.encode(_pixels(chunk, dev)).latent_dist.mode().float())
    return torch.cat(out)


def psnr(vae: AutoencoderKL, images: torch.Tensor, dev: torch.device) -> float:
    """Mean PSNR (dB) of VAE reconstructions of uint8 ``images`` (in 0..255 after rounding)."""
    with torch.no_grad(), _autocast(dev):
        x = _pixels(images, dev)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
    a = ((x + 1) * 127.5).round()
    r = ((rec.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((a - r) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-3)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


def _text_ids(pool: Pool, idx: torch.Tensor, negatives: torch.Tensor, cfg: TrainConfig,
              gen: torch.Generator, main: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(B, 77) ids per row: an unconditional text (share ``cfg.uncond``), else ``main`` when
    given (e.g. background prompts), else the refined prompt (``cfg.refined``) or the caption."""
    dev = pool.caption_ids.device
    r = torch.rand(len(idx), generator=gen, device=gen.device).to(dev)
    if main is None:
        refined = (r < cfg.uncond + cfg.refined)[:, None]
        main = torch.where(refined, pool.refined_ids[idx], pool.caption_ids[idx])
    neg = negatives[
        torch.randint(len(negatives), (len(idx),), generator=gen, device=gen.device)
    ].to(dev)
    return torch.where((r < cfg.uncond)[:, None], neg, main)


class VTarget:
    """v-prediction targets and min-SNR weights from the scheduler's ᾱ_t."""

    def __init__(self, dev: torch.device, min_snr: float):
        a = torch.tensor(_alphas_cumprod(), dtype=torch.float32, device=dev)
        self.a, self.min_snr = a, min_snr

    def __call__(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):  # type: ignore[no-untyped-def]
        a = self.a[t][:, None, None, None]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * z0
        snr = self.a[t] / (1 - self.a[t])
        return zt, v, snr.clamp(max=self.min_snr) / (snr + 1)


def training_noise(shape: tuple[int, ...], gen: torch.Generator, offset: float) -> torch.Tensor:
    """Gaussian noise of ``shape`` (B, C, H, W) plus, when ``offset`` > 0, one N(0, offset²)
    constant per sample and channel (offset noise), so the model learns to move an image's mean
    away from the mean of its starting noise. Drawn on ``gen``'s device."""
    noise = torch.randn(shape, generator=gen, device=gen.device)
    if offset > 0:
        noise = noise + offset * torch.randn(*shape[:2], 1, 1, generator=gen, device=gen.device)
    return noise


def _alphas_cumprod() -> list[float]:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(arch.SCHEDULER).alphas_cumprod.tolist()


def train_unet(pool: Pool, latents: torch.Tensor, cfg: TrainConfig, dev: torch.device,
               deadline: float, ckpts: Checkpoints, clock: Clock,
               negatives: torch.Tensor, init: Init) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:  # fmt: skip
    """UNet + ControlNet + text encoder (from nothing or ``init``); returns their EMA copies."""
    from engine.micro.data import _tokenizer

    torch.manual_seed(cfg.seed + 21)
    modules: dict[str, torch.nn.Module] = {
        "unet": arch.build_unet(),
        "controlnet": arch.build_controlnet(),
        "text_encoder": arch.build_text_encoder(_tokenizer()),
    }
    for name, m in modules.items():
        _init(m, name, init).to(dev).train()
    ema = {k: _frozen_copy(m) for k, m in modules.items()}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = _optimizer(params, cfg.lr["unet"], dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + 22)
    target = VTarget(dev, cfg.min_snr)
    n, b = len(latents), cfg.batch["unet"]
    unet, cn, te = modules["unet"], modules["controlnet"], modules["text_encoder"]

    def step_fn(step: int) -> torch.Tensor:
        idx = torch.randint(n, (b,), generator=gen, device=gen.device)
        ids = _text_ids(pool, idx, negatives, cfg, gen).to(dev)
        z0 = latents[idx.to(latents.device)]
        noise = training_noise(tuple(z0.shape), gen, cfg.offset_noise).to(dev)
        t = torch.randint(1000, (b,), generator=gen, device=gen.device).to(dev)
        zt, v, w = target(z0, noise, t)
        pose = pool.poses[idx].to(dev).float() / 255.0
        with _autocast(dev):
            emb = te(ids)[0]
            down, mid = cn(zt, t, encoder_hidden_states=emb, controlnet_cond=pose,
                           return_dict=False)  # fmt: skip
            pred = unet(zt, t, emb, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample  # fmt: skip
        return (w * ((pred.float() - v) ** 2).mean(dim=(1, 2, 3))).mean()

    log_ = train_loop("unet", step_fn, modules, opt, cfg, deadline, ckpts, clock, ema=ema)
    return ema, log_


def _frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).eval().requires_grad_(False)


def train_inpaint(pool: Pool, vae: AutoencoderKL, text_encoder: torch.nn.Module,
                  unet: torch.nn.Module, scale: float, cfg: TrainConfig, dev: torch.device,
                  deadline: float, ckpts: Checkpoints, clock: Clock,
                  negatives: torch.Tensor, init: Init) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    """The 9-channel inpainting UNet, started from ``init`` or from ``unet`` (its extra input
    channels zero)."""
    inpaint = arch.build_unet(9)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, w.new_zeros((w.shape[0], 5, *w.shape[2:]))], dim=1)
    inpaint.load_state_dict(init.get("inpaint_unet", state))
    inpaint.to(dev).train()
    ema = {"inpaint_unet": _frozen_copy(inpaint)}
    opt = _optimizer(inpaint.parameters(), cfg.lr["inpaint"], dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + 31)
    target = VTarget(dev, cfg.min_snr)
    n, b = len(pool.images), cfg.batch["inpaint"]
    size = pool.images.shape[-1]
    kernel = torch.ones(1, 1, 7, 7, device=dev)

    def step_fn(step: int) -> torch.Tensor:
        idx = torch.randint(n, (b,), generator=gen, device=gen.device)
        remove = (torch.rand(b, generator=gen, device=gen.device) < 0.7).to(dev)
        figure = pool.masks[idx].to(dev).float()
        grown = (F.conv2d(figure, kernel, padding=3) > 0).float()  # dilated by 3 px
        rect = _random_rects(b, size, gen).to(dev)
        mask = torch.where(remove[:, None, None, None], grown, rect)
        image = _pixels(pool.images[idx], dev)
        clean = torch.where(remove[:, None, None, None], _pixels(pool.scenes[idx], dev), image)
        masked = image * (mask < 0.5)
        ids = _text_ids(pool, idx, negatives, cfg, gen).to(dev)
        bg_ids = _text_ids(pool, idx, negatives, cfg, gen, main=pool.background_ids[idx]).to(dev)
        ids = torch.where(remove[:, None], bg_ids, ids)
        with torch.no_grad(), _autocast(dev):
            z0 = vae.encode(clean).latent_dist.mode().float() * scale
            zm = vae.encode(masked).latent_dist.mode().float() * scale
            emb = text_encoder(ids)[0]
        noise = torch.randn(z0.shape, generator=gen, device=gen.device).to(dev)
        t = torch.randint(1000, (b,), generator=gen, device=gen.device).to(dev)
        zt, v, w = target(z0, noise, t)
        m = F.interpolate(mask, size=zt.shape[-2:])
        with _autocast(dev):
            pred = inpaint(torch.cat([zt, m, zm], dim=1), t, emb).sample
        return (w * ((pred.float() - v) ** 2).mean(dim=(1, 2, 3))).mean()

    log_ = train_loop("inpaint", step_fn, {"inpaint_unet": inpaint}, opt, cfg, deadline, ckpts,
                      clock, ema=ema)  # fmt: skip
    return ema["inpaint_unet"], log_


def _random_rects(b: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(b, 1, size, size) float masks, one random rectangle (10–60 % of the side) each."""
    lo = torch.randint(0, size // 2, (b, 2), generator=gen, device=gen.device)
    ext = (torch.rand(b, 2, generator=gen, device=gen.device) * 0.5 + 0.1) * size
    hi = (lo + ext).clamp(max=size)
    ys = torch.arange(size, device=gen.device)[None, :, None]
    xs = torch.arange(size, device=gen.device)[None, None, :]
    rows = (ys >= lo[:, 0, None, None]) & (ys < hi[:, 0, None, None])
    inside = rows & (xs >= lo[:, 1, None, None]) & (xs < hi[:, 1, None, None])
    return inside[:, None].float()


def train_segmenter(pool: Pool, cfg: TrainConfig, dev: torch.device, deadline: float,
                    ckpts: Checkpoints, clock: Clock, init: Init) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    """The metrics' figure segmenter: BCE on ground-truth masks, with colour jitter and blur so
    it also reads the slightly soft frames a diffusion model draws."""
    seg = _init(arch.build_segmenter(), "segmenter", init).to(dev).train()
    opt = _optimizer(seg.parameters(), cfg.lr["segmenter"], dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + 41)
    n, b = len(pool.images), cfg.batch["segmenter"]
    blur = torch.tensor([1.0, 2.0, 1.0])
    blur = (blur[:, None] * blur[None, :] / 16).expand(3, 1, 3, 3).contiguous().to(dev)

    def step_fn(step: int) -> torch.Tensor:
        idx = torch.randint(n, (b,), generator=gen, device=gen.device)
        x = pool.images[idx].to(dev).float() / 255.0
        soft = (torch.rand(b, 1, 1, 1, generator=gen, device=gen.device) < 0.5).to(dev)
        x = torch.where(soft, F.conv2d(x, blur, padding=1, groups=3), x)
        x = (x + (torch.randn(b, 3, 1, 1, generator=gen, device=gen.device) * 0.03).to(dev)).clamp(
            0, 1
        )
        y = pool.masks[idx].to(dev).float()
        return F.binary_cross_entropy_with_logits(seg(x), y)

    log_ = train_loop("segmenter", step_fn, {"segmenter": seg}, opt, cfg, deadline, ckpts, clock)
    return seg.eval().requires_grad_(False), log_
