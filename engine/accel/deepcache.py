"""DeepCache (Ma et al., CVPR 2024) for the ControlNet + UNet step: reuse the deep features.

Adjacent denoising steps change the UNet's deep, low-resolution features little. At a *key* step
(``sampler.deep_cache = N``: the first step of a batch and every N-th after it) the whole step
runs and the input of the UNet's last up block — everything the deep branch contributes — is
kept per row. At the other steps only the shallow branch runs, at full resolution:

- ControlNet: ``conv_in`` + the pose embedding, down block 0 and the zero convolutions of the
  skips the last up block takes (its deeper residuals would only feed the skipped blocks);
- UNet: ``conv_in``, down block 0, then the last up block on the kept deep features with the
  fresh skips (+ the ControlNet residuals, times each row's scale), and the output head.

The pose therefore still steers every step through the shallow ControlNet residuals, and the
cross-frame attention and per-row LoRA of that branch run as usual (the same modules). The
risk DeepCache's users report with ControlNet is pose fidelity; README "Speed" has what was
measured, and why it is opt-in. The eager step only: the compiled graphs run the whole UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.models.components import added_conditioning, added_embedding


@dataclass
class DeepFeatures:
    """The deep-feature exchange of one step: ``reuse`` (B, C, h, w) to run the shallow branch on,
    or None for a key step, after which :attr:`kept` holds the features to reuse."""

    reuse: torch.Tensor | None = None
    kept: torch.Tensor | None = None


def check_supported(unet: Any, controlnet: Any) -> None:
    """Raise ValueError unless the shallow branch below reproduces these models' forward (SD-1.x
    or SDXL style: no class embeddings, added embeddings only SDXL's ``text_time``, no input
    centering, symmetric skips)."""
    config = unet.config
    unsupported = [
        name
        for name, on in (
            ("class embeddings", getattr(unet, "class_embedding", None) is not None),
            ("added embeddings", config.addition_embed_type not in (None, "text_time")),
            ("center_input_sample", bool(config.center_input_sample)),
            ("ControlNet class embeddings", getattr(controlnet, "class_embedding", None)),
            ("ControlNet global pooling", controlnet.config.global_pool_conditions),
        )
        if on
    ]
    up, down = unet.up_blocks[-1], unet.down_blocks[0]
    if len(up.resnets) != 1 + len(down.resnets):
        unsupported.append("asymmetric skips")
    if unsupported:
        raise ValueError(f"sampler.deep_cache does not support this UNet: {', '.join(unsupported)}")


def keep_deep_features(unet: Any, into: DeepFeatures):
    """A forward pre-hook handle on the UNet's last up block that stores its input in ``into``
    (remove it after the step)."""

    def keep(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        into.kept = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    return unet.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)


def _time_embedding(
    model: Any, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timestep embedding + SDXL's added embedding, activated; the cross-attention text)."""
    hidden, added = added_conditioning(model, text, sample)
    t = model.time_proj(timestep.expand(sample.shape[0])).to(sample.dtype)
    emb = added_embedding(model, model.time_embedding(t, None), added)
    act = getattr(model, "time_embed_act", None)
    return (act(emb) if act is not None else emb), hidden


def _down0(model: Any, h: torch.Tensor, emb: torch.Tensor, text: torch.Tensor) -> tuple:
    block = model.down_blocks[0]
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, encoder_hidden_states=text)[1]
    return block(hidden_states=h, temb=emb)[1]


def shallow_step(
    unet: Any,
    controlnet: Any,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    text: torch.Tensor,
    pose: torch.Tensor,
    control_scale: torch.Tensor,
    deep: torch.Tensor,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """eps of a non-key step: the shallow branch of ControlNet and UNet on kept ``deep``
    features (what :func:`keep_deep_features` stored at the last key step, rows aligned);
    ``features``: the pose maps' precomputed embedding, or None."""
    from engine.accel.graph import pose_features

    up = unet.up_blocks[-1]
    n = len(up.resnets)  # the skips it takes: conv_in's output and down block 0's resnets
    embedded = features if features is not None else pose_features(controlnet, pose)
    c = controlnet.conv_in(sample) + embedded
    c_emb, c_text = _time_embedding(controlnet, sample, timestep, text)
    c_skips = ((c, *_down0(controlnet, c, c_emb, c_text)))[:n]
    zero_convs = controlnet.controlnet_down_blocks
    residuals = [conv(x) * control_scale for x, conv in zip(c_skips, zero_convs, strict=False)]

    emb, text = _time_embedding(unet, sample, timestep, text)
    h = unet.conv_in(sample)
    skips = ((h, *_down0(unet, h, emb, text)))[:n]
    skips = tuple(x + r for x, r in zip(skips, residuals, strict=True))
    if getattr(up, "has_cross_attention", False):
        h = up(
            hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=text
        )
    else:
        h = up(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)
