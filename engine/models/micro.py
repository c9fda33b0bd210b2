"""The ``micro`` preset: a small SD-class model trained by this project on procedural dancers.

Weights ship in the package (``engine/micro/weights/``, float16 safetensors, loaded as float32);
the architectures are :mod:`engine.micro.arch` (diffusers' and transformers' own classes), the
training module :mod:`engine.micro.train`, and the training card ``engine/micro/weights/CARD.md``.
"""

from __future__ import annotations

import functools

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from engine.config import ModelConfig
from engine.micro import arch
from engine.models.registry import (
    DiffusionComponents,
    WeightsNotFoundError,
    _finish,
    model_name,
    resolve_device,
)


@functools.lru_cache(maxsize=1)
def _states() -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    try:
        return arch.load_weights()
    except FileNotFoundError as e:
        raise WeightsNotFoundError(str(e)) from None


def _load(module: torch.nn.Module, name: str) -> torch.nn.Module:
    states, _ = _states()
    module.load_state_dict(states[name])
    return module


def load_micro(config: ModelConfig) -> DiffusionComponents:
    """The trained micro VAE, UNet, ControlNet and text encoder, float32, on ``model.device``."""
    _, meta = _states()
    tokenizer = arch.build_tokenizer(meta.get("tokenizer", "offline"))
    parts = DiffusionComponents(
        unet=_load(arch.build_unet(), "unet"),  # type: ignore[arg-type]
        controlnet=_load(arch.build_controlnet(), "controlnet"),  # type: ignore[arg-type]
        vae=_load(arch.build_vae(meta["scaling_factor"]), "vae"),  # type: ignore[arg-type]
        text_encoder=_load(arch.build_text_encoder(tokenizer), "text_encoder"),  # type: ignore[arg-type]
        tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_config(arch.SCHEDULER),
        device=resolve_device(config.device),
        dtype=torch.float32,
        name=model_name(config),
    )
    return _finish(parts)


def load_micro_inpaint(config: ModelConfig, parts: DiffusionComponents) -> UNet2DConditionModel:
    """The trained 9-channel inpainting UNet of the plate."""
    return _load(arch.build_unet(9), "inpaint_unet")  # type: ignore[return-value]
