"""Score one video with all of the paper's metrics: ``metrics.json`` + ``metrics.png``.

Per frame: Frame / Body / Background NIQE, Frame BRISQUE, Text alignment (CLIP), Pose MSE and
whether a person was detected. Per adjacent pair ``(t, t+1)``: Frame / Body / Background CLIP
consistency and L1 / MSE. Aggregates are means over the frames (pairs) with a value; a metric that
cannot be computed is null, with the reason in ``null_reasons`` (also given when only some
frames or pairs are null, e.g. a frame with an empty person mask).

Conventions (see the metric modules for the formulas):

* NIQE needs 96x96 blocks; Background NIQE needs at least two blocks almost free of the person.
  Frames whose shorter side is below :data:`NIQE_SIDE` = 384 px (tiny: 64 px, small: 128 px) are
  upscaled by the integer factor ``ceil(384 / short side)`` with bicubic interpolation
  (``cv2.INTER_CUBIC``; masks nearest-neighbour) before all three NIQE scores, and the result says
  ``niqe_upscaled: true`` with the factor. Upscaled frames are smooth, so their NIQE is high and only
  comparable between videos of the same size. At 192 px the background blocks of a centred person
  never qualify, hence 384. Body NIQE = NIQE of the person's bounding box
  (:func:`~engine.metrics.niqe.crop_to_mask`, mirrored up to 192 px); Background NIQE =
  :func:`~engine.metrics.niqe.background_niqe` (blocks >= 90 % outside the person).
* BRISQUE runs on the frame at its own size (no upscaling; it works on 64 px).
* Body = the pair's union person mask, background = its complement, for L1 / MSE
  (as :func:`~engine.metrics.temporal.temporal_metrics`) and for Background CLIP (both frames
  filled with their mean background colour inside the union); Body CLIP compares the two frames'
  person crops (:func:`~engine.metrics.clip_score.body_image`).
* CLIP: the caller's :class:`ClipScorer`, else the preset's: ``tiny`` / ``small`` / ``micro`` →
  random :func:`tiny_clip` (numbers carry no meaning; ``micro`` ships no CLIP and scores offline,
  which ``settings.clip_note`` says), ``sd15`` (and plain videos) → ``model.clip``.
* ``micro`` renders (or ``micro=True``) also get a ``micro`` section: pose following, garment
  colour, appearance drift and background change (:mod:`engine.metrics.micro_report`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from engine.files import atomic_json
from engine.metrics.brisque import brisque
from engine.metrics.clip_select import clip_for, clip_label, clip_note
from engine.metrics.inputs import MetricsError, ScoreInputs, load_render, load_video
from engine.metrics.micro_report import is_micro, micro_section
from engine.metrics.niqe import background_niqe, crop_to_mask, niqe
from engine.metrics.pose_mse import (
    POSE_MIN_CONFIDENCE,
    POSE_MSE_SCALE,
    PoseEstimator,
    make_estimator,
    pose_scores,
)
from engine.metrics.temporal import adjacent_pairs, frame_l1, frame_mse

if TYPE_CHECKING:
    from engine.metrics.clip_score import ClipScorer

NIQE_SIDE = 384
PER_FRAME = ("frame_niqe", "body_niqe", "background_niqe", "frame_brisque", "text_alignment")
PER_PAIR = (
    "frame_clip",
    "body_clip",
    "background_clip",
    "frame_l1",
    "frame_mse",
    "body_l1",
    "body_mse",
    "background_l1",
    "background_mse",
)
AGGREGATE = (
    "frame_niqe",
    "body_niqe",
    "background_niqe",
    "frame_brisque",
    "pose_mse",
    "pose_detection_rate",
    "text_alignment",
    "frame_clip",
    "body_clip",
    "background_clip",
    "frame_l1",
    "body_l1",
    "background_l1",
    "frame_mse",
    "body_mse",
    "background_mse",
)
Values = list[float | None]

__all__ = [
    "AGGREGATE",
    "NIQE_SIDE",
    "MetricsError",
    "clip_for",
    "score_inputs",
    "score_render",
    "score_video",
]


def niqe_factor(height: int, width: int) -> int:
    """Integer upscale factor bringing the shorter side to >= :data:`NIQE_SIDE` (1 = none)."""
    return max(1, math.ceil(NIQE_SIDE / min(height, width)))


def _upscale(img: np.ndarray, k: int, *, nearest: bool = False) -> np.ndarray:
    if k == 1:
        return img
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_CUBIC
    return cv2.resize(img, None, fx=k, fy=k, interpolation=interp)


def _attempt(
    reasons: dict[str, str], key: str, fn: Callable[..., float], *args: Any
) -> float | None:
    """``fn(*args)``, or None with the first failure's message recorded under ``key``."""
    try:
        return float(fn(*args))
    except ValueError as exc:
        reasons.setdefault(key, str(exc))
        return None


def _quality(inputs: ScoreInputs, reasons: dict[str, str]) -> tuple[dict[str, Values], int]:
    """Per-frame NIQE (frame / body / background) and BRISQUE; returns them and the NIQE factor."""
    out: dict[str, Values] = {k: [] for k in PER_FRAME[:4]}
    k = niqe_factor(*inputs.frames[0].shape[:2])
    for i, frame in enumerate(inputs.frames):
        big = _upscale(frame, k)
        out["frame_niqe"].append(_attempt(reasons, "frame_niqe", niqe, big))
        out["frame_brisque"].append(_attempt(reasons, "frame_brisque", brisque, frame))
        if inputs.masks is None:
            out["body_niqe"].append(None)
            out["background_niqe"].append(None)
            continue
        mask = _upscale(inputs.masks[i].astype(np.uint8), k, nearest=True) > 0
        if mask.any():
            out["body_niqe"].append(_attempt(reasons, "body_niqe", niqe, crop_to_mask(big, mask)))
        else:
            out["body_niqe"].append(None)
            reasons.setdefault("body_niqe", f"frame {i} has an empty person mask")
        out["background_niqe"].append(
            _attempt(reasons, "background_niqe", background_niqe, big, mask)
        )
    return out, k


def _temporal(inputs: ScoreInputs, reasons: dict[str, str]) -> dict[str, Values]:
    """Per-pair L1 / MSE of the whole frame, body (union mask) and background (complement)."""
    out: dict[str, Values] = {k: [] for k in PER_PAIR if k.endswith(("_l1", "_mse"))}
    mask_pairs = adjacent_pairs(inputs.masks) if inputs.masks is not None else None
    for i, (a, b) in enumerate(adjacent_pairs(inputs.frames)):
        out["frame_l1"].append(frame_l1(a, b))
        out["frame_mse"].append(frame_mse(a, b))
        if mask_pairs is None:
            regions: dict[str, np.ndarray | None] = {"body": None, "background": None}
        else:
            body = mask_pairs[i][0] | mask_pairs[i][1]
            regions = {"body": body, "background": ~body}
        for name, region in regions.items():
            for metric, fn in (("l1", frame_l1), ("mse", frame_mse)):
                key = f"{name}_{metric}"
                if region is None:
                    out[key].append(None)
                    reasons.setdefault(key, "no person masks (no poses to draw them from)")
                else:
                    out[key].append(_attempt(reasons, key, fn, a, b, region))
    return out


def _clip_scores(
    inputs: ScoreInputs, clip: ClipScorer, reasons: dict[str, str]
) -> dict[str, Values]:
    """Text alignment per frame; Frame / Body / Background CLIP consistency per pair."""
    from engine.metrics.clip_score import background_image, body_image

    n = len(inputs.frames)
    out: dict[str, Values] = {"text_alignment": [None] * n}
    if inputs.prompt:
        out["text_alignment"] = clip.text_alignment(inputs.frames, inputs.prompt).tolist()
    else:
        reasons["text_alignment"] = "no prompt (no manifest; pass --prompt)"
    out["frame_clip"] = clip.consistency(inputs.frames).tolist()
    if inputs.masks is None:
        for key in ("body_clip", "background_clip"):
            out[key] = [None] * (n - 1)
            reasons[key] = "no person masks (no poses to draw them from)"
        return out
    masks = inputs.masks
    people = [i for i, m in enumerate(masks) if m.any()]
    row = {}
    if people:
        crops = clip.image_embeddings([body_image(inputs.frames[i], masks[i]) for i in people])
        row = {i: crops[j] for j, i in enumerate(people)}
    out["body_clip"] = [
        float(100.0 * (row[i] @ row[i + 1])) if i in row and i + 1 in row else None
        for i in range(n - 1)
    ]
    if len(people) < n:
        reasons["body_clip"] = f"{n - len(people)} frame(s) with an empty person mask"
    images = []
    for (a, b), (ma, mb) in zip(adjacent_pairs(inputs.frames), adjacent_pairs(masks), strict=True):
        images += [background_image(a, ma | mb), background_image(b, ma | mb)]
    emb = clip.image_embeddings(images)
    out["background_clip"] = (100.0 * (emb[0::2] * emb[1::2]).sum(dim=-1)).tolist()
    return out


def _mean(values: Sequence[float | bool | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(kept)) if kept else None


def _pose(inputs: ScoreInputs, estimator: PoseEstimator) -> dict[str, Any]:
    """:func:`pose_scores`, or nulls with the reason when there are no input poses."""
    if inputs.keypoints is not None:
        return pose_scores(inputs.frames, inputs.keypoints, estimator)
    empty: list[Any] = [None] * len(inputs.frames)
    return {
        "pose_mse": None,
        "detection_rate": None,
        "per_frame": {"pose_mse": empty, "detected": empty, "joints": empty},
        "reason": "no input poses",
    }


def _settings(
    inputs: ScoreInputs, clip: ClipScorer, estimator: PoseEstimator, factor: int
) -> dict[str, Any]:
    """How the numbers were made: prompt, models, NIQE upscaling and the metrics' scales."""
    return {
        "prompt": inputs.prompt,
        "clip": clip_label(clip),
        "clip_note": clip_note(inputs.config, clip),
        "estimator": getattr(estimator, "name", type(estimator).__name__),
        "niqe_upscaled": factor > 1,
        "niqe_upscale_factor": factor,
        "niqe_side": NIQE_SIDE,
        "brisque_at": "native size",
        "pose_mse_scale": POSE_MSE_SCALE,
        "pose_min_confidence": POSE_MIN_CONFIDENCE,
        "l1_scale": "mean |a - b| over pixels and channels, 0..255",
        "clip_scale": "cosine x 100",
        "background_fill": "mean background colour",
    }


def score_inputs(
    inputs: ScoreInputs,
    *,
    clip: ClipScorer,
    estimator: PoseEstimator,
    micro: bool | None = None,
) -> dict[str, Any]:
    """All metrics of one video (see module docstring); JSON-ready (NaN → None).

    ``micro``: add the ``micro`` section (None = when the render's preset is ``micro``).
    """
    if len(inputs.frames) < 2:
        raise MetricsError(
            f"{inputs.source.get('path')}: {len(inputs.frames)} frame(s); the temporal metrics "
            "need at least 2"
        )
    reasons: dict[str, str] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    per_frame, factor = _quality(inputs, reasons)
    timings["quality"] = time.perf_counter() - start
    start = time.perf_counter()
    per_pair = _temporal(inputs, reasons)
    clip_values = _clip_scores(inputs, clip, reasons)
    per_frame["text_alignment"] = clip_values.pop("text_alignment")
    per_pair.update(clip_values)
    timings["clip_temporal"] = time.perf_counter() - start
    start = time.perf_counter()
    pose = _pose(inputs, estimator)
    timings["pose"] = time.perf_counter() - start
    if pose["reason"]:
        reasons["pose_mse"] = pose["reason"]
    per_frame["pose_mse"] = pose["per_frame"]["pose_mse"]
    means = {k: _mean(v) for k, v in (per_frame | per_pair).items()}
    means |= {"pose_mse": pose["pose_mse"], "pose_detection_rate": pose["detection_rate"]}
    aggregate = {k: means[k] for k in AGGREGATE}
    extra: dict[str, Any] = {}
    if micro if micro is not None else is_micro(inputs.config):
        start = time.perf_counter()
        extra["micro"] = micro_section(inputs)
        timings["micro"] = time.perf_counter() - start
    height, width = inputs.frames[0].shape[:2]
    return {
        "source": {
            **inputs.source,
            "frames": len(inputs.frames),
            "width": width,
            "height": height,
            "fps": inputs.fps,
        },
        "settings": _settings(inputs, clip, estimator, factor),
        "aggregate": aggregate,
        "per_frame": {
            **per_frame,
            "pose_detected": pose["per_frame"]["detected"],
            "pose_joints": pose["per_frame"]["joints"],
        },
        "per_pair": per_pair,
        "null_reasons": reasons,
        **extra,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value


def write_report(result: dict[str, Any], out_dir: Path, *, plot: bool = True) -> dict[str, Any]:
    """Write ``metrics.json`` (atomically) and ``metrics.png`` into ``out_dir``; returns result."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = _jsonable(result)
    result["outputs"] = {"json": "metrics.json", "plot": "metrics.png" if plot else None}
    if plot:
        from engine.metrics.plot import plot_metrics

        plot_metrics(result, out_dir / "metrics.png")
    atomic_json(out_dir / "metrics.json", result)
    return result


def _estimator(estimator: PoseEstimator | str | None) -> PoseEstimator:
    if estimator is None or isinstance(estimator, str):
        return make_estimator(estimator or "auto")  # type: ignore[arg-type]
    return estimator


def score_render(
    folder: Path,
    *,
    clip: ClipScorer | None = None,
    estimator: PoseEstimator | str | None = None,
    prompt: str | None = None,
    poses: Path | None = None,
    plot: bool = True,
    micro: bool | None = None,
) -> dict[str, Any]:
    """Score a render folder; writes ``folder/metrics.json`` and ``folder/metrics.png``.

    Args:
        folder: a render output folder (see :mod:`engine.metrics.inputs` for what is read).
        clip: CLIP scorer; default from the manifest's preset (:func:`clip_for`).
        estimator: a :class:`PoseEstimator`, or ``"auto"`` / ``"none"`` / ``"mediapipe"``
            (None = auto: mediapipe when installed, else Pose MSE null with the reason).
        prompt, poses: override the manifest's frame prompt / pose file.
        micro: add the ``micro`` section (None = when the manifest's preset is ``micro``).

    Returns:
        the metrics dict as written (keys ``source``, ``settings``, ``aggregate``, ``per_frame``
        (T values each), ``per_pair`` (T-1 values each), ``null_reasons``, ``timings_s``).
    """
    inputs = load_render(Path(folder), prompt=prompt, poses=poses)
    clip = clip or clip_for(inputs.config)
    result = score_inputs(inputs, clip=clip, estimator=_estimator(estimator), micro=micro)
    return write_report(result, Path(folder), plot=plot)


def score_video(
    video: Path,
    poses: Path | None,
    out_dir: Path,
    prompt: str | None,
    *,
    clip: ClipScorer | None = None,
    estimator: PoseEstimator | str | None = None,
    plot: bool = True,
    micro: bool = False,
) -> dict[str, Any]:
    """Score a plain mp4 with its poses file (masks drawn from the poses) and prompt.

    Without ``poses`` the body / background / pose metrics are null; without ``prompt`` text
    alignment is. ``micro``: add the ``micro`` section (a video made with the micro preset). Writes ``out_dir/metrics.json`` and ``out_dir/metrics.png``; returns the dict.
    """
    inputs = load_video(Path(video), Path(poses) if poses is not None else None, prompt)
    clip = clip or clip_for(None)
    result = score_inputs(inputs, clip=clip, estimator=_estimator(estimator), micro=micro)
    return write_report(result, Path(out_dir), plot=plot)
