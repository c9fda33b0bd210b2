"""Metrics that mean something in the ``micro`` preset's procedural world.

The paper's NIQE / CLIP scores need real images; in the micro world we know what a frame should
show, so we measure it directly:

- **pose following**: IoU of the figure's foreground (a small segmenter trained on the world's
  ground-truth masks, shipped with the weights) with the pose body mask
  (:func:`engine.compose.pose_body_mask`);
- **prompt following**: the top garment's colour (median RGB of the torso polygon between the
  shoulders and hips) classified to the nearest named colour, against the prompt's colour word;
- **appearance drift**: frame-to-frame L1 distance of the body region's colour histogram
  (0 = identical, 2 = disjoint) and the change of the torso's texture (std of grey levels);
- **background stability**: mean absolute change (grey levels) outside both frames' dilated
  person masks;
- **scene following**: the background outside the dilated person mask classified into the world's
  six scenes (nearest centroid of the mean colours of the frame's top and bottom bands), against
  the prompt's scene word.
"""

from __future__ import annotations

import functools
from typing import Any

import cv2
import numpy as np
import torch

from engine.compose import pose_body_mask
from engine.micro.world import COLOURS, SCENES, draw_scene, parse_caption
from engine.pose.skeleton import TORSO


@functools.lru_cache(maxsize=1)
def shipped_segmenter() -> torch.nn.Module:
    """The figure segmenter shipped with the micro weights (CPU, eval)."""
    from engine.micro import arch

    states, _ = arch.load_weights()
    seg = arch.build_segmenter()
    seg.load_state_dict(states["segmenter"])
    return seg.eval().requires_grad_(False)


@torch.no_grad()
def figure_masks(frames: np.ndarray, segmenter: torch.nn.Module | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB frames → (N, H, W) bool figure masks."""
    seg = segmenter or shipped_segmenter()
    device = next(seg.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    return (seg(x.to(device))[:, 0] > 0).cpu().numpy()


def figure_iou(masks: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """(N,) IoU of each (H, W) figure mask with its frame's pose body mask ((N, 18, 3) keypoints)."""
    out = []
    for mask, kp in zip(masks, keypoints, strict=True):
        body = pose_body_mask(kp, mask.shape[1], mask.shape[0]) > 0
        union = (mask | body).sum()
        out.append(float((mask & body).sum() / union) if union else 0.0)
    return np.asarray(out)


def torso_region(keypoints: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W) bool: the torso polygon (shoulders, hips), eroded by one pixel."""
    region: np.ndarray = np.zeros((height, width), np.uint8)
    if (keypoints[list(TORSO), 2] > 0).all():
        cv2.fillConvexPoly(region, np.round(keypoints[list(TORSO), :2]).astype(np.int32), 1)
        eroded = cv2.erode(region, np.ones((3, 3), np.uint8))
        region = eroded if eroded.sum() >= 4 else region
    return region > 0


def classify_colour(rgb: np.ndarray) -> str:
    """The name in :data:`engine.micro.world.COLOURS` nearest to ``rgb`` (in CIE Lab)."""
    names = list(COLOURS)
    ref = np.array([COLOURS[n] for n in names], np.uint8)[None]
    lab = cv2.cvtColor(ref, cv2.COLOR_RGB2LAB)[0].astype(float)
    x = cv2.cvtColor(np.clip(rgb, 0, 255).astype(np.uint8)[None, None], cv2.COLOR_RGB2LAB)
    return names[int(np.argmin(((lab - x[0, 0].astype(float)) ** 2).sum(axis=1)))]


def garment_colours(frames: np.ndarray, keypoints: np.ndarray) -> list[str | None]:
    """The classified top-garment colour of each frame (None where the torso is not visible)."""
    out: list[str | None] = []
    for frame, kp in zip(frames, keypoints, strict=True):
        region = torso_region(kp, frame.shape[1], frame.shape[0])
        out.append(classify_colour(np.median(frame[region], axis=0)) if region.any() else None)
    return out


def _histogram(pixels: np.ndarray, bins: int = 4) -> np.ndarray:
    q = (pixels.astype(np.int32) * bins) // 256
    h = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins**3)
    return h / max(1, h.sum())


def appearance_drift(frames: np.ndarray, keypoints: np.ndarray) -> dict[str, float]:
    """Mean over adjacent frames of the body's colour-histogram L1 distance (0..2) and of the
    absolute change of the torso's grey-level std (texture, grey levels)."""
    hist, texture = [], []
    prev: tuple[np.ndarray, float] | None = None
    for frame, kp in zip(frames, keypoints, strict=True):
        h, w = frame.shape[:2]
        body = pose_body_mask(kp, w, h) > 0
        torso = torso_region(kp, w, h)
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        cur = (_histogram(frame[body]), float(grey[torso].std()) if torso.any() else 0.0)
        if prev is not None:
            hist.append(float(np.abs(cur[0] - prev[0]).sum()))
            texture.append(abs(cur[1] - prev[1]))
        prev = cur
    return {
        "body_hist_l1": float(np.mean(hist)) if hist else 0.0,
        "torso_texture_change": float(np.mean(texture)) if texture else 0.0,
    }


def background_change(frames: np.ndarray, keypoints: np.ndarray, dilate_px: int = 3) -> float:
    """Mean |frame t − frame t−1| (grey levels, RGB mean) outside both frames' dilated person
    masks, over adjacent frames."""
    kernel = np.ones((2 * dilate_px + 1, 2 * dilate_px + 1), np.uint8)
    changes = []
    prev = None
    for frame, kp in zip(frames, keypoints, strict=True):
        h, w = frame.shape[:2]
        person = cv2.dilate(pose_body_mask(kp, w, h), kernel) > 0
        if prev is not None:
            outside = ~(person | prev[1])
            if outside.any():
                diff = np.abs(frame.astype(np.int16) - prev[0].astype(np.int16)).mean(axis=2)
                changes.append(float(diff[outside].mean()))
        prev = (frame, person)
    return float(np.mean(changes)) if changes else 0.0


SCENE_BANDS = ((0.0, 0.45), (0.68, 1.0))
"""Row bands (fractions of the height) whose mean background colours are a frame's scene
features: above every horizon (sky, canopy, shelves, curtains) and below it (sand, road, floor)."""


def scene_features(
    frame: np.ndarray, keypoints: np.ndarray, dilate_px: int = 3
) -> np.ndarray | None:
    """(6,) float: mean RGB of each :data:`SCENE_BANDS` band outside the person mask (the pose body
    mask dilated by ``dilate_px``), or None when the person covers a whole band."""
    h, w = frame.shape[:2]
    kernel = np.ones((2 * dilate_px + 1, 2 * dilate_px + 1), np.uint8)
    person = cv2.dilate(pose_body_mask(keypoints, w, h), kernel) > 0
    feats = []
    for lo, hi in SCENE_BANDS:
        band = frame[round(lo * h) : round(hi * h)]
        keep = ~person[round(lo * h) : round(hi * h)]
        if not keep.any():
            return None
        feats.append(band[keep].astype(float).mean(axis=0))
    return np.concatenate(feats)


@functools.lru_cache(maxsize=8)
def scene_centroids(size: int, draws: int = 32) -> np.ndarray:
    """(6 scenes, 6) mean :func:`scene_features` of ``draws`` empty scenes of each kind at
    ``size``² (seeded, so the classifier is deterministic)."""
    rng = np.random.default_rng(1234)
    nobody = np.zeros((18, 3), np.float32)  # no visible joint: empty person mask
    rows = []
    for kind in SCENES:
        feats = [scene_features(draw_scene(kind, size, rng), nobody) for _ in range(draws)]
        rows.append(np.mean([f for f in feats if f is not None], axis=0))
    return np.stack(rows)


def classify_scenes(frames: np.ndarray, keypoints: np.ndarray) -> list[str | None]:
    """The scene kind (a key of :data:`engine.micro.world.SCENES`) of each frame's background, or
    None where the person covers a whole band of it."""
    names = list(SCENES)
    out: list[str | None] = []
    for frame, kp in zip(frames, keypoints, strict=True):
        f = scene_features(frame, kp)
        if f is None:
            out.append(None)
            continue
        ref = scene_centroids(frame.shape[0])
        out.append(names[int(np.argmin(((ref - f) ** 2).sum(axis=1)))])
    return out


def micro_metrics(
    frames: np.ndarray, keypoints: np.ndarray, prompt: str, segmenter: torch.nn.Module | None = None
) -> dict[str, Any]:
    """All micro metrics of one render: frames (N, H, W, 3) uint8, keypoints (N, 18, 3)."""
    colour, scene = parse_caption(prompt)
    iou = figure_iou(figure_masks(frames, segmenter), keypoints)
    seen = garment_colours(frames, keypoints)
    judged = [c for c in seen if c is not None]
    scenes = classify_scenes(frames, keypoints)
    judged_scenes = [s for s in scenes if s is not None]
    return {
        "figure_iou": float(iou.mean()),
        "figure_iou_per_frame": [round(float(v), 4) for v in iou],
        "prompt_colour": colour,
        "garment_colours": seen,
        "colour_accuracy": (
            float(np.mean([c == colour for c in judged])) if colour and judged else None
        ),
        "prompt_scene": scene,
        "scenes": scenes,
        "scene_accuracy": (
            float(np.mean([s == scene for s in judged_scenes])) if scene and judged_scenes else None
        ),
        **appearance_drift(frames, keypoints),
        "background_change": background_change(frames, keypoints),
    }
