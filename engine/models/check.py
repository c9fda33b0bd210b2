"""``avatar models check``: what a spec's weights are, and what is wrong with them, without
loading them.

Per component the check reads only what describes the weights: folder listings and
``config.json`` files, safetensors headers (names, shapes, dtypes), the lazily mapped tensors of
a ``.ckpt`` / ``.pth`` (``torch.load(mmap=True)``: no tensor data is read), the hub cache's
index. It never downloads. Each component gives one line: ``ok`` with what was found (kind,
architecture, dtype, size), or ``problem`` with the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.config import ConfigError, ModelConfig, RenderConfig
from engine.models.check_common import (
    _UNET_K,
    Line,
    _check_configs,
    _check_controlnet,
    _check_lora,
    _folder_tensors,
    _gb,
    _source,
)
from engine.models.errors import WeightsNotFoundError
from engine.models.sources import Tensors, classify, read_tensors

SD1_CONTEXT = 768
"""Text-embedding width of SD-1.x (CLIP ViT-L/14): the cross-attention input of its UNets."""
_SAM_WIDTH = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


def _unet_line(
    field: str, kind: str, tensors: Tensors | None, in_channels: int, context: int
) -> Line:
    """Verdict on an SD UNet (LDM or diffusers keys) against the expected text-context width."""
    name = f"model.{field}"
    if tensors is None:
        return Line(name, False, f"{kind}: no weights file found; fix: name the checkpoint")
    k = tensors.shape(f"model.diffusion_model.{_UNET_K}") or tensors.shape(
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    )
    first = tensors.shape("model.diffusion_model.input_blocks.0.0.weight") or tensors.shape(
        "conv_in.weight"
    )
    if any(key.startswith("conditioner.embedders.1") for key in tensors.shapes):
        return Line(name, False, f"{kind}: an SDXL checkpoint; preset sd15 needs SD-1.x weights")
    if k is None or first is None:
        return Line(name, False, f"{kind}: no SD UNet in it; fix: name an SD-1.x checkpoint")
    if k[1] != context:
        return Line(
            name,
            False,
            f"{kind}: UNet context width {k[1]}, the model's is {context} (SD-1.x {SD1_CONTEXT}, "
            "SD-2.x 1024); fix: name a checkpoint of the same architecture",
        )
    if first[1] != in_channels:
        what = "an inpainting" if in_channels == 9 else "a text-to-image"
        return Line(
            name,
            False,
            f"{kind}: UNet with {first[1]} input channels, {what} UNet has {in_channels}; fix: "
            f"point model.{field} at {what} SD-1.x checkpoint",
        )
    arch = "SD-1.x" if context == SD1_CONTEXT else f"SD (context {context})"
    arch += " inpainting" if in_channels == 9 else ""
    return Line(name, True, f"{kind}: {arch}, {tensors.dtypes()}, {_gb(tensors.size)}")


def _check_unet(config: ModelConfig, field: str, in_channels: int, context: int) -> Line:
    source = _source(config, field)
    if isinstance(source, Line):
        return source
    path = Path(source.location)
    if source.kind == "file":
        tensors = read_tensors(path)
        line = _unet_line(field, f"file {path.name}", tensors, in_channels, context)
        if line.ok and field == "base":
            missing = [
                p
                for p in ("first_stage_model.", "cond_stage_model.transformer.")
                if not any(k.startswith(p) for k in tensors.shapes)
            ]
            if missing:
                return Line(
                    "model.base", False, f"file {path.name} lacks {missing} (VAE / text encoder)"
                )
        return line
    if not (path / "unet" / "config.json").is_file():
        return Line(
            f"model.{field}",
            False,
            f"folder {path} has no unet/config.json; fix: name a diffusers SD-1.x folder or a "
            ".safetensors/.ckpt file",
        )
    unet = _folder_tensors(path / "unet", config.variant)
    return _unet_line(field, f"folder {path}", unet, in_channels, context)


def _check_sam(config: ModelConfig) -> Line:
    if config.sam_checkpoint is None:
        return Line(
            "model.sam_checkpoint",
            False,
            "not set but background.mask_source=sam needs it; fix: set model.sam_checkpoint to "
            "sam_vit_h_4b8939.pth (or vit_b/vit_l with model.sam_type), or background.mask_source=pose",
        )
    from engine.models.remote import fetch, is_uri

    where = ""
    if is_uri(config.sam_checkpoint):
        try:
            got = fetch(config.sam_checkpoint, "model.sam_checkpoint")
        except WeightsNotFoundError as e:
            return Line("model.sam_checkpoint", False, str(e))
        path = got.path
        how = "fetched to" if got.downloaded else "in this node's cache at"
        where = f" ({config.sam_checkpoint}, {got.version}, {how} {path})"
    else:
        path = Path(config.sam_checkpoint).expanduser()
        if not path.is_file():
            return _check_hf_sam(config)
    tensors = read_tensors(path)
    proj = tensors.shape("image_encoder.patch_embed.proj.weight")
    found = _SAM_WIDTH.get(proj[0]) if proj else None
    if found is None:
        return Line(
            "model.sam_checkpoint",
            False,
            f"{path.name} is not a segment-anything checkpoint{where}",
        )
    if found != config.sam_type:
        return Line(
            "model.sam_checkpoint",
            False,
            f"{path.name} is a SAM {found} but model.sam_type={config.sam_type}; fix: set "
            f"model.sam_type={found}",
        )
    return Line(
        "model.sam_checkpoint",
        True,
        f"SAM {found}, {tensors.dtypes()}, {_gb(tensors.size)}{where}",
    )


def _check_hf_sam(config: ModelConfig) -> Line:
    """``model.sam_checkpoint`` as a transformers SAM folder or hub id."""
    from engine.models.sam_hf import is_hf_sam

    source = _source(config, "sam_checkpoint")
    if isinstance(source, Line):
        return source
    folder = Path(source.location)
    if not is_hf_sam(folder):
        return Line(
            "model.sam_checkpoint",
            False,
            f"{folder} is neither Meta's sam_vit_*.pth nor a transformers SAM folder; fix the path",
        )
    width = json.loads((folder / "config.json").read_text())["vision_config"]["hidden_size"]
    found = _SAM_WIDTH.get(int(width))
    if found is not None and found != config.sam_type:
        return Line(
            "model.sam_checkpoint",
            False,
            f"transformers SAM {found} but model.sam_type={config.sam_type}; fix: set "
            f"model.sam_type={found}",
        )
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return Line("model.sam_checkpoint", True, f"transformers SAM {found or width}, {_gb(size)}")


def check_models(config: RenderConfig) -> list[Line]:
    """One :class:`Line` per component ``config`` uses (nothing heavy is loaded)."""
    from engine.models.registry import RANDOM_PRESETS, check_dtype, resolve_device

    model = config.model
    lines = []
    try:
        device = resolve_device(model.device)
        check_dtype(model, device)
        lines.append(Line("model.dtype", True, f"{model.dtype} on {device.type}"))
    except (ConfigError, RuntimeError) as e:
        lines.append(Line("model.dtype", False, str(e)))
    if model.preset.startswith("sdxl"):
        from engine.models.check_sdxl import check_sdxl

        return check_sdxl(config, lines)
    if model.preset != "sd15":  # the other presets build or ship their own weights
        random = model.preset in (*RANDOM_PRESETS, "sd15-random")
        what = "random weights built in code" if random else "its own weights, no files named"
        lines.append(Line("model.preset", True, f"{model.preset}: {what}"))
        return lines
    context = expected_context(model)
    lines.append(_check_unet(model, "base", 4, context))
    lines.append(_check_controlnet(model, context))
    if config.alignment.background:
        lines.append(_check_unet(model, "inpaint", 9, context))
        if config.background.mask_source == "sam":
            lines.append(_check_sam(model))
    if config.alignment.intra_frame and config.appearance.lora:
        lines.append(_check_lora(config.appearance.lora, context, model))
    for field in ("base_config", "controlnet_config", "inpaint_config"):
        value = getattr(model, field)
        if value is not None:
            lines.extend(_check_configs(field, value))
    return lines


def expected_context(config: ModelConfig) -> int:
    """The text-context width the models must share: the base folder's ``unet/config.json``, or
    that of the configs a single file loads against (``model.base_config`` or SD-1.5's)."""
    from engine.models.sources import shipped_config

    folder: Path | None = None
    for value in (config.base, config.base_config):
        if value is None:
            continue
        try:
            source = classify(value, "base")
        except WeightsNotFoundError:
            continue
        if source.kind == "folder" and (Path(source.location) / "unet" / "config.json").is_file():
            folder = Path(source.location)
            break
    unet = (folder or shipped_config("sd15")) / "unet" / "config.json"
    return int(json.loads(unet.read_text())["cross_attention_dim"])
