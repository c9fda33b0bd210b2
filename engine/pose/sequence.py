"""The pose sequence container, its validation and its resampling in time and space.

A :class:`PoseSequence` holds ``keypoints`` of shape ``(F, 18, 3)`` float32 — per frame and COCO-18
joint (see :mod:`engine.pose.skeleton`) the columns ``(x_px, y_px, confidence)`` with the origin at
the top-left of a ``width`` x ``height`` pixel frame, confidence in ``[0, 1]`` and confidence ``0``
marking a missing joint (whose x, y are 0) — plus the frame rate and where it came from.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.pose.skeleton import JOINT_NAMES, NUM_JOINTS

# Confident joints may lie this far outside the frame (pixels + fraction of the larger side):
# detectors and interpolation put wrists and ankles a hair past the border.
RANGE_TOLERANCE_PX = 1.0
RANGE_TOLERANCE_FRAC = 0.01
MAX_RESAMPLED_FRAMES = 100_000  # resampling in time never makes more frames than this


class PoseError(ValueError):
    """A pose file or sequence is unusable; the message names the file, frame and joint and the fix."""


@dataclass(frozen=True, eq=False)
class PoseSequence:
    """A COCO-18 pose sequence in a pixel frame.

    Attributes:
        keypoints: ``(F, 18, 3)`` float32, columns ``(x_px, y_px, confidence)``; origin top-left,
            confidence in ``[0, 1]``, ``0`` = missing joint with x = y = 0. Stored as a read-only
            copy of what was passed in.
        fps: frames per second, > 0.
        width: width in pixels of the frame the keypoints live in.
        height: height in pixels of that frame.
        source: where the sequence came from (a path, or e.g. ``"synthetic_dance"``), used in errors.
        info: JSON-ready record of how the keypoints were obtained, for the manifest (e.g. the
            kind detected, the estimator, frames filled or left empty), or None. Kept by
            :func:`resample`; frame indices in it are those of the input.
    """

    keypoints: np.ndarray
    fps: float
    width: int
    height: int
    source: str = "<memory>"
    info: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        kp = np.array(self.keypoints, dtype=np.float32, copy=True)
        kp.flags.writeable = False
        object.__setattr__(self, "keypoints", kp)

    @property
    def num_frames(self) -> int:
        """Number of frames F."""
        return int(self.keypoints.shape[0]) if self.keypoints.ndim >= 1 else 0

    @property
    def duration(self) -> float:
        """Duration in seconds, ``F / fps``."""
        return self.num_frames / self.fps


def zero_missing(keypoints: np.ndarray) -> np.ndarray:
    """Return a float32 copy of ``(..., 18, 3)`` keypoints with x = y = 0 where confidence <= 0."""
    kp = np.array(keypoints, dtype=np.float32, copy=True)
    missing = ~(kp[..., 2] > 0)  # also catches NaN confidences, which validate() reports
    kp[missing] = 0.0
    return kp


def _where(seq: PoseSequence) -> str:
    return seq.source or "<memory>"


def _check_header(seq: PoseSequence, max_frames: int) -> None:
    src = _where(seq)
    kp = seq.keypoints
    if kp.ndim != 3 or kp.shape[1:] != (NUM_JOINTS, 3):
        raise PoseError(
            f"{src}: keypoints have shape {kp.shape}, expected (frames, {NUM_JOINTS}, 3) "
            "COCO-18 (x, y, confidence); convert BODY_25 with BODY25_TO_COCO18"
        )
    if kp.shape[0] == 0:
        raise PoseError(f"{src}: the pose sequence has no frames; give at least one frame")
    if kp.shape[0] > max_frames:
        raise PoseError(
            f"{src}: {kp.shape[0]} frames is more than max_frames={max_frames}; "
            "trim the sequence, lower its fps with resample(), or raise max_frames"
        )
    fps = seq.fps
    if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise PoseError(f"{src}: fps is {seq.fps!r}; it must be a finite number > 0")
    for name in ("width", "height"):
        value = getattr(seq, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise PoseError(f"{src}: {name} is {value!r}; it must be a positive integer (pixels)")


def validate(seq: PoseSequence, *, max_frames: int = 512) -> None:
    """Check a sequence against the keypoint conventions; raise :class:`PoseError` naming the problem.

    Checks, in order: shape ``(F, 18, 3)``, ``1 <= F <= max_frames``, ``fps`` finite and > 0,
    ``width``/``height`` positive ints, no NaN/inf, confidences in ``[0, 1]``, and confident joints
    inside ``[0, width] x [0, height]`` up to ``1 px + 1 %`` of the larger side. Errors name the
    source, the frame (0-based) and the joint.
    """
    _check_header(seq, max_frames)
    src, kp = _where(seq), seq.keypoints
    bad = ~np.isfinite(kp)
    if bad.any():
        f, j, c = (int(v) for v in np.argwhere(bad)[0])
        field = ("x", "y", "confidence")[c]
        raise PoseError(
            f"{src}: frame {f}, joint {JOINT_NAMES[j]}: {field} is {kp[f, j, c]}; "
            "replace NaN/inf with a missing joint (0, 0, 0)"
        )
    conf = kp[..., 2]
    bad = (conf < 0) | (conf > 1)
    if bad.any():
        f, j = (int(v) for v in np.argwhere(bad)[0])
        raise PoseError(
            f"{src}: frame {f}, joint {JOINT_NAMES[j]}: confidence {conf[f, j]:g} is outside "
            "[0, 1]; rescale the confidences to [0, 1] (0 = missing)"
        )
    tol = RANGE_TOLERANCE_PX + RANGE_TOLERANCE_FRAC * max(seq.width, seq.height)
    x, y = kp[..., 0], kp[..., 1]
    out = (conf > 0) & ((x < -tol) | (x > seq.width + tol) | (y < -tol) | (y > seq.height + tol))
    if out.any():
        f, j = (int(v) for v in np.argwhere(out)[0])
        raise PoseError(
            f"{src}: frame {f}, joint {JOINT_NAMES[j]}: ({x[f, j]:.1f}, {y[f, j]:.1f}) is outside "
            f"the {seq.width}x{seq.height} frame; give the width/height of the frame the keypoints "
            "were measured in (or fix the keypoints)"
        )


def _resample_time(kp: np.ndarray, fps_in: float, fps_out: float) -> np.ndarray:
    """Resample ``(F, 18, 3)`` keypoints from ``fps_in`` to ``fps_out``.

    Output frame ``i`` sits at source position ``p = i * fps_in / fps_out`` (clamped to the last
    frame). Joints confident in both neighbouring frames are linearly interpolated (x, y and
    confidence); the others take the nearest frame's joint, so missing joints stay missing.
    """
    n_in = kp.shape[0]
    n_out = max(1, round(n_in * fps_out / fps_in))
    pos = np.minimum(np.arange(n_out, dtype=np.float64) * (fps_in / fps_out), n_in - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    a = (pos - i0)[:, None, None]
    k0, k1 = kp[i0].astype(np.float64), kp[i1].astype(np.float64)
    both = (k0[..., 2] > 0) & (k1[..., 2] > 0)
    nearest = np.where(a < 0.5, k0, k1)
    lerp = (1.0 - a) * k0 + a * k1
    out = np.where(both[..., None], lerp, nearest)
    return zero_missing(out)


def _resample_space(kp: np.ndarray, src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """Map keypoints from a ``src=(w, h)`` frame into ``dst=(w, h)``: scale to fit, centre (letterbox).

    The scale is the same on both axes, so the skeleton keeps its proportions; missing joints stay
    ``(0, 0, 0)``.
    """
    (w0, h0), (w1, h1) = src, dst
    s = min(w1 / w0, h1 / h0)
    off = np.array([(w1 - s * w0) / 2.0, (h1 - s * h0) / 2.0])
    out = kp.astype(np.float64, copy=True)
    out[..., :2] = out[..., :2] * s + off
    return zero_missing(out)


def resample(
    seq: PoseSequence,
    *,
    fps: float | None = None,
    width: int | None = None,
    height: int | None = None,
) -> PoseSequence:
    """Resample a sequence in time and/or space; ``None`` keeps that property.

    Time: the output has ``max(1, round(F * fps / seq.fps))`` frames (same duration); joints
    confident in both neighbouring source frames are interpolated linearly, others copied from the
    nearest frame. Space: keypoints are scaled uniformly to fit ``width x height`` and centred
    (letterboxed), so the skeleton is not distorted. Missing joints stay missing.

    Raises:
        PoseError: a target fps <= 0 or a target size < 1.
    """
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise PoseError(f"{_where(seq)}: target fps {fps!r} must be a finite number > 0")
    for name, value in (("width", width), ("height", height)):
        if value is not None and int(value) < 1:
            raise PoseError(f"{_where(seq)}: target {name} {value!r} must be >= 1 pixel")
    kp = seq.keypoints
    new_fps = float(fps) if fps is not None else seq.fps
    frames_out = len(kp) * new_fps / seq.fps
    if not (math.isfinite(frames_out) and math.isfinite(seq.fps / new_fps)):
        raise PoseError(
            f"{_where(seq)}: target fps {fps!r} is too far from the input's {seq.fps:g} fps to "
            "resample; give an fps between 1 and 120"
        )
    if frames_out > MAX_RESAMPLED_FRAMES:
        raise PoseError(
            f"{_where(seq)}: {len(kp)} frames at {seq.fps:g} fps resampled to {new_fps:g} fps "
            f"would be {frames_out:.3g} frames (at most {MAX_RESAMPLED_FRAMES}); lower the fps"
        )
    if new_fps != seq.fps:
        kp = _resample_time(kp, seq.fps, new_fps)
    new_w = int(width) if width is not None else seq.width
    new_h = int(height) if height is not None else seq.height
    if (new_w, new_h) != (seq.width, seq.height):
        kp = _resample_space(kp, (seq.width, seq.height), (new_w, new_h))
    return PoseSequence(
        kp, fps=new_fps, width=new_w, height=new_h, source=seq.source, info=seq.info
    )
