"""The SD inpainting UNet of the background plate, and a pipeline sharing the base components.

``tiny``/``small``: a seeded random ``UNet2DConditionModel`` with ``in_channels=9`` (4 noisy
latent + 1 mask + 4 masked-image latent channels, as SD inpainting) and otherwise the
architecture of the registry's random UNet of the same preset. ``sd15``: the inpainting UNet of
``model.inpaint`` (hub id, diffusers folder or single file), loaded fail-fast through
:func:`engine.models.real.load_inpaint`.

:func:`build_inpaint_pipeline` wraps that UNet in a :class:`StableDiffusionInpaintPipeline` whose
VAE, text encoder and tokenizer are the very objects of :class:`DiffusionComponents` (no second
copy in memory; SD-1.5 inpainting uses SD-1.5's VAE and text encoder).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

from engine.config import ModelConfig
from engine.models.registry import (
    RANDOM_PRESETS,
    SD15_UNET,
    DiffusionComponents,
    WeightsNotFoundError,
    random_unet_kwargs,
)

INPAINT_IN_CHANNELS = 9
"""Noisy latent (4) + mask (1) + masked-image latent (4)."""


def random_inpaint_unet(
    preset: str, seed: int, cross_attention_dim: int | None = None
) -> UNet2DConditionModel:
    """A seeded random 9-channel inpainting UNet with the registry's ``preset`` architecture.

    Args:
        preset: a random preset (:data:`~engine.models.registry.RANDOM_PRESETS`).
        seed: weight seed; the global torch RNG is left untouched.
        cross_attention_dim: text embedding width (default: the preset's text hidden size).
    """
    if preset not in RANDOM_PRESETS:
        raise ValueError(
            f"no random inpainting UNet for preset {preset!r}; use one of {list(RANDOM_PRESETS)}"
        )
    # The registry's UNet layout with 9 input channels (latent, mask, masked-image latent).
    kwargs = random_unet_kwargs(preset, INPAINT_IN_CHANNELS)
    if cross_attention_dim is not None:
        kwargs["cross_attention_dim"] = cross_attention_dim
    kwargs["sample_size"] = 64  # unused (height/width are always passed); the pipeline reads it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**kwargs)


def load_inpaint_unet(config: ModelConfig, dtype: torch.dtype) -> UNet2DConditionModel:
    """The ``unet`` of the SD inpainting checkpoint ``config.inpaint`` in ``dtype``.

    Raises:
        WeightsNotFoundError: at once, when the checkpoint is neither local nor reachable (names
            it and the ``model.inpaint`` field to change), or its UNet is not 9-channel.
    """
    from engine.models.real import load_inpaint

    xl = config.preset == "sdxl"
    unet = load_inpaint(config, dtype, "sdxl-inpainting" if xl else "sd15-inpainting")
    if unet.config.in_channels != INPAINT_IN_CHANNELS:
        raise WeightsNotFoundError(
            f"model.inpaint={config.inpaint!r}: its UNet has {unet.config.in_channels} input "
            f"channels, an inpainting UNet has {INPAINT_IN_CHANNELS}; point model.inpaint at an "
            "SD inpainting checkpoint (e.g. stable-diffusion-v1-5/stable-diffusion-inpainting)"
        )
    return unet


def _random_for(config: ModelConfig, parts: DiffusionComponents) -> UNet2DConditionModel:
    hidden = int(parts.text_encoder.config.hidden_size)
    return random_inpaint_unet(config.preset, config.seed + 2, hidden)


def _load_for(config: ModelConfig, parts: DiffusionComponents) -> UNet2DConditionModel:
    return load_inpaint_unet(config, parts.dtype)


def _sd15_random(config: ModelConfig, parts: DiffusionComponents) -> UNet2DConditionModel:
    """``sd15-random``: SD-1.5 inpainting's UNet architecture (9 input channels), seeded random."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 2)
        return UNet2DConditionModel(**SD15_UNET, in_channels=INPAINT_IN_CHANNELS)


INPAINT_REGISTRY: dict[str, Callable[[ModelConfig, DiffusionComponents], UNet2DConditionModel]] = {
    "tiny": _random_for,
    "small": _random_for,
    "sd15": _load_for,
    "sd15-random": _sd15_random,
    "micro": lambda config, parts: _micro_inpaint(config, parts),
    "sdxl": _load_for,
    "sdxl-tiny": lambda config, parts: random_xl_inpaint_unet(config),
    "sdxl-random": lambda config, parts: random_xl_inpaint_unet(config),
}


def random_xl_inpaint_unet(config: ModelConfig) -> UNet2DConditionModel:
    """A seeded random 9-channel UNet of the SDXL preset's architecture (as SDXL inpainting 0.1)."""
    from engine.models.sdxl import ARCHITECTURES

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 2)
        unet_kwargs = {**ARCHITECTURES[config.preset]["unet"], "in_channels": INPAINT_IN_CHANNELS}
        return UNet2DConditionModel(**unet_kwargs)


def _micro_inpaint(config: ModelConfig, parts: DiffusionComponents) -> UNet2DConditionModel:
    """The micro preset's trained 9-channel inpainting UNet (shipped with its weights)."""
    from engine.micro import arch
    from engine.models.registry import micro_weights

    unet = arch.build_unet(9)
    unet.load_state_dict(micro_weights()[0]["inpaint_unet"])
    return unet


def build_inpaint_unet(config: ModelConfig, parts: DiffusionComponents) -> UNet2DConditionModel:
    """The inpainting UNet of ``config.preset`` on ``parts``' device and dtype, eval, frozen."""
    unet = INPAINT_REGISTRY[config.preset](config, parts)
    if unet.dtype != parts.dtype:  # random presets are float32; sd15 loads in parts.dtype
        unet.to(dtype=parts.dtype)
    unet.to(device=parts.device)
    return unet.eval().requires_grad_(False)


def build_inpaint_pipeline(
    parts: DiffusionComponents, unet: UNet2DConditionModel
) -> StableDiffusionInpaintPipeline:
    """A :class:`StableDiffusionInpaintPipeline` from injected components.

    VAE, text encoder and tokenizer are ``parts``' own objects (shared, not copied); the scheduler
    is a fresh DDIM with ``parts.scheduler``'s config (the pipeline's timestep state never touches
    the frame chain's); no safety checker, no feature extractor; progress bar off.
    """
    scheduler = DDIMScheduler.from_config(parts.scheduler.config)
    if parts.text_encoder_2 is not None:  # SDXL: both text encoders, pooled + time_ids inside
        from diffusers import StableDiffusionXLInpaintPipeline

        pipe: Any = StableDiffusionXLInpaintPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            text_encoder_2=parts.text_encoder_2,
            tokenizer=parts.tokenizer,
            tokenizer_2=parts.tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            requires_aesthetics_score=False,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionInpaintPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_inpaint_pipeline(
    config: ModelConfig, parts: DiffusionComponents
) -> StableDiffusionInpaintPipeline:
    """:func:`build_inpaint_unet` + :func:`build_inpaint_pipeline` in one call."""
    return build_inpaint_pipeline(parts, build_inpaint_unet(config, parts))
