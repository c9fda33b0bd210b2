"""The adapter artifact on disk, and loading adapters into the frame chain's models.

An adapter folder holds:

    adapter.safetensors   LoRA tensors, float32, keys ``unet.<peft key>`` (and
                          ``text_encoder.<peft key>``, SDXL's ``text_encoder_2.<peft key>``): the
                          diffusers LoRA layout, so
                          ``pipe.load_lora_weights(folder, weight_name=ADAPTER_FILE)`` works
    adapter.json          rank, alpha, target modules, base model, config, prompts, losses, …
    references/000.png …  the reference images it was trained on (optional)

Folders are written atomically (a temporary sibling folder, then ``os.replace``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from engine.appearance.lora import (
    activate_lora,
    add_lora,
    loaded_adapters,
    lora_config,
    remove_lora,
    snapshot,
)
from engine.appearance.train import AdapterWeights
from engine.models.components import DiffusionComponents
from engine.video import save_png

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
FORMAT_VERSION = 1
_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds both adapter files (a finished, atomically written adapter)."""
    return (directory / ADAPTER_FILE).is_file() and (directory / META_FILE).is_file()


def _meta(weights: AdapterWeights) -> dict[str, Any]:
    return {
        **weights.metadata,
        "format_version": FORMAT_VERSION,
        "rank": weights.rank,
        "alpha": weights.alpha,
        "target_modules": list(weights.target_modules),
        "text_target_modules": list(weights.text_target_modules),
        "text_encoder": weights.text_encoder is not None,
        "text_encoder_2": weights.text_encoder_2 is not None,
        "text_2_target_modules": list(weights.text_2_target_modules),
        "losses": weights.losses,
        "digest": weights.digest(),
    }


def save_adapter(
    weights: AdapterWeights, directory: Path, *, images: Sequence[np.ndarray] = ()
) -> Path:
    """Write ``weights`` (and optionally its reference ``images``) as the folder ``directory``.

    Raises:
        FileExistsError: ``directory`` exists and is not empty (an adapter is never overwritten;
            delete the folder to replace it).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name}-"))
    try:
        tensors = {f"unet.{k}": v.contiguous() for k, v in weights.unet.items()}
        for prefix, state in (
            ("text_encoder", weights.text_encoder),
            ("text_encoder_2", weights.text_encoder_2),
        ):
            for k, v in (state or {}).items():
                tensors[f"{prefix}.{k}"] = v.contiguous()
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / META_FILE).write_text(json.dumps(_meta(weights), indent=2, sort_keys=True))
        if images:
            (tmp / "references").mkdir()
            for i, image in enumerate(images):
                save_png(image, tmp / "references" / f"{i:03d}.png")
        try:
            os.replace(tmp, directory)  # atomic; also replaces an empty folder
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(
                    f"{directory} already exists and is not empty; delete it to replace the adapter"
                ) from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


_RESERVED = frozenset(
    [
        "format_version",
        "rank",
        "alpha",
        "target_modules",
        "text_target_modules",
        "text_encoder",
        "text_encoder_2",
        "text_2_target_modules",
        "losses",
        "digest",
    ]
)
"""adapter.json keys that are AdapterWeights fields (the rest is AdapterWeights.metadata)."""


def read_adapter(directory: Path) -> AdapterWeights:
    """Read an adapter folder written by :func:`save_adapter` (tensors checked against the
    digest recorded in adapter.json).

    Raises:
        FileNotFoundError: a file is missing. ValueError: a file is corrupt or of another format.
    """
    directory = Path(directory)
    if not is_complete(directory):
        raise FileNotFoundError(
            f"{directory} is not an adapter folder (needs {ADAPTER_FILE} and {META_FILE}); "
            "train it with get_or_train_adapter()"
        )
    corrupt = f"adapter {directory} is corrupt; delete the folder to retrain it"
    try:
        meta = json.loads((directory / META_FILE).read_text())
        tensors = load_file(str(directory / ADAPTER_FILE))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise ValueError(f"{corrupt} ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"adapter {directory} is not of format_version {FORMAT_VERSION} (this engine's); "
            "delete the folder to retrain it"
        )
    states: dict[str, dict[str, torch.Tensor]] = {p: {} for p in _PREFIXES}
    for key, value in tensors.items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{corrupt} (unexpected tensor {key!r})")
        states[prefix][key.removeprefix(prefix)] = value
    try:
        weights = AdapterWeights(
            unet=states["unet."],
            text_encoder=states["text_encoder."] if meta["text_encoder"] else None,
            rank=int(meta["rank"]),
            alpha=float(meta["alpha"]),
            target_modules=tuple(meta["target_modules"]),
            text_target_modules=tuple(meta["text_target_modules"]),
            # absent in adapters written before SDXL's second text encoder could carry a LoRA
            text_encoder_2=states["text_encoder_2."] if meta.get("text_encoder_2") else None,
            text_2_target_modules=tuple(meta.get("text_2_target_modules", ())),
            losses=[float(x) for x in meta["losses"]],
            metadata={k: v for k, v in meta.items() if k not in _RESERVED},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{corrupt} (adapter.json: {e!r})") from None
    if weights.digest() != meta.get("digest"):
        raise ValueError(f"{corrupt} (tensors do not match the digest in {META_FILE})")
    return weights


def _set_state(module: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Copy a peft state dict into adapter ``name``; every LoRA tensor must match, both ways."""
    result: Any = set_peft_model_state_dict(module, state, adapter_name=name)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
    if unexpected or missing:
        raise ValueError(
            f"adapter {name!r} does not fit {type(module).__name__}: unexpected "
            f"{unexpected[:3]}, missing {missing[:3]}; was it trained on another base model?"
        )


def load_adapter(
    unet: nn.Module,
    source: Path | AdapterWeights,
    name: str,
    *,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
) -> str:
    """Add adapter ``source`` (a folder or weights) to ``unet`` under ``name``; it becomes active.

    Several adapters coexist on one UNet under distinct names; switch with :func:`activate`.
    A text-encoder LoRA goes into ``text_encoder`` (required when the adapter has one), SDXL's
    second text encoder's into ``text_encoder_2`` (likewise).

    Returns:
        ``name``.

    Raises:
        ValueError: ``name`` is already loaded, the adapter has a text-encoder LoRA but that
            text encoder was not given, or the tensors do not fit the model.
    """
    weights = source if isinstance(source, AdapterWeights) else read_adapter(Path(source))
    parts: list[tuple[nn.Module, dict[str, torch.Tensor], tuple[str, ...]]] = [
        (unet, weights.unet, weights.target_modules)
    ]
    texts = [
        ("text_encoder", text_encoder, weights.text_encoder, weights.text_target_modules),
        ("text_encoder_2", text_encoder_2, weights.text_encoder_2, weights.text_2_target_modules),
    ]
    for arg, module, state, targets in texts:
        if state is None:
            continue
        if module is None:
            raise ValueError(
                f"adapter {name!r} has a LoRA of {arg}: pass {arg}=components.{arg} to load_adapter"
            )
        parts.append((module, state, targets))
    added: list[nn.Module] = []
    try:
        for module, state, targets in parts:
            add_lora(module, lora_config(weights.rank, weights.alpha, targets), name)
            added.append(module)
            _set_state(module, state, name)
    except Exception:
        for module in added:
            remove_lora(module, name)
        raise
    activate(unet, name, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    return name


def activate(
    unet: nn.Module,
    name: str | None,
    *,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
) -> None:
    """Make adapter ``name`` the only active one, or run the base model (``None``).

    Each text encoder given that has adapters follows: ``name``'s LoRA of it if it has one,
    else the base text encoder.

    Raises:
        ValueError: ``name`` is not loaded on ``unet``.
    """
    activate_lora(unet, name)
    for encoder in (text_encoder, text_encoder_2):
        if encoder is not None and snapshot(encoder) is not None:
            activate_lora(encoder, name if name in loaded_adapters(encoder) else None)


def remove_adapter(
    unet: nn.Module,
    name: str,
    *,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
) -> None:
    """Delete adapter ``name`` (no-op if absent); with none left the models are the base again."""
    for module in (unet, text_encoder, text_encoder_2):
        if module is not None:
            remove_lora(module, name)


def text_encoder_kwargs(parts: DiffusionComponents) -> dict[str, nn.Module | None]:
    """The ``text_encoder`` / ``text_encoder_2`` arguments of :func:`load_adapter`,
    :func:`activate` and :func:`remove_adapter` for ``parts`` (None for SD-1.x's second)."""
    return {"text_encoder": parts.text_encoder, "text_encoder_2": parts.text_encoder_2}
