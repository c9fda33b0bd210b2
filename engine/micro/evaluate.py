"""Held-out evaluation of trained micro weights: a sample grid and the micro metrics.

Samples go through diffusers' own :class:`StableDiffusionControlNetPipeline` (DDIM, v-prediction,
classifier-free guidance), so the figures measure the weights, not our engine. Training runs it on
its last weights; ``python -m engine.micro.evaluate FOLDER --out DIR`` runs it on any weight folder
(the shipped one by default), so two folders can be compared on the same held-out pairs.
"""

from __future__ import annotations

import argparse
import json
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


def load_modules(folder: Path) -> dict[str, torch.nn.Module]:
    """Every module of the micro weights in ``folder`` (float32, CPU, eval)."""
    from engine.micro.data import _tokenizer

    states, meta = arch.load_weights(folder)
    if meta.get("tokenizer", "offline") != arch.TOKENIZER:
        raise ValueError(f"{folder}: tokenizer {meta.get('tokenizer')!r}, not {arch.TOKENIZER!r}")
    modules: dict[str, torch.nn.Module] = {
        "vae": arch.build_vae(meta["scaling_factor"]), "unet": arch.build_unet(),
        "controlnet": arch.build_controlnet(), "text_encoder": arch.build_text_encoder(_tokenizer()),
        "inpaint_unet": arch.build_unet(9), "segmenter": arch.build_segmenter(),
    }  # fmt: skip
    for name, module in modules.items():
        module.load_state_dict(states[name])
        module.eval().requires_grad_(False)
    return modules


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m engine.micro.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument("folder", type=Path, nargs="?", default=arch.WEIGHTS_DIR, help="weight folder")
    p.add_argument("--out", type=Path, required=True, help="folder for eval.json and grid.png")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = evaluate(load_modules(args.folder), torch.device("cpu"), args.seed, args.samples,
                      args.steps, args.guidance, args.out)  # fmt: skip
    result["weights"] = str(args.folder)
    (args.out / "eval.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, float)}))


if __name__ == "__main__":
    main()
