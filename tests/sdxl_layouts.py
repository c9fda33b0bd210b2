"""Random SDXL weights in the on-disk layouts users have (test helper).

``sdxl-tiny``'s components (SDXL's block structure at toy widths) written as:

- an SDXL diffusers folder (``model_index.json`` of StableDiffusionXLPipeline, ``unet/``,
  ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``,
  ``scheduler/``) and an SDXL ControlNet folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``, thibaud's / xinsir's layout);
- one single-file SDXL checkpoint in the original (Stability) key layout:
  ``model.diffusion_model.`` (``label_emb.0.*`` = the text_time embedding),
  ``first_stage_model.``, ``conditioner.embedders.0.transformer.`` (CLIP ViT-L, transformers'
  names) and ``conditioner.embedders.1.model.`` (OpenCLIP bigG: fused ``in_proj``,
  ``text_projection`` transposed), written by inverting diffusers' own conversion tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from weights_layouts import _sd, unet_to_ldm, vae_to_ldm, write_single_file

from engine.config import ModelConfig
from engine.models.inpaint import random_xl_inpaint_unet
from engine.models.registry import DiffusionComponents, build_components


def tiny_xl_parts(seed: int = 0) -> DiffusionComponents:
    """The sdxl-tiny preset's components (CPU, float32)."""
    return build_components(ModelConfig(preset="sdxl-tiny", device="cpu", seed=seed))


def write_xl_folder(parts: DiffusionComponents, folder: Path) -> Path:
    """``parts`` as an SDXL diffusers pipeline folder."""
    assert parts.text_encoder_2 is not None and parts.tokenizer_2 is not None
    folder.mkdir(parents=True, exist_ok=True)
    parts.unet.save_pretrained(folder / "unet")
    parts.vae.save_pretrained(folder / "vae")
    parts.text_encoder.save_pretrained(folder / "text_encoder")
    parts.text_encoder_2.save_pretrained(folder / "text_encoder_2")
    parts.tokenizer.save_pretrained(folder / "tokenizer")
    parts.tokenizer_2.save_pretrained(folder / "tokenizer_2")
    parts.scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "force_zeros_for_empty_prompt": True,
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def xl_unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """An SDXL UNet state dict → ``model.diffusion_model.*`` (the text_time embedding as
    ``label_emb.0.0`` / ``label_emb.0.2``)."""
    added = {k: v for k, v in state.items() if k.startswith("add_embedding.")}
    rest = unet_to_ldm({k: v for k, v in state.items() if k not in added}, config)
    for key, value in added.items():
        layer = {"linear_1": "0", "linear_2": "2"}[key.split(".")[1]]
        rest[f"model.diffusion_model.label_emb.0.{layer}.{key.split('.')[-1]}"] = value
    return rest


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection state dict → OpenCLIP keys under ``prefix``."""
    state = {k if k.startswith("text_projection") else _text_key(k): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for diffusers_key, ldm_key in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items():
        value = state.pop(diffusers_key)
        out[prefix + ldm_key] = value.T.contiguous() if ldm_key == "text_projection" else value
    layers = sorted({k.split(".")[3] for k in state if k.startswith("text_model.encoder.")})
    for i in layers:
        src = f"text_model.encoder.layers.{i}."
        dst = f"{prefix}transformer.resblocks.{i}."
        attn = src + "self_attn."
        for kind in ("weight", "bias"):
            fused = [state.pop(f"{attn}{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(fused)
            out[f"{dst}attn.out_proj.{kind}"] = state.pop(f"{attn}out_proj.{kind}")
            out[f"{dst}ln_1.{kind}"] = state.pop(f"{src}layer_norm1.{kind}")
            out[f"{dst}ln_2.{kind}"] = state.pop(f"{src}layer_norm2.{kind}")
            out[f"{dst}mlp.c_fc.{kind}"] = state.pop(f"{src}mlp.fc1.{kind}")
            out[f"{dst}mlp.c_proj.{kind}"] = state.pop(f"{src}mlp.fc2.{kind}")
    left = [k for k in state if "position_ids" not in k]
    assert not left, f"unmapped OpenCLIP keys: {left}"
    return out


def _text_key(key: str) -> str:
    # transformers >= 5.6 flattened CLIP text models (no ``text_model.``); checkpoints keep it.
    return key if key.startswith("text_model.") else f"text_model.{key}"


def xl_single_file(parts: DiffusionComponents) -> dict[str, torch.Tensor]:
    """The whole SDXL checkpoint (UNet, VAE, both text encoders) in Stability's key layout."""
    assert parts.text_encoder_2 is not None
    out = xl_unet_to_ldm(_sd(parts.unet), parts.unet.config)
    out.update(vae_to_ldm(_sd(parts.vae), parts.vae.config))
    te1 = _sd(parts.text_encoder)
    out.update({f"conditioner.embedders.0.transformer.{_text_key(k)}": v for k, v in te1.items()})
    out.update(open_clip_to_ldm(_sd(parts.text_encoder_2), "conditioner.embedders.1.model."))
    return out


def write_xl_layouts(root: Path, seed: int = 0) -> dict[str, Path]:
    """Folder, ControlNet folder, single ``.safetensors``, a single-file ControlNet in diffusers
    keys (thibaud's ``OpenPoseXL2.safetensors``) and a 9-channel inpainting UNet folder (SDXL
    inpainting 0.1's layout) of ``sdxl-tiny`` under ``root``."""
    parts = tiny_xl_parts(seed)
    folder = write_xl_folder(parts, root / "sdxl")
    parts.controlnet.save_pretrained(root / "sdxl-controlnet")
    single = write_single_file(xl_single_file(parts), root / "sdxl-single.safetensors")
    control_file = write_single_file(_sd(parts.controlnet), root / "OpenPoseXL2.safetensors")
    inpaint = random_xl_inpaint_unet(ModelConfig(preset="sdxl-tiny", seed=seed))
    inpaint.save_pretrained(root / "sdxl-inpaint" / "unet")
    return {
        "folder": folder,
        "controlnet": root / "sdxl-controlnet",
        "single": single,
        "controlnet_file": control_file,
        "inpaint": root / "sdxl-inpaint",
    }


def kohya_xl_lora(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    *,
    rank: int = 4,
    seed: int = 0,
    diffusers_names: bool = False,
    text_encoder_2: torch.nn.Module | None = None,
    rank_2: int = 2,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A random kohya-sd-scripts SDXL LoRA: the UNet's attention projections under their SGM
    (LDM) block names (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), or with
    ``diffusers_names`` under diffusers' module paths (``lora_unet_down_blocks_1_…``), and the
    first text encoder's self-attention as ``lora_te1_text_model_…``; alpha = rank / 2. With
    ``text_encoder_2``, also its self-attention and MLP (``lora_te2_text_model_…_mlp_fc1``) at
    rank ``rank_2`` (alpha ``rank_2 / 2``). Also returns {kohya key prefix: diffusers module
    name} for a reference injection."""
    from weights_layouts import _rename, _unet_prefixes

    gen = torch.Generator().manual_seed(seed)
    prefixes = _unet_prefixes(unet.config, down_only=False)
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    ends = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
    modules = [("lora_unet_", n, m, ends, rank) for n, m in unet.named_modules()]
    modules += [("lora_te1_", n, m, ends, rank) for n, m in text_encoder.named_modules()]
    if text_encoder_2 is not None:
        ends_2 = (*ends, "mlp.fc1", "mlp.fc2")
        modules += [("lora_te2_", n, m, ends_2, rank_2) for n, m in text_encoder_2.named_modules()]
    for prefix, name, module, targets, r in modules:
        if not (isinstance(module, torch.nn.Linear) and name.endswith(targets)):
            continue
        if prefix.startswith("lora_te"):
            path = _text_key(name)
        else:
            path = name if diffusers_names else _rename(name, prefixes)
        key = prefix + path.replace(".", "_")
        out[f"{key}.lora_down.weight"] = torch.randn(r, module.in_features, generator=gen) * 0.05
        out[f"{key}.lora_up.weight"] = torch.randn(module.out_features, r, generator=gen) * 0.05
        out[f"{key}.alpha"] = torch.tensor(r / 2)
        names[key] = name
    return out, names
