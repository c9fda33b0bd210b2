"""The resident diffusion components, where they run (device, dtype), and their text
conditioning (SD-1.x and SDXL alike).

SD-1.x conditions its UNet and ControlNet on one tensor: the text encoder's hidden states
(B, 77, D). SDXL adds two inputs (``added_cond_kwargs``): the second text encoder's pooled
embedding ``text_embeds`` (B, P) and the micro-conditioning ``time_ids`` (B, 6) = (original
height, width, crop top, left, target height, width). So that every path which batches, indexes,
pads, caches or exports text rows carries SDXL's conditioning unchanged, the pooled embedding
rides as one extra token row of the text tensor (:func:`pack_pooled`: (B, 78, D), the pooled
vector in the first P channels of row 77, zeros after) and is split off where a model is called
(:func:`text_kwargs`). ``time_ids`` follow diffusers' pipeline defaults (no crop, original =
target = the frame's size) and are derived from the latent's size there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from engine.config import ConfigError, ModelConfig

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


SDXL_VAE_SCALE = 8
"""SDXL's VAE downsamples 8× (time_ids are in pixels; the UNet sees latents)."""


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
    text_encoder_2: CLIPTextModelWithProjection | None = None
    """SDXL: the OpenCLIP ViT-bigG text tower (penultimate hidden states + pooled projection)."""
    tokenizer_2: CLIPTokenizer | None = None
    """SDXL: ``text_encoder_2``'s tokenizer (CLIP's BPE, padded with ``!``)."""

    @property
    def vae_scale(self) -> int:
        """Pixel-to-latent downsampling factor (8 for SD)."""
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders and SDXL's added conditioning (``text_time``)."""
        return self.text_encoder_2 is not None

    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders (one for SD-1.x, two for SDXL), in conditioning order."""
        encoders: list[torch.nn.Module] = [self.text_encoder]
        return encoders + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])


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


def check_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """``model.dtype`` as a torch dtype, refused where the device cannot run it well.

    Raises:
        ConfigError: float16 on a CPU (measured 9-44x slower than float32 there, issue 17), or
            bfloat16 on a CUDA device without bf16 support; the message gives the setting to use.
    """
    if config.dtype == "float16" and device.type == "cpu":
        raise ConfigError(
            "model.dtype=float16 on a CPU runs 9-44x slower than float32 (no float16 kernels): "
            "set model.dtype=float32 (e.g. --set model.dtype=float32), or model.device=cuda"
        )
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if config.dtype == "bfloat16" and device.type == "cuda" and not cuda_bf16:
        raise ConfigError(
            f"model.dtype=bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 "
            "support; set model.dtype=float16"
        )
    return getattr(torch, config.dtype)


def activate_controlnet(controlnet: ControlNetModel, generator: torch.Generator) -> None:
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


def finish(parts: DiffusionComponents) -> DiffusionComponents:
    """Move every model of ``parts`` to its device, eval mode, frozen."""
    for module in (parts.unet, parts.controlnet, parts.vae, *parts.text_encoders()):
        module.to(parts.device)  # type: ignore[call-arg,arg-type]  # dtype set at build time
        module.eval()
        module.requires_grad_(False)
    return parts


def tokenize(parts: DiffusionComponents, texts: list[str]) -> torch.Tensor:
    """Token ids on ``parts.device``: (N, 77) for SD-1.x, (N, 2, 77) for SDXL (one row per
    tokenizer), each padded to its tokenizer's ``model_max_length`` and truncated."""
    tokenizers = [parts.tokenizer] + ([parts.tokenizer_2] if parts.tokenizer_2 else [])
    ids = [
        tok(
            texts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for tok in tokenizers
    ]
    stacked = ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)
    return stacked.to(parts.device)


def encode_ids(parts: DiffusionComponents, ids: torch.Tensor) -> torch.Tensor:
    """Text conditioning of :func:`tokenize`'s ids: SD-1.x the last hidden states (N, 77, D);
    SDXL both encoders' penultimate hidden states side by side (N, 77, 768 + 1280) with the
    pooled projection packed as row 77 (:func:`pack_pooled`), as diffusers' SDXL pipelines
    encode a prompt (``clip_skip=None``). Gradients flow (LoRA training of the text encoders)."""
    if parts.text_encoder_2 is None:
        return parts.text_encoder(ids)[0]
    first = parts.text_encoder(ids[:, 0], output_hidden_states=True)
    second = parts.text_encoder_2(ids[:, 1], output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return pack_pooled(hidden, second.text_embeds)


def pack_pooled(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, L, D) hidden states + (B, P) pooled embedding (P <= D) → (B, L + 1, D)."""
    if pooled.shape[-1] > hidden.shape[-1]:
        raise ValueError(f"pooled width {pooled.shape[-1]} exceeds text width {hidden.shape[-1]}")
    row = hidden.new_zeros((hidden.shape[0], 1, hidden.shape[-1]))
    row[:, 0, : pooled.shape[-1]] = pooled.to(hidden.dtype)
    return torch.cat([hidden, row], dim=1)


def uses_added_conditioning(model: Any) -> bool:
    """Whether a UNet / ControlNet takes SDXL's ``added_cond_kwargs`` (``text_time``)."""
    return getattr(model.config, "addition_embed_type", None) == "text_time"


def pooled_width(model: Any) -> int:
    """P of ``text_embeds``: the added embedding's input minus the time_ids' Fourier features."""
    config = model.config
    return int(config.projection_class_embeddings_input_dim) - 6 * int(
        config.addition_time_embed_dim
    )


def added_conditioning(
    model: Any, text: torch.Tensor, sample: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Split packed ``text`` for ``model``: (encoder_hidden_states, added_cond_kwargs or None).

    Args:
        model: the UNet or ControlNet about to be called.
        text: (B, 77, D), or (B, 78, D) packed by :func:`pack_pooled` for an SDXL model.
        sample: (B, C, h, w) latents of the call: time_ids = (8h, 8w, 0, 0, 8h, 8w).
    """
    if not uses_added_conditioning(model):
        return text, None
    h, w = (int(s) * SDXL_VAE_SCALE for s in sample.shape[2:])
    rows = text.shape[0]
    time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=text.dtype, device=text.device)
    pooled = text[:, -1, : pooled_width(model)]
    return text[:, :-1], {"text_embeds": pooled, "time_ids": time_ids.expand(rows, 6)}


def text_kwargs(model: Any, text: torch.Tensor, sample: torch.Tensor) -> dict[str, Any]:
    """The text keyword arguments of a diffusers UNet / ControlNet call on ``sample``:
    ``encoder_hidden_states`` (+ ``added_cond_kwargs`` for SDXL), from packed ``text``."""
    hidden, added = added_conditioning(model, text, sample)
    kwargs: dict[str, Any] = {"encoder_hidden_states": hidden}
    if added is not None:
        kwargs["added_cond_kwargs"] = added
    return kwargs


def added_embedding(model: Any, emb: torch.Tensor, added: dict[str, torch.Tensor] | None):
    """``emb`` plus the model's ``text_time`` embedding of ``added`` (what diffusers' forward
    adds to the timestep embedding), or ``emb`` for a model without one."""
    if added is None:
        return emb
    time = model.add_time_proj(added["time_ids"].flatten())
    time = time.reshape((added["text_embeds"].shape[0], -1))
    joined = torch.concat([added["text_embeds"], time], dim=-1).to(emb.dtype)
    return emb + model.add_embedding(joined)
