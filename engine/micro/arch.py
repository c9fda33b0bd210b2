"""The ``micro`` preset's architectures (diffusers' and transformers' own classes) and weights I/O.

Small enough to train from nothing on one GPU in minutes and to sample on a CPU in about a second
a frame, yet the same classes as Stable Diffusion, so the whole engine (chain, LoRA, plate, Ray,
Serve) runs on it unchanged. What differs from SD, and why:

- a 2× VAE (64² frames → 32² latents; an 8× VAE at 64² keeps too little of a 64² figure);
- the ControlNet's conditioning embedding downsamples 2× to match it;
- v-prediction (measured better than epsilon for this world in the issue's probe).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

SIZE = 64
"""Frame side of the world the shipped weights were trained on."""

WEIGHTS_DIR = Path(__file__).parent / "weights"
"""Where the shipped weights and their training card live (package data)."""

WEIGHT_FILES = ("micro_a.safetensors", "micro_b.safetensors")
"""The shipped weights, split in two (each under the device tool's 16 MiB per file)."""

TOKENIZER = "micro"
"""The vocabulary new training runs use (:func:`build_tokenizer`); recorded in the weights."""

SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
}
"""SD's noise schedule with v-prediction."""

_BLOCKS: dict[str, Any] = {
    "block_out_channels": (32, 64, 128),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "layers_per_block": 1,
    "attention_head_dim": (2, 4, 8),
    "norm_num_groups": 16,
    "cross_attention_dim": 64,
}
TEXT = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "heads": 2}


def build_unet(in_channels: int = 4) -> UNet2DConditionModel:
    """The denoising UNet (``in_channels=4``) or the 9-channel inpainting UNet."""
    return UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=in_channels,
        out_channels=4,
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        **_BLOCKS,
    )


def build_controlnet() -> ControlNetModel:
    """The OpenPose ControlNet: the UNet's down path, a 2× conditioning embedding."""
    return ControlNetModel(in_channels=4, conditioning_embedding_out_channels=(16, 32), **_BLOCKS)


def build_vae(scaling_factor: float = 1.0) -> AutoencoderKL:
    """A 2× AutoencoderKL with 4 latent channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(64, 128),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=SIZE,
        scaling_factor=scaling_factor,
    )


@functools.lru_cache(maxsize=1)
def micro_words() -> tuple[str, ...]:
    """Every word of the refiner's tables and of the world's grammar, sorted: the micro
    tokenizer makes each one token, so refined prompts fit the text encoder's 77 tokens."""
    import re

    from engine.micro import world
    from engine.refine import tables

    words: set[str] = set()

    def walk(x: Any) -> None:
        if isinstance(x, str):
            words.update(re.findall(r"[a-z]+", x.lower()))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, list | tuple | set | frozenset):
            for v in x:
                walk(v)

    for name in dir(tables):
        if name.isupper():
            walk(getattr(tables, name))
    walk([world.COLOURS, world.SUBJECTS, world.TOPS, world.BOTTOMS, world.SCENES])
    walk(world.NEGATIVE_WORDS)
    return tuple(sorted(w for w in words if len(w) > 1))


def build_tokenizer(kind: str = "micro") -> CLIPTokenizer:
    """``micro``: the offline CLIP tokenizer plus :func:`micro_words`; ``offline``: without them
    (the first shipped weights' vocabulary)."""
    from engine.models.tokenizer import build_offline_tokenizer

    if kind == "offline":
        return build_offline_tokenizer()
    if kind != "micro":
        raise ValueError(f"unknown micro tokenizer {kind!r}: use micro or offline")
    return build_offline_tokenizer(micro_words())


def extend_text_encoder(
    state: dict[str, torch.Tensor], old: CLIPTokenizer, new: CLIPTokenizer
) -> dict[str, torch.Tensor]:
    """A text-encoder state for ``new``'s vocabulary from one trained on ``old``'s (whose ids
    ``new`` keeps, adding whole words after them): each new word's embedding starts as the mean
    of the embeddings of the pieces ``old`` split it into."""
    key = "embeddings.token_embedding.weight"
    table = state[key]
    grown = table.new_empty((len(new), table.shape[1]))
    grown[: len(old)] = table
    for token, i in new.get_vocab().items():
        if i < len(old):
            continue
        pieces = old(token, add_special_tokens=False).input_ids
        grown[i] = table[pieces].mean(dim=0) if pieces else table.mean(dim=0)
    return {**state, key: grown}


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer CLIP text encoder (:data:`TEXT`) over ``tokenizer``'s vocabulary."""
    from engine.models.tokenizer import clip_text_encoder

    return clip_text_encoder(tokenizer, TEXT)


def build_segmenter() -> torch.nn.Module:
    """A small fully convolutional figure segmenter for the micro metrics: (B, 3, H, W) in [0, 1]
    → (B, 1, H, W) logits of "figure pixel". Trained on the world's ground-truth masks."""
    ch = 32
    layers: list[torch.nn.Module] = []
    c_in = 3
    for dilation in (1, 1, 2, 4, 1):
        layers += [torch.nn.Conv2d(c_in, ch, 3, padding=dilation, dilation=dilation)]
        layers += [torch.nn.GroupNorm(8, ch), torch.nn.SiLU()]
        c_in = ch
    layers.append(torch.nn.Conv2d(ch, 1, 1))
    return torch.nn.Sequential(*layers)


MODULES = ("vae", "unet", "controlnet", "text_encoder", "inpaint_unet", "segmenter")
_FILE_OF = {"vae": 0, "unet": 0, "text_encoder": 0, "controlnet": 1, "inpaint_unet": 1,
            "segmenter": 1}  # fmt: skip


def save_weights(
    modules: dict[str, torch.nn.Module], folder: Path, meta: dict[str, Any]
) -> list[Path]:
    """Write ``modules`` as float16 safetensors (keys ``<module>.<param>``) split over
    :data:`WEIGHT_FILES`; ``meta`` (JSON-able) goes into every file's metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            t = value.detach().to("cpu")
            shards[_FILE_OF[name]][f"{name}.{key}"] = (
                t.half() if t.is_floating_point() else t
            ).contiguous()
    paths = []
    for shard, file in zip(shards, WEIGHT_FILES, strict=True):
        path = folder / file
        tmp = path.with_suffix(".tmp")
        save_file(shard, str(tmp), metadata={"micro": json.dumps(meta)})
        tmp.replace(path)
        paths.append(path)
    return paths


@functools.lru_cache(maxsize=4)
def weights_digest(folder: Path = WEIGHTS_DIR) -> str:
    """First 12 hex digits of the SHA-256 of the shipped weight files (provenance, cache keys)."""
    h = hashlib.sha256()
    for file in WEIGHT_FILES:
        path = folder / file
        h.update(path.read_bytes() if path.is_file() else b"missing")
    return h.hexdigest()[:12]


def load_weights(folder: Path = WEIGHTS_DIR) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``({module: state_dict (float32)}, meta)`` from :data:`WEIGHT_FILES` in ``folder``.

    Raises:
        FileNotFoundError: naming the missing file and how to get it.
    """
    from safetensors import safe_open

    states: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict[str, Any] = {}
    for file in WEIGHT_FILES:
        path = folder / file
        if not path.is_file():
            raise FileNotFoundError(
                f"micro weights {path} are missing: they ship with the repository "
                "(engine/micro/weights/); retrain with `python -m engine.micro.train`"
            )
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("micro", "{}"))
        for key, value in load_file(str(path)).items():
            module, param = key.split(".", 1)
            states.setdefault(module, {})[param] = (
                value.float() if value.is_floating_point() else value
            )
    return states, meta
