"""``avatar models check`` for the SDXL presets: what the weights are, without loading them.

The base is checked for SDXL's marks (a UNet with ``text_time`` conditioning and a second text
encoder: ``unet/config.json`` + ``text_encoder_2/`` in a folder; ``label_emb`` and
``conditioner.embedders.1`` keys in a single file), the ControlNet for SDXL's context width
(2048). Parameter counts come from the configs, built on the meta device (no memory, no data):
SDXL base 1.0's are UNet 2,567,463,684, ControlNet 1,251,014,160, text encoders 123,060,480 +
694,659,840.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.config import ModelConfig, RenderConfig
from engine.models.check_common import (
    _XL_K,
    _XL_LDM_K,
    Line,
    _check_configs,
    _check_controlnet,
    _check_lora,
    _gb,
    _source,
)
from engine.models.sources import read_tensors, shipped_config

SDXL_CONTEXT = 2048
"""SDXL's text-context width (768 + 1280: both text encoders' hidden states side by side)."""
_FILE_MARKS = {
    "model.diffusion_model.label_emb.": "the UNet's text_time embedding",
    "conditioner.embedders.1.model.": "the second (OpenCLIP) text encoder",
    "first_stage_model.": "the VAE",
}


def parameter_counts(configs: Path) -> dict[str, int]:
    """Parameters of the UNet and both text encoders in a diffusers SDXL configs folder, from
    their configs on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
        text_2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(configs / "text_encoder_2")
        )
    return {"UNet": count(unet), "text encoder": count(text), "text encoder 2": count(text_2)}


def controlnet_parameters(config_file: Path) -> int:
    """Parameters of the ControlNet a ``config.json`` describes (meta device)."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        model = ControlNetModel.from_config(json.loads(config_file.read_text()))
    return sum(p.numel() for p in model.parameters())


def _counts(configs: Path) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in parameter_counts(configs).items())


def _check_base(model: ModelConfig) -> Line:
    source = _source(model, "base")
    if isinstance(source, Line):
        return source
    path = Path(source.location)
    if source.kind == "file":
        tensors = read_tensors(path)
        missing = [
            what
            for key, what in _FILE_MARKS.items()
            if not any(k.startswith(key) for k in tensors.shapes)
        ]
        if missing:
            return Line(
                "model.base",
                False,
                f"file {path.name} lacks {', '.join(missing)}: not an SDXL checkpoint; fix: name "
                "an SDXL .safetensors, or use model.preset=sd15 for SD-1.x files",
            )
        configs = Path(model.base_config) if model.base_config else shipped_config("sdxl")
        return Line(
            "model.base",
            True,
            f"file {path.name}: SDXL, {tensors.dtypes()}, {_gb(tensors.size)}; configs "
            f"{configs.name}: {_counts(configs)}",
        )
    unet = path / "unet" / "config.json"
    if not unet.is_file() or not (path / "text_encoder_2" / "config.json").is_file():
        return Line(
            "model.base",
            False,
            f"folder {path} lacks unet/config.json or text_encoder_2/: not an SDXL diffusers "
            "folder; fix: name an SDXL folder, hub id or single file",
        )
    config = json.loads(unet.read_text())
    if config.get("addition_embed_type") != "text_time":
        return Line("model.base", False, f"folder {path}: its UNet has no text_time conditioning")
    return Line("model.base", True, f"folder {path.name}: SDXL, {_counts(path)}")


def _check_inpaint(model: ModelConfig, context: int) -> Line:
    """The plate's inpainting UNet: 9 input channels, ``text_time``, the base's context width."""
    source = _source(model, "inpaint")
    if isinstance(source, Line):
        return source
    path = Path(source.location)
    fix = (
        "fix: name an SDXL inpainting checkpoint (diffusers/stable-diffusion-xl-1.0-inpainting-0.1)"
    )
    if source.kind == "file":
        tensors = read_tensors(path)
        first = tensors.shape("model.diffusion_model.input_blocks.0.0.weight") or tensors.shape(
            "conv_in.weight"
        )
        k = tensors.shape(f"model.diffusion_model.{_XL_LDM_K}") or tensors.shape(_XL_K)
        found = (first[1] if first else None, k[1] if k else None)
        kind = f"file {path.name}"
    else:
        unet = path / "unet" / "config.json"
        if not unet.is_file():
            return Line("model.inpaint", False, f"folder {path} has no unet/config.json; {fix}")
        config = json.loads(unet.read_text())
        found = (config.get("in_channels"), config.get("cross_attention_dim"))
        kind = f"folder {path.name}"
    if found != (9, context):
        return Line(
            "model.inpaint",
            False,
            f"{kind}: UNet with {found[0]} input channels and context {found[1]}, the plate needs "
            f"9 and {context}; {fix}",
        )
    return Line("model.inpaint", True, f"{kind}: SDXL inpainting UNet (9 channels)")


def _context(model: ModelConfig) -> int:
    """The text-context width of the base (its folder's or configs' ``unet/config.json``)."""
    for value in (model.base, model.base_config):
        unet = Path(value).expanduser() / "unet" / "config.json" if value else None
        if unet is not None and unet.is_file():
            return int(json.loads(unet.read_text())["cross_attention_dim"])
    return SDXL_CONTEXT


def check_sdxl(config: RenderConfig, lines: list[Line]) -> list[Line]:
    """``lines`` (the dtype verdict) + one line per SDXL component of ``config``."""
    model = config.model
    if model.preset != "sdxl":  # random weights, built in code
        what = "SDXL's architectures" if model.preset == "sdxl-random" else "toy widths"
        text = f"{model.preset}: random weights built in code ({what})"
        if model.preset == "sdxl-random":
            control = shipped_config("sdxl-controlnet-openpose") / "config.json"
            text += f"; {_counts(shipped_config('sdxl'))}, ControlNet "
            text += f"{controlnet_parameters(control):,}"
        return [*lines, Line("model.preset", True, text)]
    lines.append(_check_base(model))
    context = _context(model)
    lines.append(_check_controlnet(model, context))
    if config.alignment.intra_frame and config.appearance.lora:
        lines.append(_check_lora(config.appearance.lora, context, model))
    if config.alignment.background:
        lines.append(_check_inpaint(model, context))
    for field in ("base_config", "controlnet_config", "inpaint_config"):
        value = getattr(model, field)
        if value is not None:
            lines.extend(_check_configs(field, value))
    return lines
