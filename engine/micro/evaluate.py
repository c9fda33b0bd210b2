"""Held-out evaluation of trained micro weights: a sample grid and the micro metrics.

Samples go through diffusers' own :class:`StableDiffusionControlNetPipeline` (DDIM, v-prediction,
classifier-free guidance), so the figures measure the weights, not our engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.micro import arch
from engine.micro.world import make_sample

HELD_OUT = 10_000_000
"""Index of the first held-out sample (training pools stay far below it)."""


def pipeline(modules: dict[str, torch.nn.Module], dev: torch.device) -> Any:
    """A ControlNet pipeline over the trained modules (float32)."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    from engine.micro.data import _tokenizer

    pipe = StableDiffusionControlNetPipeline(
        vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=_tokenizer(),
        unet=modules["unet"], controlnet=modules["controlnet"],
        scheduler=DDIMScheduler.from_config(arch.SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


@torch.no_grad()
def evaluate(modules: dict[str, torch.nn.Module], dev: torch.device, seed: int, n: int,
             steps: int, guidance: float, out: Path) -> dict[str, Any]:  # fmt: skip
    """Sample ``n`` held-out (pose, caption) pairs; write ``grid.png`` (truth | pose | sample)
    and return the micro metrics against the truth's own scores through the same segmenter."""
    from engine.metrics.micro import classify_scenes, figure_iou, figure_masks, garment_colours

    for m in modules.values():
        m.to(dev, torch.float32).eval()
    pipe = pipeline(modules, dev)
    samples = [make_sample(seed, HELD_OUT + i) for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    images = pipe(
        prompt=[s.look.caption for s in samples],
        image=[Image.fromarray(s.pose_map) for s in samples],
        num_inference_steps=steps, guidance_scale=guidance, generator=gen,
        height=arch.SIZE, width=arch.SIZE, output_type="np",
    ).images  # fmt: skip
    fake = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    truth = np.stack([s.image for s in samples])
    kp = np.stack([s.keypoints for s in samples])
    seg = modules["segmenter"]
    colours = [s.look.colour for s in samples]
    scenes = [s.look.scene for s in samples]
    result = {
        "samples": n, "steps": steps, "guidance": guidance,
        "figure_iou": float(figure_iou(figure_masks(fake, seg), kp).mean()),
        "figure_iou_truth": float(figure_iou(figure_masks(truth, seg), kp).mean()),
        "colour_accuracy": _share(garment_colours(fake, kp), colours),
        "colour_accuracy_truth": _share(garment_colours(truth, kp), colours),
        "scene_accuracy": _share(classify_scenes(fake, kp), scenes),
        "scene_accuracy_truth": _share(classify_scenes(truth, kp), scenes),
        "captions": [s.look.caption for s in samples], "scenes": scenes,
    }  # fmt: skip
    rows = [
        np.concatenate([t, s.pose_map, f], axis=1)
        for t, s, f in zip(truth, samples, fake, strict=True)
    ]
    cols = 4
    rows += [np.zeros_like(rows[0])] * (-len(rows) % cols)
    grid = np.concatenate(
        [np.concatenate(rows[i : i + cols], axis=1) for i in range(0, len(rows), cols)], axis=0
    )
    Image.fromarray(grid).save(out / "grid.png")
    return result


def _share(seen: list[str | None], wanted: list[str]) -> float:
    """Fraction of samples whose classified name is the wanted one (None counts as wrong)."""
    return float(np.mean([a == b for a, b in zip(seen, wanted, strict=True)]))
