"""The ``micro`` section of ``metrics.json``: :mod:`engine.metrics.micro` on one scored video.

A render made with the ``micro`` preset shows a figure in a world whose ground truth we know, so
besides the paper's metrics (kept as they are) it gets five that mean something there: pose
following (figure IoU with the pose body mask), prompt following (the top garment's colour against
the prompt's colour word, and the background's scene against the prompt's scene word), appearance
drift (body colour histogram L1 and torso texture change
between adjacent frames) and background change outside the person masks. Per frame: the IoU, the
classified colour and the classified scene; per adjacent pair: drift and background change; aggregates are the means.

The colour word is read from the user's prompt (the render config's ``prompt``) rather than the
refined frame prompt, whose extra clothing words name other colours; the section says which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from engine.config import RenderConfig
    from engine.metrics.inputs import ScoreInputs

MICRO_AGGREGATE = (
    "figure_iou",
    "colour_accuracy",
    "scene_accuracy",
    "body_hist_l1",
    "torso_texture_change",
    "background_change",
)
"""Aggregate keys of the micro section, in table order."""
MICRO_LABELS: dict[str, str] = {
    "figure_iou": "Figure IoU (pose) ↑",
    "colour_accuracy": "Garment colour right ↑",
    "scene_accuracy": "Scene right ↑",
    "body_hist_l1": "Body hist L1 ↓",
    "torso_texture_change": "Torso texture change ↓",
    "background_change": "Background change ↓",
}
"""Short labels with the better direction (↑ higher is better, ↓ lower is better)."""


def is_micro(config: RenderConfig | None) -> bool:
    """Whether a render's config used the ``micro`` preset (None = unknown → False)."""
    return config is not None and config.model.preset == "micro"


def _prompt(inputs: ScoreInputs) -> tuple[str | None, str | None]:
    """The prompt whose colour word counts, and where it came from."""
    if inputs.config is not None and inputs.config.prompt:
        return inputs.config.prompt, "render config prompt (the user's)"
    return inputs.prompt, inputs.source.get("prompt")


def micro_section(inputs: ScoreInputs, segmenter: torch.nn.Module | None = None) -> dict[str, Any]:
    """The micro metrics of one video (see module docstring); JSON-ready.

    Args:
        inputs: T >= 2 frames (H, W, 3) uint8 with their (T, 18, 3) keypoints.
        segmenter: the figure segmenter (default: the one shipped with the micro weights).

    Returns:
        ``{"aggregate": {MICRO_AGGREGATE → float | None}, "per_frame": {"figure_iou": T floats,
        "garment_colour": T names | None, "colour_right": T bools | None, "scene": T names | None,
        "scene_right": T bools | None}, "per_pair":
        {"body_hist_l1", "torso_texture_change", "background_change": T-1 floats},
        "settings": {...}, "null_reasons": {...}}``; without keypoints every value is None
        with the reason.
    """
    from engine.metrics.micro import (
        appearance_drift,
        background_change,
        classify_scenes,
        figure_iou,
        figure_masks,
        garment_colours,
    )
    from engine.micro.world import parse_caption

    n = len(inputs.frames)
    prompt, prompt_source = _prompt(inputs)
    colour, scene = parse_caption(prompt) if prompt else (None, None)
    settings = {
        "prompt": prompt,
        "prompt_source": prompt_source,
        "prompt_colour": colour,
        "prompt_scene": scene,
        "segmenter": "the micro weights' figure segmenter",
        "hist": "4x4x4 RGB histogram of the pose body mask, L1 (0 = same, 2 = disjoint)",
        "texture": "|change| of the torso's grey-level std (0..255)",
        "scene": "nearest scene centroid of the background's mean band colours",
        "background": "mean |a - b| outside both frames' dilated pose masks (0..255)",
    }
    reasons: dict[str, str] = {}
    if inputs.keypoints is None:
        reasons = {k: "no input poses (pass --poses)" for k in MICRO_AGGREGATE}
        return {
            "aggregate": dict.fromkeys(MICRO_AGGREGATE),
            "per_frame": {k: [None] * n for k in ("figure_iou", "garment_colour", "scene")},
            "per_pair": {},
            "settings": settings,
            "null_reasons": reasons,
        }
    frames, kp = np.stack(inputs.frames), inputs.keypoints
    iou = figure_iou(figure_masks(frames, segmenter), kp)
    seen = garment_colours(frames, kp)
    right = [None if c is None or colour is None else c == colour for c in seen]
    judged = [r for r in right if r is not None]
    if colour is None:
        reasons["colour_accuracy"] = f"the prompt names no garment colour: {prompt!r}"
    elif not judged:
        reasons["colour_accuracy"] = "no frame shows the torso (shoulders and hips)"
    scenes = classify_scenes(frames, kp)
    scene_right = [None if s is None or scene is None else s == scene for s in scenes]
    scene_judged = [r for r in scene_right if r is not None]
    if scene is None:
        reasons["scene_accuracy"] = f"the prompt names no scene of the micro world: {prompt!r}"
    elif not scene_judged:
        reasons["scene_accuracy"] = (
            "the person covers a whole band of the background in every frame"
        )
    pairs: dict[str, list[float]] = {
        "body_hist_l1": [],
        "torso_texture_change": [],
        "background_change": [],
    }
    for i in range(n - 1):
        drift = appearance_drift(frames[i : i + 2], kp[i : i + 2])
        pairs["body_hist_l1"].append(drift["body_hist_l1"])
        pairs["torso_texture_change"].append(drift["torso_texture_change"])
        pairs["background_change"].append(background_change(frames[i : i + 2], kp[i : i + 2]))
    aggregate: dict[str, float | None] = {
        "figure_iou": float(iou.mean()),
        "colour_accuracy": float(np.mean(judged)) if judged else None,
        "scene_accuracy": float(np.mean(scene_judged)) if scene_judged else None,
    }
    aggregate |= {k: float(np.mean(v)) if v else None for k, v in pairs.items()}
    return {
        "aggregate": aggregate,
        "per_frame": {
            "figure_iou": [float(v) for v in iou],
            "garment_colour": seen,
            "colour_right": right,
            "scene": scenes,
            "scene_right": scene_right,
        },
        "per_pair": pairs,
        "settings": settings,
        "null_reasons": reasons,
    }


def micro_summary(section: dict[str, Any]) -> str:
    """The micro aggregates as aligned text rows (null → ``n/a`` + reason)."""
    rows = [
        f"micro world ({section['settings'].get('prompt_colour') or 'no'} garment colour named):"
    ]
    for key in MICRO_AGGREGATE:
        value = section["aggregate"].get(key)
        label = MICRO_LABELS[key]
        if value is None:
            rows.append(f"  {label:24s} {'n/a':>9s}  {section['null_reasons'].get(key, '')}")
        else:
            rows.append(f"  {label:24s} {value:9.3f}")
    return "\n".join(rows)
