"""Shared pieces of ``avatar models check`` (:mod:`engine.models.check` for SD-1.x,
:mod:`engine.models.check_sdxl` for SDXL): the verdict line, sources, ControlNet, LoRA and
configs-folder checks. Nothing here loads weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.config import ModelConfig
from engine.models.errors import WeightsNotFoundError
from engine.models.sources import Source, Tensors, classify, read_tensors

_UNET_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_XL_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
_XL_LDM_K = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


@dataclass
class Line:
    """One component's verdict."""

    component: str
    ok: bool
    text: str

    def __str__(self) -> str:
        return f"{'ok     ' if self.ok else 'problem'} {self.component}: {self.text}"


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _folder_tensors(folder: Path, variant: str | None) -> Tensors | None:
    files = [p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin")]
    if variant and any(f".{variant}." in p.name for p in files):
        files = [p for p in files if f".{variant}." in p.name]
    if not files:
        return None
    merged: dict[str, tuple[tuple[int, ...], str]] = {}
    for p in files:
        merged.update(read_tensors(p).shapes)
    return Tensors(merged, sum(p.stat().st_size for p in files))


def _source(config: ModelConfig, field: str) -> Source | Line:
    """The local form of ``model.<field>``, or a problem line."""
    from engine.models.real import offline

    value = str(getattr(config, field))
    try:
        source = classify(value, field)
    except WeightsNotFoundError as e:
        return Line(f"model.{field}", False, str(e))
    if source.kind != "hub":
        return source
    from huggingface_hub import snapshot_download

    try:
        return Source("folder", snapshot_download(value, local_files_only=True))
    except Exception:  # not cached
        if offline(config):
            return Line(
                f"model.{field}",
                False,
                f"hub id {value!r} is not in the local hub cache and model.offline is on; fix: "
                f"`hf download {value}` where the hub is reachable, or name a local folder/file",
            )
        return Line(f"model.{field}", True, f"hub id {value!r}, not cached: render downloads it")


def _check_controlnet(config: ModelConfig, context: int) -> Line:
    source = _source(config, "controlnet")
    if isinstance(source, Line):
        return source
    path = Path(source.location)
    tensors = read_tensors(path) if source.kind == "file" else _folder_tensors(path, config.variant)
    kind = f"{'file' if source.kind == 'file' else 'folder'} {path.name}"
    if tensors is None:
        return Line(
            "model.controlnet",
            False,
            f"{kind}: no ControlNet weights in it (a ControlNet folder holds config.json and "
            "diffusion_pytorch_model.safetensors); fix: name the OpenPose ControlNet",
        )
    k = (
        tensors.shape(f"control_model.{_UNET_K}")
        or tensors.shape(_UNET_K)
        or tensors.shape("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
        or tensors.shape(_XL_K)  # SDXL: no attention in the first down block
        or tensors.shape(f"control_model.{_XL_LDM_K}")
    )
    hint = any(
        "input_hint_block" in key or "controlnet_cond_embedding" in key for key in tensors.shapes
    )
    if k is None or not hint:
        return Line(
            "model.controlnet",
            False,
            f"{kind}: not a ControlNet; fix: name the OpenPose ControlNet",
        )
    if k[1] != context:
        return Line(
            "model.controlnet",
            False,
            f"{kind}: ControlNet of context width {k[1]}, the model's is {context}; fix: name the "
            "OpenPose ControlNet of the base model's architecture",
        )
    return Line(
        "model.controlnet",
        True,
        f"{kind}: ControlNet (context {k[1]}), {tensors.dtypes()}, {_gb(tensors.size)} (its "
        "condition, e.g. openpose, cannot be read from the weights)",
    )


def _check_lora(value: str, context: int, model: ModelConfig) -> Line:
    path = Path(value).expanduser()
    if not path.exists():
        from engine.appearance.imported import lora_location

        try:
            path = lora_location(value, model.model_copy(update={"offline": True}))
        except WeightsNotFoundError as e:
            if model.offline or "does not exist" in str(e):
                return Line("appearance.lora", False, str(e))
            return Line(
                "appearance.lora", True, f"hub id {value!r}, not cached: render downloads it"
            )
    if path.is_dir():
        if (path / "adapter_config.json").is_file() or (
            path / "unet" / "adapter_config.json"
        ).is_file():
            cfg = path / "adapter_config.json"
            config = json.loads(
                (cfg if cfg.is_file() else path / "unet" / "adapter_config.json").read_text()
            )
            return Line("appearance.lora", True, f"peft folder, rank {config.get('r')}")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            return Line("appearance.lora", False, f"folder {path} holds no .safetensors LoRA")
        path = files[0]
    tensors = read_tensors(path)
    keys = list(tensors.shapes)
    kind = (
        "kohya"
        if keys and all(k.startswith(("lora_unet_", "lora_te")) for k in keys)
        else "diffusers"
        if any(k.startswith("unet.") for k in keys)
        else None
    )
    if kind is None:
        return Line(
            "appearance.lora", False, f"{path.name}: no UNet LoRA tensors (kohya or diffusers keys)"
        )
    downs = ("lora_down.weight", "lora.down.weight", "lora_A.weight")
    cross = [
        s[1]
        for k, (s, _) in tensors.shapes.items()
        if k.endswith(downs) and "attn2" in k and "to_k" in k and len(s) == 2
    ]
    if any(c != context for c in cross):
        return Line(
            "appearance.lora", False, f"{path.name}: a LoRA of another model (context {cross[0]})"
        )
    te = any(k.startswith(("lora_te", "text_encoder.")) for k in keys)
    te2 = any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys)
    parts = "UNet + both text encoders" if te2 else "UNet + text encoder" if te else "UNet"
    return Line("appearance.lora", True, f"{kind} LoRA {path.name}, {parts}, {tensors.dtypes()}")


def _check_configs(field: str, value: str) -> list[Line]:
    """A problem line when ``model.<field>`` is not a configs folder (or a hub id)."""
    try:
        source = classify(value, field)
    except WeightsNotFoundError as e:
        return [Line(f"model.{field}", False, str(e))]
    if source.kind == "file":
        return [Line(f"model.{field}", False, f"{value} is a file; fix: name the configs folder")]
    return []
