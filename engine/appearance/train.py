"""DreamBooth-style LoRA training of one character's appearance on its reference images.

The loop is the standard latent-diffusion one (diffusers' ``train_dreambooth_lora`` recipe):
encode each reference with the VAE once (posterior mean and std), then every step sample a
latent from the posterior, noise and a timestep from one seeded CPU generator, noise the latent
with the scheduler (``add_noise``), predict the noise with the UNet conditioned on the
identifier prompt, and minimise the MSE to the target (epsilon, or v for v-prediction models)
with AdamW over the LoRA parameters only. Optional DreamBooth prior preservation adds the same
loss on class images (identifier-free prompts), weighted by ``appearance.prior_weight``.

No ControlNet in training: the LoRA learns what the character looks like under its text prompt,
the pose comes from the ControlNet at render time (as for DreamBooth LoRAs used with ControlNet
pipelines). This keeps training half as expensive and the adapter independent of the poses.

The adapter is trained in place on the resident UNet (and text encoder) under a temporary name
and removed afterwards, so no model copy is made (sd15-friendly) and the models are left
exactly as they were, including any other loaded adapters and which one was active.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import get_peft_model_state_dict
from tqdm import tqdm

from engine.appearance.lora import (
    TEXT_TARGETS,
    UNET_TARGETS,
    add_lora,
    lora_config,
    lora_parameters,
    remove_lora,
    restore,
    snapshot,
)
from engine.config import AppearanceConfig
from engine.models.components import DiffusionComponents, encode_ids, text_kwargs, tokenize

TRAINING_ADAPTER = "appearance_training"
"""Temporary adapter name while training (removed afterwards)."""


@dataclass
class AdapterWeights:
    """A trained appearance LoRA, detached from any model (CPU float32 tensors)."""

    unet: dict[str, torch.Tensor]
    """UNet LoRA state dict, peft key format (``…attn1.to_q.lora_A.weight``, no adapter name)."""
    text_encoder: dict[str, torch.Tensor] | None
    """Text-encoder LoRA state dict (``appearance.train_text_encoder``), else None."""
    rank: int
    alpha: float
    target_modules: tuple[str, ...] = UNET_TARGETS
    text_target_modules: tuple[str, ...] = TEXT_TARGETS
    text_encoder_2: dict[str, torch.Tensor] | None = None
    """SDXL's second text encoder's LoRA state dict (an imported LoRA's ``lora_te2_…`` /
    ``text_encoder_2.…`` tensors), else None. Same rank and scaling as the other parts."""
    text_2_target_modules: tuple[str, ...] = ()
    losses: list[float] = field(default_factory=list)
    """Training loss of every optimizer step (instance + prior_weight × prior)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Provenance: base model, config, seed, prompts, created, … (written to adapter.json)."""

    def digest(self) -> str:
        """sha256 of the tensors (names, shapes, dtypes, bytes): equal digests = equal weights.
        (An adapter without ``text_encoder_2`` hashes as before that part existed.)"""
        h = hashlib.sha256()
        parts = [("unet", self.unet), ("text_encoder", self.text_encoder or {})]
        for prefix, state in [*parts, ("text_encoder_2", self.text_encoder_2 or {})]:
            for key in sorted(state):
                t = state[key].detach().cpu().contiguous()
                h.update(f"{prefix}.{key}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


@dataclass
class _Dataset:
    """Encoded training pairs: VAE posterior (N, 4, h, w) float32 and prompt token ids (N, 77)."""

    mean: torch.Tensor
    std: torch.Tensor
    ids: torch.Tensor
    embeddings: torch.Tensor | None
    """(N, 77, D) frozen text embeddings, or None when the text encoder trains."""


def _check_inputs(
    images: Sequence[np.ndarray], prompts: Sequence[str], config: AppearanceConfig, what: str
) -> None:
    if len(images) == 0 or len(images) != len(prompts):
        raise ValueError(
            f"{what}: got {len(images)} images and {len(prompts)} prompts; pass one prompt per "
            "image and at least one image"
        )
    side = config.resolution
    for i, image in enumerate(images):
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8):
            raise ValueError(f"{what}[{i}]: expected a uint8 numpy array, got {type(image)!r}")
        if image.shape != (side, side, 3):
            raise ValueError(
                f"{what}[{i}] has shape {image.shape}, expected ({side}, {side}, 3) for "
                f"appearance.resolution={side}; resize the image or change the resolution"
            )


@torch.no_grad()
def _encode(
    parts: DiffusionComponents, images: Sequence[np.ndarray], prompts: Sequence[str], text: bool
) -> _Dataset:
    """VAE posteriors (one image at a time: bounded memory) and tokenized prompts."""
    means, stds = [], []
    for image in images:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        x = x.to(parts.device, parts.dtype) / 127.5 - 1.0
        posterior = parts.vae.encode(x).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    ids = tokenize(parts, list(prompts))
    embeddings = None if text else encode_ids(parts, ids)
    return _Dataset(torch.cat(means), torch.cat(stds), ids, embeddings)


def _indices(n: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` indices into ``n`` items: a random permutation, repeated when batch > n."""
    perms = [torch.randperm(n, generator=generator) for _ in range(-(-batch // n))]
    return torch.cat(perms)[:batch]


def _rows(
    parts: DiffusionComponents, data: _Dataset, batch: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch: (noisy latents, timesteps, text embeddings, target), all on the device.

    Every random draw comes from ``gen`` (CPU), so the batch is identical on every run.
    """
    idx = _indices(len(data.ids), batch, gen).to(data.ids.device)
    mean, std = data.mean[idx], data.std[idx]
    eps_latent = torch.randn(mean.shape, generator=gen).to(mean.device)
    latents = (mean + std * eps_latent) * parts.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
    sched = parts.scheduler
    t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
    t = t.to(latents.device)
    noisy = sched.add_noise(latents, noise, t)
    if sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, t)
    else:
        target = noise
    cached = data.embeddings
    text = cached[idx] if cached is not None else encode_ids(parts, data.ids[idx])
    return noisy.to(parts.dtype), t, text.to(parts.dtype), target


def _loss(
    parts: DiffusionComponents,
    config: AppearanceConfig,
    data: _Dataset,
    prior: _Dataset | None,
    gen: torch.Generator,
) -> torch.Tensor:
    """Scalar float32 loss of one step: instance MSE (+ prior_weight × prior MSE), one forward."""
    rows = [_rows(parts, data, config.batch_size, gen)]
    if prior is not None:
        rows.append(_rows(parts, prior, config.batch_size, gen))
    noisy, t, text, target = (torch.cat(parts_) for parts_ in zip(*rows, strict=True))
    pred = parts.unet(noisy, t, return_dict=False, **text_kwargs(parts.unet, text, noisy))[0]
    errors = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    loss = errors[: config.batch_size].mean()
    if prior is not None:
        loss = loss + config.prior_weight * errors[config.batch_size :].mean()
    return loss


@contextmanager
def _training_adapter(
    parts: DiffusionComponents, config: AppearanceConfig
) -> Iterator[list[torch.nn.Parameter]]:
    """Add the temporary LoRA (seeded init), yield its float32 trainable parameters, then remove
    it and restore the models' previous adapter state (whatever happens in the block)."""
    modules: list[torch.nn.Module] = [parts.unet]
    targets = [UNET_TARGETS]
    if config.train_text_encoder:
        modules.append(parts.text_encoder)
        targets.append(TEXT_TARGETS)
    states = [snapshot(m) for m in modules]
    try:
        with torch.random.fork_rng(devices=[]):  # peft's gaussian init uses the global CPU RNG
            torch.manual_seed(config.seed)
            for module, target in zip(modules, targets, strict=True):
                add_lora(module, lora_config(config.rank, config.alpha, target), TRAINING_ADAPTER)
        params = []
        for module in modules:
            for p in lora_parameters(module, TRAINING_ADAPTER):
                p.data = p.data.float()  # fp32 master weights even for a float16 model
                p.requires_grad_(True)
                params.append(p)
        yield params
    finally:
        for module, state in zip(modules, states, strict=True):
            remove_lora(module, TRAINING_ADAPTER)
            restore(module, state)


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = get_peft_model_state_dict(module, adapter_name=TRAINING_ADAPTER)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def train_appearance_lora(
    components: DiffusionComponents,
    images: Sequence[np.ndarray],
    prompts: Sequence[str],
    config: AppearanceConfig,
    *,
    class_images: Sequence[np.ndarray] | None = None,
    class_prompts: Sequence[str] | None = None,
    progress: bool = False,
) -> AdapterWeights:
    """Train the character's LoRA on ``images`` (with their identifier ``prompts``).

    Args:
        components: Resident models; the UNet (and text encoder) get a temporary adapter that is
            removed before returning, so they are left exactly as they were.
        images: K references, (R, R, 3) uint8 RGB with R = ``config.resolution``.
        prompts: One prompt per image, containing the identifier.
        config: Rank, alpha, steps, learning rate, batch size, seed, prior preservation.
        class_images, class_prompts: Prior-preservation data (identifier-free prompts); needed
            when ``config.prior_preservation`` is on, ignored otherwise.
        progress: Show a tqdm bar.

    Returns:
        The adapter weights and the per-step losses. Bit-identical for identical inputs on one
        device (every random draw comes from CPU generators seeded with ``config.seed``).
    """
    _check_inputs(images, prompts, config, "images")
    if config.prior_preservation:
        if class_images is None or class_prompts is None:
            raise ValueError(
                "appearance.prior_preservation is on but no class_images/class_prompts were "
                "given: pass them (get_or_train_adapter synthesizes them) or set "
                "appearance.prior_preservation=false"
            )
        _check_inputs(class_images, class_prompts, config, "class_images")
    parts = components
    data = _encode(parts, images, prompts, config.train_text_encoder)
    prior = None
    if config.prior_preservation:
        assert class_images is not None and class_prompts is not None
        prior = _encode(parts, class_images, class_prompts, config.train_text_encoder)
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    with _training_adapter(parts, config) as params, torch.enable_grad():
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
        bar = tqdm(range(config.steps), disable=not progress, desc="appearance LoRA", unit="step")
        for _ in bar:
            loss = _loss(parts, config, data, prior, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        unet_state = _state_dict(parts.unet)
        text_state = _state_dict(parts.text_encoder) if config.train_text_encoder else None
    return AdapterWeights(
        unet=unet_state,
        text_encoder=text_state,
        rank=config.rank,
        alpha=config.alpha,
        losses=losses,
        metadata=_metadata(parts, config, prompts),
    )


def _metadata(
    parts: DiffusionComponents, config: AppearanceConfig, prompts: Sequence[str]
) -> dict[str, Any]:
    import diffusers
    import peft

    return {
        "base_model": parts.name,
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "prompts": list(prompts),
        "prediction_type": parts.scheduler.config.prediction_type,
        "controlnet_in_training": False,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
        },
    }
