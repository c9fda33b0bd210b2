"""SDXL with an OpenPose ControlNet: the ``sdxl`` preset (real weights) and random-weight builds.

- ``sdxl``: SDXL base (two CLIP text encoders, ``text_time`` added conditioning) + an SDXL
  OpenPose ControlNet (thibaud/controlnet-openpose-sdxl-1.0, xinsir/controlnet-openpose-sdxl-1.0:
  diffusers folders), from hub ids, diffusers folders or one single-file SDXL checkpoint
  (``StableDiffusionXLPipeline.from_single_file`` against ``model.base_config`` or the configs
  shipped in ``configs/models/sdxl``); ControlNet single files against
  ``configs/models/sdxl-controlnet-openpose``.
- ``sdxl-random``: SDXL's real architectures (UNet 2.57 G parameters, ControlNet 1.25 G, text
  encoders 0.12 G + 0.69 G) with seeded random weights: the real model's cost on a GPU.
- ``sdxl-tiny``: the same block structure (two text encoders, pooled + time_ids conditioning,
  deeper transformer stacks at low resolution, linear projections) at toy widths, for CPU tests.

The conditioning (pooled embedding + time_ids) rides through the engine packed into the text
tensor (:mod:`engine.models.components`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from engine.config import ModelConfig
from engine.models.components import (
    SD_SCHEDULER,
    SDXL_VAE_SCALE,
    DiffusionComponents,
    activate_controlnet,
    check_dtype,
    finish,
    resolve_device,
)
from engine.models.errors import WeightsNotFoundError, first_line

SDXL_SCHEDULER = {**SD_SCHEDULER, "timestep_spacing": "leading"}
"""stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json's schedule (its class is Euler;
the chain steps it with DDIM like SD-1.x)."""

_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": _DOWN,
    "up_block_types": _UP,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
"""stable-diffusion-xl-base-1.0 unet/config.json (the values that differ from the defaults)."""

SDXL_VAE: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
SDXL_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "layers": 12, "heads": 12}
"""CLIP ViT-L/14's text tower (text_encoder/), quick_gelu."""
SDXL_TEXT_2 = {"hidden_size": 1280, "intermediate_size": 5120, "layers": 32, "heads": 20}
"""OpenCLIP ViT-bigG/14's text tower (text_encoder_2/), gelu, projection 1280."""
SDXL_CONTROL_EMBEDDING = (16, 32, 96, 256)

# sdxl-tiny: SDXL's structure at toy widths (text widths 32 + 64 → cross-attention 96).
TINY_UNET: dict[str, Any] = {
    **SDXL_UNET,
    "sample_size": 8,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "attention_head_dim": (2, 4, 4),
    "transformer_layers_per_block": (1, 1, 2),
    "cross_attention_dim": 96,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 64 + 6 * 8,
    "norm_num_groups": 8,
}
TINY_VAE: dict[str, Any] = {
    **SDXL_VAE,
    "block_out_channels": (16, 32, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 4}
TINY_TEXT_2 = {"hidden_size": 64, "intermediate_size": 128, "layers": 2, "heads": 4}
TINY_CONTROL_EMBEDDING = (8, 16, 32, 32)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sdxl-random": {
        "unet": SDXL_UNET,
        "vae": SDXL_VAE,
        "text": SDXL_TEXT,
        "text_2": SDXL_TEXT_2,
        "control": SDXL_CONTROL_EMBEDDING,
    },
    "sdxl-tiny": {
        "unet": TINY_UNET,
        "vae": TINY_VAE,
        "text": TINY_TEXT,
        "text_2": TINY_TEXT_2,
        "control": TINY_CONTROL_EMBEDDING,
    },
}


def text_config(arch: dict[str, int], vocab: int, second: bool) -> CLIPTextConfig:
    """The CLIP text config of one SDXL text tower (``second``: OpenCLIP bigG, gelu +
    projection); token ids as SDXL's config.json files have them (bos 0, eos 2, pad 1: the
    legacy values that make transformers pool at the highest id, the end-of-text token)."""
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["layers"],
        num_attention_heads=arch["heads"],
        max_position_embeddings=77,
        hidden_act="gelu" if second else "quick_gelu",
        projection_dim=arch["hidden_size"],
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def controlnet_kwargs(unet: dict[str, Any], control: tuple[int, ...]) -> dict[str, Any]:
    """ControlNetModel arguments of an SDXL ControlNet over ``unet``'s down path."""
    down = {k: v for k, v in unet.items() if k not in ("up_block_types", "out_channels")}
    down.pop("sample_size", None)
    return {**down, "conditioning_embedding_out_channels": control}


def second_tokenizer(tokenizer: CLIPTokenizer) -> CLIPTokenizer:
    """``tokenizer_2``: the same BPE, padded with ``!`` as SDXL's tokenizer_2 is."""
    second = copy.deepcopy(tokenizer)
    second.pad_token = "!"
    return second


def build_sdxl_random(config: ModelConfig) -> DiffusionComponents:
    """SDXL components of ``config.preset`` (``sdxl-random`` real sizes, ``sdxl-tiny`` toy
    widths) with seeded random weights, in ``model.dtype`` on ``model.device``."""
    from engine.models.tokenizer import build_offline_tokenizer

    arch = ARCHITECTURES[config.preset]
    device = resolve_device(config.device)
    dtype = check_dtype(config, device)
    torch.manual_seed(config.seed)
    tokenizer = build_offline_tokenizer()
    vocab = len(tokenizer)

    def cast(module: Any) -> Any:
        """To ``dtype`` as soon as it is built (no RNG drawn: the same weights as casting at the
        end), so the float32 copies never coexist: sdxl-random in bfloat16 peaks at ≈10 GB
        (the float32 UNet) instead of ≈19 GB."""
        return module.to(dtype) if dtype != torch.float32 else module

    text_encoder = cast(CLIPTextModel(text_config(arch["text"], vocab, second=False)))
    text_encoder_2 = cast(
        CLIPTextModelWithProjection(text_config(arch["text_2"], vocab, second=True))
    )
    unet = cast(UNet2DConditionModel(**arch["unet"]))
    controlnet = ControlNetModel(**controlnet_kwargs(arch["unet"], arch["control"]))
    activate_controlnet(controlnet, torch.Generator().manual_seed(config.seed + 1))
    controlnet = cast(controlnet)
    vae = cast(AutoencoderKL(**arch["vae"]))
    parts = DiffusionComponents(
        unet=unet,
        controlnet=controlnet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=second_tokenizer(tokenizer),
        scheduler=DDIMScheduler.from_config(SDXL_SCHEDULER),
        device=device,
        dtype=dtype,
        name=f"{config.preset}-seed{config.seed}-{config.dtype}",
    )
    return finish(parts)


def load_sdxl(config: ModelConfig) -> DiffusionComponents:
    """Real SDXL base + SDXL OpenPose ControlNet weights (hub ids, folders, single files)."""
    from engine.models.real import load_controlnet

    device = resolve_device(config.device)
    dtype = check_dtype(config, device)
    base = load_base_xl(config, dtype)
    controlnet, control_digest = load_controlnet(config, dtype, "sdxl-controlnet-openpose")
    if controlnet.config.cross_attention_dim != base["unet"].config.cross_attention_dim:
        raise WeightsNotFoundError(
            f"model.controlnet={config.controlnet!r} is not an SDXL ControlNet (cross-attention "
            f"{controlnet.config.cross_attention_dim}, SDXL's is "
            f"{base['unet'].config.cross_attention_dim}); use e.g. "
            "thibaud/controlnet-openpose-sdxl-1.0"
        )
    digest = base.pop("digest")
    parts = DiffusionComponents(
        **base,
        controlnet=controlnet,
        device=device,
        dtype=dtype,
        name=f"sdxl:{digest[:16]}+{control_digest[:16]}",
    )
    return finish(parts)


def load_base_xl(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """UNet, VAE, both text encoders and tokenizers, DDIM scheduler and digest of ``model.base``
    (an SDXL diffusers folder / hub id, or one single-file SDXL checkpoint)."""
    from engine.models.real import (
        check_tokenizer,
        check_variant,
        clip_tokenizer,
        config_folder,
        load_pretrained,
        local_source,
        variant_kw,
    )
    from engine.models.sources import content_digest

    source = local_source(config, "base", "SDXL checkpoint")
    check_variant(config, "base", source)
    path = Path(source.location)
    configs = config_folder(config, "base", "sdxl") if source.kind == "file" else path
    tokenizer = clip_tokenizer(configs)
    tokenizer_2 = second_tokenizer(clip_tokenizer(configs, "tokenizer_2"))
    if source.kind == "file":
        parts = _base_xl_from_file(path, configs, dtype, tokenizer, tokenizer_2)
    else:

        def load(cls: Any, sub: str, what: str) -> Any:
            kw = {"torch_dtype": dtype, **variant_kw(config, path / sub)}
            return load_pretrained(cls.from_pretrained, path / sub, what, **kw)

        parts = {
            "text_encoder": load(CLIPTextModel, "text_encoder", "text encoder"),
            "text_encoder_2": load(CLIPTextModelWithProjection, "text_encoder_2", "text encoder 2"),
            "unet": load(UNet2DConditionModel, "unet", "SDXL UNet"),
            "vae": load(AutoencoderKL, "vae", "VAE"),
        }
    check_tokenizer(tokenizer, parts["text_encoder"], path)
    check_tokenizer(tokenizer_2, parts["text_encoder_2"], path)
    if getattr(parts["unet"].config, "addition_embed_type", None) != "text_time":
        raise WeightsNotFoundError(
            f"model.base={config.base!r} is not an SDXL checkpoint (its UNet has no text_time "
            "conditioning); use model.preset=sd15 for SD-1.x checkpoints"
        )
    scale = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    if scale != SDXL_VAE_SCALE:
        raise WeightsNotFoundError(f"model.base={config.base!r}: its VAE downsamples {scale}x")
    scheduler = load_pretrained(DDIMScheduler.from_pretrained, configs / "scheduler", "scheduler")
    return {
        **parts,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
        "digest": content_digest(path),
    }


def _base_xl_from_file(
    path: Path,
    configs: Path,
    dtype: torch.dtype,
    tokenizer: CLIPTokenizer,
    tokenizer_2: CLIPTokenizer,
) -> dict[str, Any]:
    from diffusers import StableDiffusionXLPipeline

    try:
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(path),
            config=str(configs),
            local_files_only=True,
            torch_dtype=dtype,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
        )
    except Exception as e:  # diffusers raises many types for a file of another model
        raise WeightsNotFoundError(
            f"model.base={str(path)!r} is not an SDXL checkpoint loadable against the configs in "
            f"{configs} ({first_line(e)}); name an SDXL .safetensors, or set model.base_config to the "
            "diffusers folder of its architecture"
        ) from None
    return {
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": pipe.text_encoder_2,
        "unet": pipe.unet,
        "vae": pipe.vae,
    }
