"""Model builders plus a registry (segment-anything style): ``MODEL_REGISTRY["tiny"](config)``.

``tiny`` and ``small`` are randomly initialised, architecturally faithful Stable Diffusion
components (CLIP text encoder, UNet2DConditionModel with cross-attention, OpenPose-style
ControlNet, 8× AutoencoderKL, DDIM scheduler with SD's beta schedule), seeded, built from configs
in code with no network. ``sd15`` loads the same classes from a hub id, a diffusers folder or a
single checkpoint file (:mod:`engine.models.real`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from engine.config import ModelConfig
from engine.models.components import (
    SD_SCHEDULER,
    DiffusionComponents,
    activate_controlnet,
    check_dtype,
    finish,
    resolve_device,
)
from engine.models.errors import WeightsNotFoundError
from engine.models.tokenizer import build_offline_tokenizer, clip_text_encoder

# Architectures of the random-weight presets. Same block types as SD-1.x, fewer channels.
_ARCH: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "heads": 4},
        "unet_channels": (32, 64),
        "layers_per_block": 1,
        "heads": (2, 4),
        "groups": 8,
        "cond_channels": (8, 16, 32, 32),
        "vae_channels": (16, 32, 32, 32),
    },
    "small": {
        "text": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "heads": 4},
        "unet_channels": (64, 128, 256),
        "layers_per_block": 2,
        "heads": (4, 8, 8),
        "groups": 32,
        "cond_channels": (16, 32, 64, 128),
        "vae_channels": (32, 64, 64, 64),
    },
}


__all__ = [
    "DiffusionComponents",
    "WeightsNotFoundError",
    "activate_controlnet",
    "check_dtype",
    "finish",
    "resolve_device",
]


def model_name(config: ModelConfig) -> str:
    """Provenance id of the components ``config`` builds (manifests, fingerprints); for real
    weights the loaded components' ``name`` carries content digests instead of paths."""
    if config.preset == "sd15":
        from engine.models.sources import weights_id

        return (
            f"sd15:{weights_id(config.base, 'base')}+{weights_id(config.controlnet, 'controlnet')}"
        )
    if config.preset == "micro":
        from engine.micro.arch import weights_digest

        return f"micro:{weights_digest()}"
    if config.preset == "sdxl":
        from engine.models.sources import weights_id

        return (
            f"sdxl:{weights_id(config.base, 'base')}+{weights_id(config.controlnet, 'controlnet')}"
        )
    if config.preset in ("sd15-random", "sdxl-random", "sdxl-tiny"):
        return f"{config.preset}-seed{config.seed}-{config.dtype}"
    return f"{config.preset}-random-seed{config.seed}"


RANDOM_PRESETS = tuple(_ARCH)
"""Presets built with random weights (the others load real weights)."""


def random_unet_kwargs(preset: str, in_channels: int = 4) -> dict[str, Any]:
    """UNet2DConditionModel arguments of a random preset: SD-1.x block types, fewer channels.

    Shared by the denoising UNet, the ControlNet (its down path) and the 9-channel inpainting UNet.
    """
    arch = _ARCH[preset]
    n = len(arch["unet_channels"])
    return {
        "block_out_channels": arch["unet_channels"],
        "down_block_types": ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        "layers_per_block": arch["layers_per_block"],
        "attention_head_dim": arch["heads"],
        "norm_num_groups": arch["groups"],
        "cross_attention_dim": arch["text"]["hidden_size"],
        "in_channels": in_channels,
        "out_channels": 4,
    }


def build_random(config: ModelConfig) -> DiffusionComponents:
    """Seeded random-weight SD components for ``config.preset`` in {"tiny", "small"}."""
    arch = _ARCH[config.preset]
    torch.manual_seed(config.seed)
    tokenizer = build_offline_tokenizer()
    text_encoder = _random_text_encoder(tokenizer, arch["text"])
    unet_kwargs = random_unet_kwargs(config.preset)
    unet = UNet2DConditionModel(**unet_kwargs)
    down_path = {
        k: v for k, v in unet_kwargs.items() if k not in ("up_block_types", "out_channels")
    }
    controlnet = ControlNetModel(
        **down_path, conditioning_embedding_out_channels=arch["cond_channels"]
    )
    generator = torch.Generator().manual_seed(config.seed + 1)
    activate_controlnet(controlnet, generator)
    vn = len(arch["vae_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vn,
        up_block_types=("UpDecoderBlock2D",) * vn,
        block_out_channels=arch["vae_channels"],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    return _random_parts(config, unet, controlnet, vae, text_encoder, tokenizer, torch.float32)


# SD-1.5's own architectures (the checkpoints' config.json files), for ``sd15-random``.
SD15_UNET = {"cross_attention_dim": 768, "sample_size": 64}
"""UNet2DConditionModel's defaults are SD-1.x's blocks (320/640/1280/1280, 2 layers, 8 heads)."""
SD15_VAE: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
SD15_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "heads": 12}
"""CLIP ViT-L/14's text tower."""


def build_sd15_random(config: ModelConfig) -> DiffusionComponents:
    """SD-1.5 UNet, OpenPose ControlNet (lllyasviel's: conditioning channels 16/32/96/256), VAE
    and CLIP ViT-L text encoder architectures with seeded random weights, in ``model.dtype``.

    Speed does not depend on weight values: this measures the real model's cost anywhere.
    """
    dtype = check_dtype(config, resolve_device(config.device))  # before building 1 GB of weights
    torch.manual_seed(config.seed)
    tokenizer = build_offline_tokenizer()
    text_encoder = _random_text_encoder(tokenizer, SD15_TEXT)
    unet = UNet2DConditionModel(**SD15_UNET)
    controlnet = ControlNetModel(cross_attention_dim=768)
    activate_controlnet(controlnet, torch.Generator().manual_seed(config.seed + 1))
    vae = AutoencoderKL(**SD15_VAE)
    for module in (unet, controlnet, vae, text_encoder) if dtype != torch.float32 else ():
        module.to(dtype)  # type: ignore[arg-type]  # transformers wraps .to; a dtype works
    return _random_parts(config, unet, controlnet, vae, text_encoder, tokenizer, dtype)


def _random_parts(
    config: ModelConfig,
    unet: UNet2DConditionModel,
    controlnet: ControlNetModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    dtype: torch.dtype,
) -> DiffusionComponents:
    """Random-weight models with SD's DDIM schedule, moved to ``model.device``."""
    return finish(
        DiffusionComponents(
            unet=unet,
            controlnet=controlnet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=DDIMScheduler.from_config(SD_SCHEDULER),
            device=resolve_device(config.device),
            dtype=dtype,
            name=model_name(config),
        )
    )


def _random_text_encoder(tokenizer: CLIPTokenizer, text: dict[str, int]) -> CLIPTextModel:
    """A random CLIP text encoder of the given width/depth over the offline tokenizer."""
    return clip_text_encoder(tokenizer, text)


def load_sd15(config: ModelConfig) -> DiffusionComponents:
    """Real SD-1.x + OpenPose ControlNet weights from hub ids, folders or single files
    (:mod:`engine.models.real`). The components' name carries the weights' content digests."""
    from engine.models.real import load_base, load_controlnet

    device = resolve_device(config.device)
    dtype = check_dtype(config, device)
    base = load_base(config, dtype)
    controlnet, control_digest = load_controlnet(config, dtype)
    parts = DiffusionComponents(
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        unet=base.unet,
        vae=base.vae,
        scheduler=base.scheduler,
        controlnet=controlnet,
        device=device,
        dtype=dtype,
        name=f"sd15:{base.digest[:16]}+{control_digest[:16]}",  # = model_name(config)
    )
    return finish(parts)


def load_micro(config: ModelConfig) -> DiffusionComponents:
    """The ``micro`` preset: the VAE, UNet, ControlNet and text encoder this project trained on
    procedural dancers (:mod:`engine.micro`; weights shipped in ``engine/micro/weights/``, float16
    on disk, float32 here)."""
    from engine.micro import arch

    states, meta = micro_weights()

    def load(module: torch.nn.Module, name: str) -> Any:
        module.load_state_dict(states[name])
        return module

    tokenizer = arch.build_tokenizer(meta.get("tokenizer", "offline"))
    parts = DiffusionComponents(
        unet=load(arch.build_unet(), "unet"),
        controlnet=load(arch.build_controlnet(), "controlnet"),
        vae=load(arch.build_vae(meta["scaling_factor"]), "vae"),
        text_encoder=load(arch.build_text_encoder(tokenizer), "text_encoder"),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_config(arch.SCHEDULER),
        device=resolve_device(config.device),
        dtype=torch.float32,
        name=model_name(config),
    )
    return finish(parts)


@functools.lru_cache(maxsize=1)
def micro_weights() -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The shipped micro weights (``{module: state}``, meta), read once per process."""
    from engine.micro import arch

    try:
        return arch.load_weights()
    except FileNotFoundError as e:
        raise WeightsNotFoundError(str(e)) from None


def _sdxl(config: ModelConfig) -> DiffusionComponents:
    from engine.models.sdxl import build_sdxl_random, load_sdxl

    return load_sdxl(config) if config.preset == "sdxl" else build_sdxl_random(config)


MODEL_REGISTRY: dict[str, Callable[[ModelConfig], DiffusionComponents]] = {
    "sdxl": _sdxl,
    "sdxl-random": _sdxl,
    "sdxl-tiny": _sdxl,
    "tiny": build_random,
    "small": build_random,
    "sd15": load_sd15,
    "sd15-random": build_sd15_random,
    "micro": load_micro,
}


def cpu_threads(config: ModelConfig) -> int:
    """``model.threads``, or for 0 (auto) half the cores this process may use, at least 1.

    torch's default (every core) collapses when other processes share them: measured on the
    2-core build machine with one core busy, see benchmarks/accel.py and README "Speed"."""
    if config.threads:
        return config.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // 2)


def build_components(config: ModelConfig) -> DiffusionComponents:
    """Build or load the components named by ``config.preset``; sets torch's CPU threads
    (``model.threads``) for this process first and records ``model.backend`` on them."""
    torch.set_num_threads(cpu_threads(config))
    parts = MODEL_REGISTRY[config.preset](config)
    parts.backend = config.backend
    return parts
