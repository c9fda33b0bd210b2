"""Loading real weights through the library that defines their layout (diffusers, transformers).

Each ``model.*`` source (:func:`engine.models.sources.classify`) loads the way its library
reads it:

- a diffusers folder or hub id: ``<Model>.from_pretrained(folder/sub, variant=model.variant)``
  (safetensors, else ``.bin``, as diffusers decides);
- a single SD-1.x file (``.safetensors`` / ``.ckpt``, original LDM keys):
  ``StableDiffusionPipeline.from_single_file(file, config=<configs folder>)``;
- a single ControlNet file (v1.0 / v1.1): ``ControlNetModel.from_single_file(file, config=…)``;
- a single inpainting file: ``UNet2DConditionModel.from_single_file(file, config=…,
  subfolder="unet")``.

Single files need the model's configs; offline they come from the folder the user names
(``model.base_config`` …) or from ``configs/models/`` (public values, no weights). Any failure is
a :class:`WeightsNotFoundError` naming the source and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from engine.config import ModelConfig
from engine.models.errors import WeightsNotFoundError, first_line
from engine.models.sources import Source, classify, content_digest, hub_folder, shipped_config


def offline(config: ModelConfig) -> bool:
    """``model.offline`` or ``HF_HUB_OFFLINE`` set."""
    return config.offline or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")


def load_pretrained(loader: Callable[..., Any], folder: Path, what: str, **kw: Any) -> Any:
    """``loader(folder)`` from local files only; any failure → :class:`WeightsNotFoundError`."""
    try:
        return loader(str(folder), local_files_only=True, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise WeightsNotFoundError(
            f"{what}: {folder} does not hold loadable weights ({first_line(e)})"
        ) from None


def local_source(config: ModelConfig, field: str, what: str) -> Source:
    """``model.<field>`` classified, a hub id replaced by its local snapshot folder."""
    source = classify(str(getattr(config, field)), field)
    if source.kind != "hub":
        return source
    folder = hub_folder(
        source.location, what, field, offline=offline(config), variant=config.variant
    )
    return Source("folder", str(folder))


def config_folder(config: ModelConfig, field: str, shipped: str) -> Path:
    """The configs a single file of ``model.<field>`` loads against: ``model.<field>_config``
    (a folder, or a hub id's cached snapshot), else ``configs/models/<shipped>``."""
    value = getattr(config, f"{field}_config")
    if value is None:
        return shipped_config(shipped)
    return Path(local_source(config.model_copy(update={field: value}), field, "configs").location)


def variant_kw(config: ModelConfig, folder: Path) -> dict[str, Any]:
    """``variant=model.variant`` for a component folder holding that variant's files; a folder
    without them loads its plain files, as diffusers pipelines do (SD-1.5 ships fp16 files, the
    OpenPose ControlNet does not)."""
    if not config.variant:
        return {}
    has = any(f".{config.variant}." in p.name for p in folder.glob("*") if p.is_file())
    return {"variant": config.variant} if has else {}


def check_variant(config: ModelConfig, field: str, source: Source) -> None:
    if config.variant and source.kind == "file":
        raise WeightsNotFoundError(
            f"model.variant={config.variant!r} applies to folders and hub ids, but model.{field} "
            f"is the single file {source.location}; unset model.variant"
        )


_VOCAB_FILES = ("vocab.json", "tokenizer.json")
_BYTE_SYMBOLS = 514
"""CLIP's BPE alphabet: 256 byte symbols alone and as word ends, plus the two special tokens."""


def clip_tokenizer(folder: Path | None, sub: str = "tokenizer") -> CLIPTokenizer:
    """CLIP's tokenizer from ``folder/<sub>`` when it has one, else the shipped copy of CLIP's
    BPE vocabulary (``configs/models/clip-tokenizer``, 49408 tokens)."""
    source = folder / sub if folder is not None else None
    if source is None or not any((source / f).is_file() for f in _VOCAB_FILES):
        source = shipped_config("clip-tokenizer")
    tokenizer = load_pretrained(CLIPTokenizer.from_pretrained, source, "tokenizer")
    if len(tokenizer) < _BYTE_SYMBOLS:  # transformers builds an empty one from a folder w/o vocab
        raise WeightsNotFoundError(f"tokenizer: {source} holds no CLIP vocabulary")
    return tokenizer


def check_tokenizer(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, where: Path) -> None:
    """A tokenizer whose ids the text encoder has no embedding for is refused (not an index
    error at the first prompt)."""
    size = int(text_encoder.config.vocab_size)
    if len(tokenizer) > size:
        raise WeightsNotFoundError(
            f"tokenizer: {len(tokenizer)} tokens but the text encoder of {where} embeds {size}; "
            "put the checkpoint's own tokenizer/ in the configs folder (model.base_config)"
        )


@dataclass
class BaseModels:
    """The SD-1.x parts of ``model.base``."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    digest: str
    """sha256 of the weights (:func:`~engine.models.sources.content_digest`)."""


def load_base(config: ModelConfig, dtype: torch.dtype) -> BaseModels:
    """UNet, VAE, CLIP text encoder, tokenizer and DDIM scheduler of ``model.base``."""
    source = local_source(config, "base", "SD-1.x checkpoint")
    check_variant(config, "base", source)
    path = Path(source.location)
    if source.kind == "file":
        return _base_from_file(config, path, dtype)

    def kw(sub: str) -> dict[str, Any]:
        return {"torch_dtype": dtype, **variant_kw(config, path / sub)}

    tokenizer = clip_tokenizer(path)
    text_encoder = load_pretrained(
        CLIPTextModel.from_pretrained, path / "text_encoder", "text encoder", **kw("text_encoder")
    )
    check_tokenizer(tokenizer, text_encoder, path)
    return BaseModels(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=load_pretrained(
            UNet2DConditionModel.from_pretrained, path / "unet", "UNet", **kw("unet")
        ),
        vae=load_pretrained(AutoencoderKL.from_pretrained, path / "vae", "VAE", **kw("vae")),
        scheduler=load_pretrained(DDIMScheduler.from_pretrained, path / "scheduler", "scheduler"),
        digest=content_digest(path),
    )


def _base_from_file(config: ModelConfig, path: Path, dtype: torch.dtype) -> BaseModels:
    from diffusers import StableDiffusionPipeline

    configs = config_folder(config, "base", "sd15")
    tokenizer = clip_tokenizer(configs)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(configs),
            local_files_only=True,
            torch_dtype=dtype,
            tokenizer=tokenizer,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except Exception as e:  # diffusers raises many types for a file of another model
        raise WeightsNotFoundError(
            f"model.base={str(path)!r} is not an SD-1.x checkpoint loadable against the configs "
            f"in {configs} ({first_line(e)}); name an SD-1.x .safetensors/.ckpt, or set "
            "model.base_config to the diffusers folder of its architecture"
        ) from None
    check_tokenizer(tokenizer, pipe.text_encoder, path)
    return BaseModels(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=tokenizer,
        scheduler=load_pretrained(
            DDIMScheduler.from_pretrained, configs / "scheduler", "scheduler"
        ),
        digest=content_digest(path),
    )


def _from_single_file(
    cls: Any, path: Path, configs: Path, field: str, dtype: torch.dtype, **kw: Any
) -> Any:
    try:
        return cls.from_single_file(
            str(path), config=str(configs), local_files_only=True, torch_dtype=dtype, **kw
        )
    except Exception as e:  # diffusers raises many types for a file of another model
        raise WeightsNotFoundError(
            f"model.{field}={str(path)!r} does not load as a {cls.__name__} with the configs in "
            f"{configs} ({first_line(e)}); name the right file or set model.{field}_config"
        ) from None


def load_controlnet(
    config: ModelConfig, dtype: torch.dtype, shipped: str = "sd15-controlnet-openpose"
) -> tuple[ControlNetModel, str]:
    """The OpenPose ControlNet of ``model.controlnet`` and its weights' digest; a single file
    loads against ``model.controlnet_config`` or ``configs/models/<shipped>``."""
    source = local_source(config, "controlnet", "OpenPose ControlNet")
    check_variant(config, "controlnet", source)
    path = Path(source.location)
    if source.kind == "file":
        configs = config_folder(config, "controlnet", shipped)
        model = _from_single_file(ControlNetModel, path, configs, "controlnet", dtype)
    else:
        model = load_pretrained(
            ControlNetModel.from_pretrained,
            path,
            "OpenPose ControlNet",
            torch_dtype=dtype,
            **variant_kw(config, path),
        )
    return model, content_digest(path)


def load_inpaint(
    config: ModelConfig, dtype: torch.dtype, shipped: str = "sd15-inpainting"
) -> UNet2DConditionModel:
    """The UNet of the SD inpainting checkpoint ``model.inpaint`` (a folder's ``unet/`` or the
    UNet of a single file, against ``model.inpaint_config`` or ``configs/models/<shipped>``)."""
    source = local_source(config, "inpaint", "SD inpainting checkpoint")
    check_variant(config, "inpaint", source)
    path = Path(source.location)
    if source.kind == "file":
        configs = config_folder(config, "inpaint", shipped)
        return _from_single_file(
            UNet2DConditionModel, path, configs, "inpaint", dtype, subfolder="unet"
        )
    return load_pretrained(
        UNet2DConditionModel.from_pretrained,
        path / "unet",
        "inpainting UNet",
        torch_dtype=dtype,
        **variant_kw(config, path / "unet"),
    )
