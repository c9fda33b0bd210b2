"""A pool of world samples for training: drawn in parallel worker processes, held as tensors.

Each sample carries three text variants, tokenized: the grammar caption, the same caption as the
engine's template refiner expands it (what a render actually feeds the text encoder), and the
refiner's background-only prompt (what the plate's inpainting is conditioned on).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
from dataclasses import dataclass

import numpy as np
import torch

from engine.micro.world import make_sample, negative_caption

IDENTIFIER = "sks"
"""The appearance identifier token the engine puts into refined prompts by default."""


@dataclass
class Pool:
    """``n`` samples as uint8 / int tensors (CPU)."""

    images: torch.Tensor
    """(n, 3, H, W) uint8."""
    scenes: torch.Tensor
    """(n, 3, H, W) uint8: the same scenes without the figure."""
    poses: torch.Tensor
    """(n, 3, H, W) uint8 pose maps."""
    masks: torch.Tensor
    """(n, 1, H, W) uint8 in {0, 1}."""
    caption_ids: torch.Tensor
    """(n, 77) int64: the grammar caption."""
    refined_ids: torch.Tensor
    """(n, 77) int64: the refiner's full frame prompt of the caption."""
    background_ids: torch.Tensor
    """(n, 77) int64: the refiner's background prompt."""
    captions: list[str]

    def to(self, device: torch.device) -> Pool:
        """This pool with every tensor on ``device`` (in place; returns self)."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self


@functools.lru_cache(maxsize=1)
def _tokenizer():  # type: ignore[no-untyped-def]
    from engine.micro.arch import TOKENIZER, build_tokenizer

    return build_tokenizer(TOKENIZER)


def tokenize(texts: list[str]) -> np.ndarray:
    """(len(texts), 77) int64 ids of the offline CLIP tokenizer (padded, truncated)."""
    tok = _tokenizer()
    ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    return np.asarray(ids.input_ids, np.int64)


@functools.lru_cache(maxsize=4096)
def _refined(caption: str) -> tuple[str, str]:
    from engine.refine.schema import RefineRequest
    from engine.refine.template import TemplateRefiner

    r = TemplateRefiner().refine(RefineRequest(coarse=caption, identifier=IDENTIFIER))
    return r.full, r.background_prompt


def _chunk(args: tuple[int, int, int, int]) -> dict[str, np.ndarray | list[str]]:
    seed, start, stop, size = args
    torch.set_num_threads(1)
    out: dict[str, list] = {k: [] for k in ("image", "scene", "pose", "mask", "cap", "full", "bg")}
    for i in range(start, stop):
        s = make_sample(seed, i, size)
        out["image"].append(s.image)
        out["scene"].append(s.scene)
        out["pose"].append(s.pose_map)
        out["mask"].append(s.mask)
        full, bg = _refined(s.look.caption)
        out["cap"].append(s.look.caption)
        out["full"].append(full)
        out["bg"].append(bg)
    return {
        "image": np.stack(out["image"]),
        "scene": np.stack(out["scene"]),
        "pose": np.stack(out["pose"]),
        "mask": np.stack(out["mask"]),
        "cap_ids": tokenize(out["cap"]),
        "full_ids": tokenize(out["full"]),
        "bg_ids": tokenize(out["bg"]),
        "captions": out["cap"],
    }


def build_pool(seed: int, n: int, size: int = 64, workers: int = 1, start: int = 0) -> Pool:
    """Samples ``start .. start+n`` of the world seeded ``seed``, drawn by ``workers`` processes.

    Deterministic: the same arguments give the same pool whatever ``workers`` is.
    """
    step = max(64, -(-n // (workers * 8)))
    jobs = [(seed, a, min(a + step, start + n), size) for a in range(start, start + n, step)]
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_chunk, jobs)
    else:
        parts = [_chunk(job) for job in jobs]

    def cat(key: str) -> np.ndarray:
        return np.concatenate([p[key] for p in parts])  # type: ignore[misc]

    def chw(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()

    return Pool(
        images=chw(cat("image")),
        scenes=chw(cat("scene")),
        poses=chw(cat("pose")),
        masks=torch.from_numpy(cat("mask"))[:, None].contiguous(),
        caption_ids=torch.from_numpy(cat("cap_ids")),
        refined_ids=torch.from_numpy(cat("full_ids")),
        background_ids=torch.from_numpy(cat("bg_ids")),
        captions=[c for p in parts for c in p["captions"]],  # type: ignore[union-attr]
    )


def negative_bank(seed: int, n: int = 64) -> torch.Tensor:
    """(n, 77) ids of unconditional texts: the empty prompt (half) and typical negative prompts."""
    rng = np.random.default_rng([seed, 7])
    texts = [""] * (n // 2) + [negative_caption(rng) for _ in range(n - n // 2)]
    return torch.from_numpy(tokenize(texts))
