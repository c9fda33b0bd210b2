"""Random-weight models written in the on-disk layouts users have (test helper).

Small (the ``tiny`` preset's architecture) but with the real key names and folder structure:

- a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``; a ControlNet folder with ``config.json``),
- a hub cache (``models--owner--name/{refs,blobs,snapshots}``, blobs named by their sha256),
- single files in the original LDM (CompVis / A1111) key layout: an SD checkpoint
  (``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.transformer.``), a
  ControlNet v1.1 file (``control_model.`` only) and a v1.0 file (full SD + ``control_model.``),
- a kohya-format LoRA (``lora_unet_…`` / ``lora_te_…`` with ``lora_down``/``lora_up``/``alpha``).

The LDM key names are written by inverting diffusers' own conversion (``single_file_utils``);
``test_weights_layouts`` checks that converting them back gives the very same tensors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.models.inpaint import random_inpaint_unet
from engine.models.registry import DiffusionComponents, build_components

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _unet_prefixes(config: Any, down_only: bool) -> dict[str, str]:
    """diffusers module prefix → LDM module prefix of a UNet (or a ControlNet's down path)."""
    n, lpb = len(config["block_out_channels"]), config["layers_per_block"]
    out = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i in range(n):
        for j in range(lpb):
            k = i * (lpb + 1) + j + 1
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
        if i < n - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (lpb + 1)}.0.op"
    if down_only:
        return out
    out.update({"conv_norm_out": "out.0", "conv_out": "out.2"})
    up_types = config["up_block_types"]
    for i in range(n):
        for j in range(lpb + 1):
            k = i * (lpb + 1) + j
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
        if i < n - 1:
            slot = 2 if up_types[i].startswith("CrossAttn") else 1
            out[f"up_blocks.{i}.upsamplers.0.conv"] = (
                f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv"
            )
    return out


def _rename(key: str, prefixes: dict[str, str]) -> str:
    best = max((p for p in prefixes if key.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise KeyError(f"no LDM name for {key}")
    tail = key[len(best) + 1 :]
    if ".resnets." in best:
        head, _, rest = tail.partition(".")
        tail = f"{_RESNET.get(head, head)}.{rest}"
    return f"{prefixes[best]}.{tail}"


def unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict → ``model.diffusion_model.*`` keys."""
    prefixes = _unet_prefixes(config, down_only=False)
    return {f"model.diffusion_model.{_rename(k, prefixes)}": v for k, v in state.items()}


def controlnet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet state dict → ``control_model.*`` keys (v1.0/v1.1 layout)."""
    prefixes = _unet_prefixes(config, down_only=True)
    n_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    prefixes["controlnet_cond_embedding.conv_in"] = "input_hint_block.0"
    prefixes["controlnet_cond_embedding.conv_out"] = "input_hint_block.14"
    for k in range(n_blocks):
        prefixes[f"controlnet_cond_embedding.blocks.{k}"] = f"input_hint_block.{2 * (k + 1)}"
    prefixes["controlnet_mid_block"] = "middle_block_out.0"
    for k in range(len([key for key in state if key.startswith("controlnet_down_blocks.")]) // 2):
        prefixes[f"controlnet_down_blocks.{k}"] = f"zero_convs.{k}.0"
    return {f"control_model.{_rename(k, prefixes)}": v for k, v in state.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict → ``first_stage_model.*`` keys (1x1-conv attention)."""
    n = len(config["block_out_channels"])
    prefixes = {
        "encoder.conv_norm_out": "encoder.norm_out",
        "decoder.conv_norm_out": "decoder.norm_out",
    }
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        prefixes[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        prefixes[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for i in range(n):
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{n - 1 - i}.upsample"
        for j in range(config["layers_per_block"] + 1):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        best = max((p for p in prefixes if key.startswith(p + ".")), key=len, default=None)
        if best is None:  # conv_in, conv_out, quant_conv, post_quant_conv: same names
            out[f"first_stage_model.{key}"] = value
            continue
        tail = key[len(best) + 1 :]
        if best.endswith("attentions.0"):
            module, _, param = tail.rpartition(".")
            tail = f"{attn[module]}.{param}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        tail = tail.replace("conv_shortcut", "nin_shortcut")
        out[f"first_stage_model.{prefixes[best]}.{tail}"] = value
    return out


def text_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict → ``cond_stage_model.transformer.*`` keys."""
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.``); checkpoints keep it.
    return {
        f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
        for k, v in state.items()
    }


def tiny_parts(seed: int = 0) -> DiffusionComponents:
    """The tiny preset's components (CPU, float32)."""
    return build_components(ModelConfig(preset="tiny", device="cpu", seed=seed))


def _sd(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def sd_single_file(parts: DiffusionComponents) -> dict[str, torch.Tensor]:
    """The whole SD checkpoint (UNet, VAE, text encoder) in the LDM key layout."""
    out = unet_to_ldm(_sd(parts.unet), parts.unet.config)
    out.update(vae_to_ldm(_sd(parts.vae), parts.vae.config))
    out.update(text_to_ldm(_sd(parts.text_encoder)))
    return out


def write_diffusers_folder(
    parts: DiffusionComponents, folder: Path, *, inpaint_seed: int | None = None
) -> Path:
    """``parts`` as a diffusers pipeline folder (with a 9-channel inpainting UNet if a seed is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    unet = parts.unet if inpaint_seed is None else random_inpaint_unet("tiny", inpaint_seed)
    unet.save_pretrained(folder / "unet")
    parts.vae.save_pretrained(folder / "vae")
    parts.text_encoder.save_pretrained(folder / "text_encoder")
    parts.tokenizer.save_pretrained(folder / "tokenizer")
    parts.scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def write_controlnet_folder(parts: DiffusionComponents, folder: Path) -> Path:
    parts.controlnet.save_pretrained(folder)
    return folder


def write_hub_cache(source: Path, cache: Path, repo: str, *, commit: str = "0" * 40) -> Path:
    """Copy the folder ``source`` into a hub cache as ``repo`` (blobs by sha256, symlinked)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    (root / "blobs").mkdir(exist_ok=True)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = root / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(link.relative_to(root).parts) - 1)) / "blobs" / digest)
    return snapshot


def write_single_file(state: dict[str, torch.Tensor], path: Path) -> Path:
    """``.safetensors`` via safetensors, ``.ckpt``/``.pth`` as a torch pickle (``state_dict`` nested
    for ``.ckpt``, as CompVis checkpoints are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 0}, path)
    else:
        torch.save(state, path)
    return path


def kohya_lora(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    *,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    std: float = 0.05,
    extra: bool = False,
) -> dict[str, torch.Tensor]:
    """A random kohya-sd-scripts LoRA of SD-1.x: every attention projection (q/k/v/out) of the
    UNet and, given ``text_encoder``, of its self-attention, keys ``lora_unet_<module_path>`` /
    ``lora_te_text_model_<module_path>``. ``extra`` also adapts each transformer's ``proj_in``
    (a 1x1 conv in SD-1.x) and feed-forward output at rank 2, alpha 1 (LoRA-C3Lier style)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def add(key: str, module: torch.nn.Module, r: int, a: float) -> None:
        if isinstance(module, torch.nn.Conv2d):
            down = (r, module.in_channels, *module.kernel_size)
            up = (module.out_channels, r, 1, 1)
        else:
            down, up = (r, module.in_features), (module.out_features, r)
        out[f"{key}.lora_down.weight"] = torch.randn(down, generator=gen) * std
        out[f"{key}.lora_up.weight"] = torch.randn(up, generator=gen) * std
        out[f"{key}.alpha"] = torch.tensor(float(a))

    for name, module in unet.named_modules():
        key = f"lora_unet_{name.replace('.', '_')}"
        if isinstance(module, torch.nn.Linear) and name.endswith(
            ("to_q", "to_k", "to_v", "to_out.0")
        ):
            add(key, module, rank, alpha)
        elif extra and name.endswith(("proj_in", "ff.net.2")):
            add(key, module, 2, 1.0)
    if text_encoder is not None:
        for name, module in text_encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(
                ("q_proj", "k_proj", "v_proj", "out_proj")
            ):
                path = name if name.startswith("text_model.") else f"text_model.{name}"
                add(f"lora_te_{path.replace('.', '_')}", module, rank, alpha)
    return out


def write_hf_sam(folder: Path, seed: int = 0) -> Path:
    """A random SAM in transformers' layout (``SamModel.save_pretrained`` + its processor):
    ViT width 64, 2 layers, 256-pixel input."""
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    vision = SamVisionConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=256,
        output_channels=32,
        global_attn_indexes=[1],
        window_size=8,
        mlp_dim=128,
        num_pos_feats=16,
    )
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=256, image_embedding_size=16)
    decoder = SamMaskDecoderConfig(
        hidden_size=32, num_attention_heads=2, mlp_dim=64, iou_head_hidden_dim=32
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SamModel(
            SamConfig(
                vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
            )
        )
    model.save_pretrained(folder)
    size = {"longest_edge": 256}
    SamProcessor(
        SamImageProcessor(size=size, pad_size={"height": 256, "width": 256})
    ).save_pretrained(folder)
    return folder


def write_all_layouts(root: Path) -> dict[str, Path]:
    """The tiny weights in every layout under ``root``: folders, a hub cache, LDM single files,
    a single-file inpainting UNet and a transformers SAM (keys name them)."""
    from diffusers import UNet2DConditionModel

    parts = tiny_parts()
    sd = sd_single_file(parts)
    control = controlnet_to_ldm(dict(parts.controlnet.state_dict()), parts.controlnet.config)
    inpaint_folder = write_diffusers_folder(parts, root / "inpaint", inpaint_seed=5)
    inpaint = UNet2DConditionModel.from_pretrained(str(inpaint_folder / "unet"))
    return {
        "folder": write_diffusers_folder(parts, root / "sd"),
        "controlnet_folder": write_controlnet_folder(parts, root / "cn"),
        "inpaint_folder": inpaint_folder,
        "hub": write_hub_cache(root / "sd", root / "hub", "someone/tiny-sd"),
        "hub_cn": write_hub_cache(root / "cn", root / "hub", "someone/tiny-cn"),
        "hub_cache": root / "hub",
        "safetensors": write_single_file(sd, root / "files" / "model.safetensors"),
        "ckpt": write_single_file(sd, root / "files" / "model.ckpt"),
        "cn11": write_single_file(control, root / "files" / "control_v11p_openpose.pth"),
        "cn10": write_single_file({**sd, **control}, root / "files" / "control_openpose.pth"),
        "hf_sam": write_hf_sam(root / "sam-hf"),
        "inpaint_file": write_single_file(
            unet_to_ldm(dict(inpaint.state_dict()), inpaint.config),
            root / "files" / "inpainting.safetensors",
        ),
    }
