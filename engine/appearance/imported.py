"""Bring your own character: a LoRA made elsewhere (``appearance.lora``) as :class:`AdapterWeights`.

The file is read by the library that defines its format, loaded onto the resident models under a
temporary name, read back from peft's layers and removed again (the models are left exactly as
they were, as :mod:`engine.appearance.train` leaves them):

- kohya-ss / A1111 (``lora_unet_…``, ``lora_te_…``; SDXL's ``lora_te1_…`` / ``lora_te2_…``;
  ``.alpha``) and diffusers (``pytorch_lora_weights.safetensors``, ``unet.…`` /
  ``text_encoder.…`` / ``text_encoder_2.…`` keys, old and peft style):
  ``StableDiffusion(XL)Pipeline.lora_state_dict`` + ``load_lora_into_unet`` /
  ``load_lora_into_text_encoder`` (diffusers converts the keys and per-module alphas);
- peft (a folder with ``adapter_config.json`` + ``adapter_model.safetensors``, the UNet's; a
  text-encoder LoRA in ``text_encoder/``, SDXL's second in ``text_encoder_2/``):
  ``LoraConfig.from_pretrained`` + ``load_peft_weights``.

What comes back is normalised to one rank and scaling 1 so the engine's per-row machinery takes
it like a trained adapter: each module's ``B`` is multiplied by its own ``alpha / r`` and by
``appearance.lora_scale``, and modules of a smaller rank are zero-padded to the largest (both
exact: ``W + s·B·A`` is unchanged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.appearance.lora import lora_layers, refresh, remove_lora, restore, snapshot
from engine.appearance.train import AdapterWeights
from engine.config import ModelConfig
from engine.models.errors import WeightsNotFoundError

IMPORTING = "appearance_importing"
"""Temporary adapter name while an imported LoRA is read."""
TEXT_PREFIXES = ("text_encoder", "text_encoder_2")
"""diffusers' key prefixes (and peft sub-folders) of the first and SDXL's second text encoder."""


def _fail(source: Path, why: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"appearance.lora={str(source)!r}: {why}; name a kohya / diffusers .safetensors LoRA of "
        "an SD-1.x or SDXL model, or a peft folder with adapter_config.json"
    )


def _load_peft(folder: Path, module: nn.Module) -> None:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    config = LoraConfig.from_pretrained(str(folder))
    state = {
        k.removeprefix("base_model.model."): v for k, v in load_peft_weights(str(folder)).items()
    }
    inject_adapter_in_model(config, module, adapter_name=IMPORTING)
    result: Any = set_peft_model_state_dict(module, state, adapter_name=IMPORTING)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise ValueError(f"tensors that fit no module: {unexpected[:3]}")


def _load_diffusers(path: Path, unet: nn.Module, encoders: list[nn.Module | None]) -> None:
    """Load the file's UNet and text-encoder LoRAs (``encoders``: the first and, for SDXL, the
    second text encoder) under :data:`IMPORTING`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from engine.models.components import uses_added_conditioning

    # SDXL's loader converts kohya's SDXL names (lora_unet_input_blocks_*, lora_te1_/lora_te2_).
    xl = uses_added_conditioning(unet)
    pipeline: Any = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    folder, weight_name = (path.parent, path.name) if path.is_file() else (path, None)
    # unet_config: kohya's SGM block names (input_blocks_4_1_…) map by the UNet's layout, as
    # the pipelines' own load_lora_weights does; without it they stay unconverted.
    state, alphas = pipeline.lora_state_dict(
        str(folder), weight_name=weight_name, local_files_only=True, unet_config=unet.config
    )
    if not any(k.startswith("unet.") for k in state):
        raise ValueError("it holds no UNet LoRA")
    pipeline.load_lora_into_unet(state, alphas, unet, adapter_name=IMPORTING)
    for prefix, encoder in zip(TEXT_PREFIXES, encoders, strict=True):
        if not any(k.startswith(f"{prefix}.") for k in state):
            continue
        if encoder is None:
            raise ValueError(f"it adapts {prefix}, which this model does not have")
        pipeline.load_lora_into_text_encoder(
            state, alphas, encoder, prefix=prefix, adapter_name=IMPORTING
        )


def _read_back(module: nn.Module, scale: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A, B·alpha/r·scale)} of the temporary adapter on ``module``."""
    paths = {id(m): name for name, m in module.named_modules()}
    out = {}
    for tuner in lora_layers(module):
        layer: Any = tuner  # peft's LoRA layer (lora_A / lora_B / scaling by adapter name)
        if IMPORTING not in getattr(layer, "lora_A", {}):
            continue
        if getattr(layer, "use_dora", {}).get(IMPORTING):
            raise ValueError("DoRA adapters cannot be mixed per batch row (peft)")
        a = layer.lora_A[IMPORTING].weight  # (r, in[, kh, kw])
        lora_b = layer.lora_B[IMPORTING]  # (out, r[, 1, 1])
        if getattr(lora_b, "bias", None) is not None:
            raise ValueError("LoRA biases are not supported")
        b = lora_b.weight * (layer.scaling[IMPORTING] * scale)
        out[paths[id(layer)]] = (a.detach().float().cpu(), b.detach().float().cpu())
    return out


def _padded(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int
) -> dict[str, torch.Tensor]:
    """peft state-dict keys (no adapter name), A and B zero-padded to ``rank``."""
    state = {}
    for name, (a, b) in pairs.items():
        pa = a.new_zeros((rank, *a.shape[1:]))
        pa[: a.shape[0]] = a
        pb = b.new_zeros((b.shape[0], rank, *b.shape[2:]))
        pb[:, : b.shape[1]] = b
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = pa, pb
    return state


def lora_location(value: str, model: ModelConfig) -> Path:
    """The local file or folder of ``appearance.lora``: a path, or a hub id's snapshot (the
    cache, else a download of its ``.safetensors`` and ``.json`` files unless offline)."""
    from engine.models.real import offline
    from engine.models.sources import classify, hub_folder

    source = classify(value, "lora", section="appearance")
    if source.kind != "hub":
        return Path(source.location)
    return hub_folder(
        value,
        "character LoRA",
        "lora",
        offline=offline(model),
        variant=None,
        section="appearance",
        patterns=["*.safetensors", "*.json"],
    )


def import_lora(
    source: Path,
    unet: nn.Module,
    text_encoder: nn.Module,
    *,
    text_encoder_2: nn.Module | None = None,
    scale: float = 1.0,
) -> AdapterWeights:
    """The LoRA at ``source`` (file or folder) as :class:`AdapterWeights` of ``unet`` /
    ``text_encoder`` / SDXL's ``text_encoder_2`` (rank = its largest, alpha = rank, float32 CPU
    tensors).

    Raises:
        WeightsNotFoundError: ``source`` is missing, of an unknown format, of another model
            (tensors that fit no module, a second text encoder's LoRA without one), or a DoRA /
            biased LoRA.
    """
    source = Path(source)
    if not source.exists():
        raise _fail(source, "it does not exist")
    encoders = [text_encoder, text_encoder_2]
    modules = [m for m in (unet, *encoders) if m is not None]
    states = [snapshot(m) for m in modules]
    try:
        peft_unet = source / "adapter_config.json"
        if source.is_dir() and (peft_unet.is_file() or (source / "unet").is_dir()):
            _load_peft(source if peft_unet.is_file() else source / "unet", unet)
            for prefix, encoder in zip(TEXT_PREFIXES, encoders, strict=True):
                if not (source / prefix / "adapter_config.json").is_file():
                    continue
                if encoder is None:
                    raise ValueError(f"it adapts {prefix}, which this model does not have")
                _load_peft(source / prefix, encoder)
            kind = "peft"
        else:
            _load_diffusers(source, unet, encoders)
            kind = "kohya/diffusers"
        for module in modules:
            refresh(module)
        pairs = [_read_back(m, scale) if m is not None else {} for m in (unet, *encoders)]
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as e:
        raise _fail(
            source, f"it does not load ({(str(e).splitlines() or [''])[0][:300]})"
        ) from None
    finally:
        for module, state in zip(modules, states, strict=True):
            refresh(module)
            remove_lora(module, IMPORTING)
            restore(module, state)
    unet_pairs, text_pairs, text_2_pairs = pairs
    if not unet_pairs:
        raise _fail(source, "it adapts no module of the UNet")
    rank = max(a.shape[0] for part in pairs for a, _ in part.values())
    return AdapterWeights(
        unet=_padded(unet_pairs, rank),
        text_encoder=_padded(text_pairs, rank) if text_pairs else None,
        rank=rank,
        alpha=float(rank),
        target_modules=tuple(sorted(unet_pairs)),
        text_target_modules=tuple(sorted(text_pairs)),
        text_encoder_2=_padded(text_2_pairs, rank) if text_2_pairs else None,
        text_2_target_modules=tuple(sorted(text_2_pairs)),
        metadata={"imported": str(source), "format": kind, "scale": scale},
    )
