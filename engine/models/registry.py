"""Model builders plus a registry (segment-anything style): ``MODEL_REGISTRY["tiny"](config)``.

``tiny`` and ``small`` are randomly initialised, architecturally faithful Stable Diffusion
components (CLIP text encoder, UNet2DConditionModel with cross-attention, OpenPose-style
ControlNet, 8× AutoencoderKL, DDIM scheduler with SD's beta schedule), seeded, built from configs
in code with no network. ``sd15`` loads the same classes from a hub id or a local directory.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from engine.config import ModelConfig
from engine.models.tokenizer import build_offline_tokenizer

# Stable Diffusion 1.x noise schedule (scheduler_config.json of the SD-1.5 checkpoint).
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


class WeightsNotFoundError(RuntimeError):
    """Real weights could not be found locally or fetched; the message names them and the fix."""


@dataclass
class DiffusionComponents:
    """The resident models of the frame chain, on one device and dtype."""

    unet: UNet2DConditionModel
    controlnet: ControlNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    device: torch.device
    dtype: torch.dtype
    name: str
    """Provenance: the preset and the weights' ids (recorded in manifests and cache keys)."""
    backend: str = "eager"
    """``model.backend``: how the denoise step runs (engine/accel, :func:`engine.accel.step_for`)."""

    @property
    def vae_scale(self) -> int:
        """Pixel-to-latent downsampling factor (8 for SD)."""
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))


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


def model_name(config: ModelConfig) -> str:
    """Provenance id of the components ``config`` builds (manifests, cache keys, fingerprints)."""
    if config.preset == "sd15":
        return f"sd15:{config.base}+{config.controlnet}"
    if config.preset == "micro":
        from engine.micro.arch import weights_digest

        return f"micro:{weights_digest()}"
    if config.preset == "sd15-random":
        return f"sd15-random-seed{config.seed}-{config.dtype}"
    return f"{config.preset}-random-seed{config.seed}"


def resolve_device(spec: str) -> torch.device:
    """``auto`` → cuda if available, else cpu; otherwise ``torch.device(spec)``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"model.device={spec!r} but no CUDA device is available; use model.device=cpu"
        )
    return device


def _activate_controlnet(controlnet: ControlNetModel, generator: torch.Generator) -> None:
    """Make a random ControlNet respond to the pose like a trained one.

    A fresh ControlNetModel has zero-initialised output convs (its residuals are exactly 0), and
    with default init the thin skeleton lines of a pose map fade to nothing in the conditioning
    embedding's stride-2 convs. So: random weights for the zero convs, conditioning-embedding
    biases zeroed (a blank pose map gives no pose signal) and its hidden convs amplified 3×.
    Measured on tiny (3 steps, 64²): two different poses change the frame by ≈12 grey levels
    (mean |Δ|) instead of ≈0.01 without this.
    """
    cond = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
        for conv in [cond.conv_in, *cond.blocks]:
            conv.weight.mul_(3.0)
            conv.bias.zero_()
        cond.conv_out.weight.copy_(torch.randn(cond.conv_out.weight.shape, generator=generator))
        cond.conv_out.bias.zero_()


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
    _activate_controlnet(controlnet, generator)
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
    torch.manual_seed(config.seed)
    tokenizer = build_offline_tokenizer()
    text_encoder = _random_text_encoder(tokenizer, SD15_TEXT)
    unet = UNet2DConditionModel(**SD15_UNET)
    controlnet = ControlNetModel(cross_attention_dim=768)
    _activate_controlnet(controlnet, torch.Generator().manual_seed(config.seed + 1))
    vae = AutoencoderKL(**SD15_VAE)
    dtype = getattr(torch, config.dtype)
    for module in (unet, controlnet, vae, text_encoder) if dtype != torch.float32 else ():
        module.to(dtype)
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
    return _finish(
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
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["heads"],
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _finish(parts: DiffusionComponents) -> DiffusionComponents:
    for module in (parts.unet, parts.controlnet, parts.vae, parts.text_encoder):
        module.to(parts.device)  # type: ignore[call-arg,arg-type]  # dtype set at build time
        module.eval()
        module.requires_grad_(False)
    return parts


# What a checkpoint download fetches: configs, tokenizer files and safetensors weights only.
_IGNORE = ["*.ckpt", "*.bin", "*.pt", "*.pth", "*fp16*", "*non_ema*", "*.msgpack", "*.onnx", "*.h5"]
_IGNORE += ["safety_checker/*", "feature_extractor/*"]


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick TCP connect to the hub endpoint (huggingface_hub otherwise retries for minutes)."""
    host = urlparse(hf_constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def local_weights(repo: str, what: str, field: str, offline: bool) -> Path:
    """A local directory holding ``repo``: itself, the hub cache, or a fresh download.

    Raises :class:`WeightsNotFoundError` at once (no minutes of retries) when the weights are
    neither local nor reachable, naming the weights and the config field to change.
    """
    local = Path(repo).expanduser()
    if local.is_dir():
        return local
    fix = (
        f"Fetch them where the hub is reachable (`hf download {repo}`) and set model.{field} to "
        "that directory, or use the random-weight preset 'tiny' for a dry run."
    )
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise WeightsNotFoundError(
            f"{what}: {repo!r} is neither an existing directory nor a hub id (owner/name). {fix}"
        )
    try:
        return Path(snapshot_download(repo, local_files_only=True, ignore_patterns=_IGNORE))
    except Exception:  # not cached; huggingface_hub raises several types here
        pass
    if offline:
        raise WeightsNotFoundError(
            f"{what}: {repo!r} is not in the local hub cache (offline). {fix}"
        )
    if not _hub_reachable():
        raise WeightsNotFoundError(
            f"{what}: {repo!r} is not cached and {hf_constants.ENDPOINT} is unreachable. {fix}"
        )
    try:
        return Path(snapshot_download(repo, ignore_patterns=_IGNORE))
    except Exception as e:
        raise WeightsNotFoundError(f"{what}: downloading {repo!r} failed ({e}). {fix}") from None


def load_pretrained(loader: Callable[..., Any], folder: Path, what: str, **kw: Any) -> Any:
    """``loader(folder)`` from local files only; any failure → :class:`WeightsNotFoundError`."""
    try:
        return loader(str(folder), local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        raise WeightsNotFoundError(
            f"{what}: {folder} does not hold loadable weights ({str(e).splitlines()[0][:300]})"
        ) from None


def load_sd15(config: ModelConfig) -> DiffusionComponents:
    """Real SD-1.x + OpenPose ControlNet weights from hub ids or local directories."""
    device = resolve_device(config.device)
    dtype = getattr(torch, config.dtype)
    offline = config.offline or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    base = local_weights(config.base, "SD-1.x checkpoint", "base", offline)
    control = local_weights(config.controlnet, "OpenPose ControlNet", "controlnet", offline)
    weights = {"torch_dtype": dtype}
    tokenizer = load_pretrained(CLIPTokenizer.from_pretrained, base / "tokenizer", "tokenizer")
    if len(tokenizer) < 1000:  # transformers builds an empty tokenizer from a folder without vocab
        raise WeightsNotFoundError(f"tokenizer: {base / 'tokenizer'} holds no CLIP vocabulary")
    parts = DiffusionComponents(
        tokenizer=tokenizer,
        text_encoder=load_pretrained(
            CLIPTextModel.from_pretrained, base / "text_encoder", "text encoder", **weights
        ),
        unet=load_pretrained(
            UNet2DConditionModel.from_pretrained, base / "unet", "UNet", **weights
        ),
        vae=load_pretrained(AutoencoderKL.from_pretrained, base / "vae", "VAE", **weights),
        scheduler=load_pretrained(DDIMScheduler.from_pretrained, base / "scheduler", "scheduler"),
        controlnet=load_pretrained(
            ControlNetModel.from_pretrained, control, "OpenPose ControlNet", **weights
        ),
        device=device,
        dtype=dtype,
        name=model_name(config),
    )
    return _finish(parts)


MODEL_REGISTRY: dict[str, Callable[[ModelConfig], DiffusionComponents]] = {
    "tiny": build_random,
    "small": build_random,
    "sd15": load_sd15,
    "sd15-random": build_sd15_random,
    "micro": lambda config: _micro().load_micro(config),
}


def _micro():  # type: ignore[no-untyped-def]
    from engine.models import micro  # imports this module: loaded on first use

    return micro


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
