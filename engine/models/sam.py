"""Segment-anything builders plus a registry (segment-anything style): ``SAM_REGISTRY["tiny"]``.

``tiny`` and ``small`` are randomly initialised, seeded, architecturally faithful SAMs built from
the ``segment_anything.modeling`` classes (windowed ViT image encoder with relative positions and
global-attention blocks, prompt encoder, two-way-transformer mask decoder with three multimask
outputs), small enough for a CPU test. Their image encoder works at ``img_size`` 256 (the official
models at 1024); :class:`segment_anything.SamPredictor` reads it from
``model.image_encoder.img_size``, so prompts and masks stay in original-image pixels either way.
``sd15`` loads an official checkpoint (``model.sam_checkpoint`` of type ``model.sam_type``):
Meta's ``.pth`` through segment-anything, or the transformers layout (a folder or hub id such as
``facebook/sam-vit-huge``) through transformers (:mod:`engine.models.sam_hf`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from engine.config import ModelConfig
from engine.models.registry import WeightsNotFoundError, resolve_device

# Official checkpoints of the segment-anything release (github.com/facebookresearch/segment-anything).
SAM_CHECKPOINT_URLS: dict[str, str] = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}

# Architectures of the random-weight SAMs: the official layout with fewer, narrower layers.
_SAM_ARCH: dict[str, dict[str, Any]] = {
    "tiny": {"embed": 64, "depth": 2, "heads": 2, "global": (1,), "window": 8, "prompt": 32},
    "small": {"embed": 128, "depth": 4, "heads": 4, "global": (1, 3), "window": 8, "prompt": 64},
}
SAM_IMG_SIZE = 256
"""Input side of the random SAMs' image encoder (long side after ResizeLongestSide)."""
_PATCH = 16
# ImageNet statistics in [0, 255], as in segment_anything.build_sam.
_PIXEL_MEAN = [123.675, 116.28, 103.53]
_PIXEL_STD = [58.395, 57.12, 57.375]


def _random_sam(preset: str, seed: int) -> Sam:
    arch = _SAM_ARCH[preset]
    dim = arch["prompt"]
    grid = SAM_IMG_SIZE // _PATCH
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=SAM_IMG_SIZE,
                patch_size=_PATCH,
                embed_dim=arch["embed"],
                depth=arch["depth"],
                num_heads=arch["heads"],
                mlp_ratio=4,
                out_chans=dim,
                qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=arch["window"],
                global_attn_indexes=arch["global"],
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dim,
                image_embedding_size=(grid, grid),
                input_image_size=(SAM_IMG_SIZE, SAM_IMG_SIZE),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=2, embedding_dim=dim, mlp_dim=2 * dim, num_heads=2
                ),
                transformer_dim=dim,
                iou_head_depth=3,
                iou_head_hidden_dim=dim,
            ),
            pixel_mean=_PIXEL_MEAN,
            pixel_std=_PIXEL_STD,
        )
    return sam.eval().requires_grad_(False)


def build_tiny_sam(seed: int = 0) -> Sam:
    """A seeded random-weight SAM (ViT embed 64, depth 2, 2 heads, img_size 256, patch 16).

    The same ``seed`` always gives the same weights; the global torch RNG is left untouched.
    """
    return _random_sam("tiny", seed)


def build_small_sam(seed: int = 0) -> Sam:
    """A seeded random-weight SAM, wider and deeper than :func:`build_tiny_sam` (embed 128)."""
    return _random_sam("small", seed)


def load_sam(sam_type: str, checkpoint: str | Path, device: str | torch.device = "cpu") -> Sam:
    """An official SAM checkpoint (``sam_vit_{b,l,h}_*.pth``) on ``device``, in eval mode.

    The model is built by ``segment_anything.sam_model_registry[sam_type]`` and the state dict is
    loaded with ``map_location="cpu"`` and ``weights_only=True`` (safe on CPU-only machines).

    Raises:
        WeightsNotFoundError: the checkpoint file is missing, unreadable or not of ``sam_type``;
            the message names the file and the official download URL.
        ValueError: ``sam_type`` is not one of vit_b, vit_l, vit_h.
    """
    if sam_type not in SAM_CHECKPOINT_URLS:
        raise ValueError(
            f"model.sam_type={sam_type!r} is not a SAM variant; use one of "
            f"{', '.join(SAM_CHECKPOINT_URLS)}"
        )
    path = Path(checkpoint).expanduser()
    url = SAM_CHECKPOINT_URLS[sam_type]
    fix = (
        f"Download the official {sam_type} checkpoint ({url}) and set model.sam_checkpoint to "
        "its path (model.sam_type must match), or set background.mask_source=pose."
    )
    if not path.is_file():
        raise WeightsNotFoundError(f"SAM checkpoint {str(path)!r} does not exist. {fix}")
    sam = sam_model_registry[sam_type](checkpoint=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        sam.load_state_dict(state)
    except Exception as e:  # torch.load / load_state_dict raise many types on a bad file
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise WeightsNotFoundError(
            f"SAM checkpoint {str(path)!r} is not a loadable {sam_type} state dict ({first}). {fix}"
        ) from None
    return sam.to(device=torch.device(device)).eval().requires_grad_(False)


def _build_random_from(config: ModelConfig) -> Sam:
    builder = build_tiny_sam if config.preset in ("tiny", "micro") else build_small_sam
    return builder(config.seed).to(resolve_device(config.device))


def _load_configured(config: ModelConfig) -> Sam:
    if config.sam_checkpoint is None:
        url = SAM_CHECKPOINT_URLS[config.sam_type]
        raise WeightsNotFoundError(
            f"model.sam_checkpoint is not set but background.mask_source=sam needs it with "
            f"model.preset={config.preset}: download {url} and set model.sam_checkpoint to its path, or set "
            "background.mask_source=pose."
        )
    from engine.models.remote import local_weights

    checkpoint = local_weights(config.sam_checkpoint, "model.sam_checkpoint")  # a URI: fetched
    return load_sam(config.sam_type, checkpoint, resolve_device(config.device))


def _random_official(config: ModelConfig) -> Sam:
    """``sd15-random``: the official ``model.sam_type`` architecture (vit_h: 636 M parameters)
    with seeded random weights, float32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 3)
        sam = sam_model_registry[config.sam_type](checkpoint=None)
    return sam.to(resolve_device(config.device)).eval().requires_grad_(False)


SAM_REGISTRY: dict[str, Callable[[ModelConfig], Sam]] = {
    "tiny": _build_random_from,
    "small": _build_random_from,
    "micro": _build_random_from,  # random: micro's default background.mask_source is pose
    "sd15": _load_configured,
    "sd15-random": _random_official,
    "sdxl": _load_configured,
    "sdxl-tiny": _build_random_from,
    "sdxl-random": _build_random_from,  # the real SAM's cost is not what sdxl-random measures
}


def build_sam(config: ModelConfig) -> Sam:
    """The SAM of ``config.preset``: seeded random for tiny/small, the official checkpoint for
    sd15. Always float32 (SamPredictor feeds float32 images), on ``config.device``."""
    return SAM_REGISTRY[config.preset](config)


def build_sam_predictor(config: ModelConfig) -> Any:
    """A :class:`segment_anything.SamPredictor` around :func:`build_sam` ``(config)``, or for a
    ``model.sam_checkpoint`` in transformers' layout (a folder or hub id) the
    :class:`~engine.models.sam_hf.HFSamPredictor` of the same interface."""
    folder = _hf_folder(config)
    if folder is not None:
        from engine.models.sam_hf import load_hf_sam

        return load_hf_sam(folder, config.sam_type, resolve_device(config.device))
    return SamPredictor(build_sam(config))


def _hf_folder(config: ModelConfig) -> Path | None:
    """The transformers-layout SAM ``model.sam_checkpoint`` names (a folder, or a hub id's
    snapshot), or None for Meta's ``.pth`` files and the random presets."""
    if config.preset not in ("sd15", "sdxl") or config.sam_checkpoint is None:
        return None
    from engine.models.real import local_source
    from engine.models.remote import is_uri
    from engine.models.sam_hf import is_hf_sam

    if is_uri(config.sam_checkpoint) or Path(config.sam_checkpoint).expanduser().is_file():
        return None  # Meta's checkpoint file (a URI names one file)
    source = local_source(config, "sam_checkpoint", "SAM (transformers layout)")
    folder = Path(source.location)
    if source.kind != "folder" or not is_hf_sam(folder):
        raise WeightsNotFoundError(
            f"model.sam_checkpoint={config.sam_checkpoint!r} is neither Meta's sam_vit_*.pth nor "
            "a transformers SAM folder (config.json with model_type sam); fix the path"
        )
    return folder
