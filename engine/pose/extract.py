"""Poses from a driving RGB video: MediaPipe Pose per frame → COCO-18, cleaned up, cached.

Steps (each frame is estimated independently, so results do not depend on chunking or resume):

1. estimate: the most prominent person's 33 landmarks → COCO-18 (neck = mid-shoulder),
   confidence = visibility (:mod:`engine.pose.estimate`); raw results are cached under
   ``<cache_root>/poses/<key>.npz``, ``key`` = sha256 of the input's bytes and the estimator
   settings, so a spec or batch manifest naming the same video extracts it once;
2. joints below ``min_joint_confidence`` or outside the frame become missing;
3. runs of at most ``max_gap`` frames with nobody detected are filled by interpolation
   (:func:`~engine.pose.filters.fill_gaps`); longer runs raise :class:`PoseError` naming the
   frames (``on_missing="error"``, the default) or stay empty (``on_missing="empty"``) and are
   logged and recorded in ``PoseSequence.info``;
4. One-Euro smoothing over time (:func:`~engine.pose.filters.one_euro`), if enabled.

The sequence stays in the video's pixel frame; :func:`~engine.pose.sequence.resample`
letterboxes it into the render size (portrait and landscape alike).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from engine.files import atomic_write
from engine.pose.estimate import (
    MODEL_COMPLEXITY,
    PoseEstimator,
    PoseEstimatorError,
    mediapipe_estimator,
)
from engine.pose.filters import fill_gaps, one_euro, runs
from engine.pose.frames import FrameSource
from engine.pose.sequence import PoseError, PoseSequence, zero_missing

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the raw estimates change meaning
ESTIMATOR_ID = f"mediapipe==0.10.21/model_complexity={MODEL_COMPLEXITY}/static"
POSE_ENV_MISSING = (
    "{path} is an RGB video: extracting its poses needs MediaPipe Pose, which runs in the "
    "separate .venv-pose that `make install` builds; it is missing or broken ({cause}). "
    "Fix: run `make pose-env` (or set AVATAR_POSE_PYTHON to a Python with mediapipe==0.10.21); "
    "if the input is a rendered OpenPose skeleton, pass --kind skeleton (spec: pose_kind: skeleton)"
)


class PoseExtractConfig(BaseModel):
    """How poses are extracted from a driving RGB video (``pose_extraction:`` in a spec)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    min_detection_confidence: float = Field(default=0.5, ge=0.0, le=1.0)
    """MediaPipe's person-detector threshold; lower finds more people (and more false ones)."""
    min_joint_confidence: float = Field(default=0.3, ge=0.0, le=1.0)
    """Joints whose visibility is below this are missing (ControlNet draws every present joint)."""
    max_gap: int = Field(default=12, ge=0, le=10_000)
    """Longest run of frames with nobody detected that is filled by interpolation (0 = none)."""
    on_missing: Literal["error", "empty"] = "error"
    """Longer runs: ``error`` (name the frames) or ``empty`` (frames without joints, recorded)."""
    smoothing: bool = True
    """One-Euro temporal smoothing of the joint positions."""
    min_cutoff: float = Field(default=1.0, gt=0.0, le=100.0)
    """One-Euro cutoff (Hz) of a still joint; lower = less jitter, more lag."""
    beta: float = Field(default=20.0, ge=0.0, le=10_000.0)
    """One-Euro speed coefficient (per frame-side/s); higher = less lag on fast moves."""
    d_cutoff: float = Field(default=1.0, gt=0.0, le=100.0)
    """One-Euro cutoff (Hz) of the speed estimate."""


def default_cache_root() -> Path:
    """``$AVATAR_CACHE_DIR``, else ``~/.cache/dancing-avatar`` (as ``engine.method.cache_root``
    for a config without ``cache_dir``)."""
    default = os.environ.get("AVATAR_CACHE_DIR") or Path.home() / ".cache" / "dancing-avatar"
    return Path(default).expanduser()


def _cache_key(source: FrameSource, estimator_id: str, settings: PoseExtractConfig) -> str:
    payload = json.dumps(
        [CACHE_VERSION, estimator_id, settings.min_detection_confidence, source.content_hash()]
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _load_cached(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path) as data:
            return data["keypoints"].astype(np.float32), data["detected"].astype(bool)
    except (OSError, KeyError, ValueError) as exc:
        log.warning("ignoring unreadable pose cache %s (%s); estimating again", path, exc)
        return None


def _save_cached(path: Path, keypoints: np.ndarray, detected: np.ndarray) -> None:
    """Atomic write (temp file + rename), so concurrent workers never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, keypoints=keypoints, detected=detected)
    try:
        atomic_write(path, buffer.getvalue())
    except OSError as exc:
        log.warning("cannot write the pose cache %s (%s); continuing without it", path, exc)


def estimate_frames(
    frames: Iterable[np.ndarray], estimator: PoseEstimator
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``estimator`` on every frame.

    Returns:
        ``(keypoints, detected)``: ``(F, 18, 3)`` float32 in each frame's pixels (zeros where
        nobody was found) and ``(F,)`` bool.
    """
    kps: list[np.ndarray] = []
    found: list[bool] = []
    for frame in frames:
        kp = estimator.estimate(frame)
        found.append(kp is not None)
        kps.append(np.zeros((18, 3), np.float32) if kp is None else np.asarray(kp, np.float32))
    return np.stack(kps), np.asarray(found, bool)


def _drop_weak_joints(kp: np.ndarray, width: int, height: int, min_conf: float) -> np.ndarray:
    """Joints below ``min_conf`` or outside the frame (by > 1 px) become missing."""
    kp = kp.copy()
    x, y = kp[..., 0], kp[..., 1]
    outside = (x < -1) | (x > width + 1) | (y < -1) | (y > height + 1)
    kp[..., 2] = np.where((kp[..., 2] < min_conf) | outside, 0.0, kp[..., 2])
    kp[..., 0] = np.clip(x, 0, width)
    kp[..., 1] = np.clip(y, 0, height)
    return zero_missing(kp)


def _frames_text(spans: list[tuple[int, int]]) -> str:
    parts = [f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in spans[:8]]
    more = f" and {len(spans) - 8} more runs" if len(spans) > 8 else ""
    return ", ".join(parts) + more


def postprocess(
    keypoints: np.ndarray,
    detected: np.ndarray,
    *,
    fps: float,
    width: int,
    height: int,
    settings: PoseExtractConfig,
    where: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Steps 2-4 of the module docstring on raw estimates.

    Args:
        keypoints: ``(F, 18, 3)`` raw estimates in a ``width x height`` frame.
        detected: ``(F,)`` bool.
        where: the input, named in errors.

    Returns:
        ``(keypoints, info)``: cleaned ``(F, 18, 3)`` float32 and a JSON-ready record (frame
        indices of the input: ``filled``, ``empty``).

    Raises:
        PoseError: nobody in any frame, or (``on_missing="error"``) a run longer than ``max_gap``.
    """
    n = len(keypoints)
    if not detected.any():
        raise PoseError(
            f"{where}: no person detected in any of its {n} frames; give a video where the "
            "dancer is visible (if it is a rendered OpenPose skeleton, pass --kind skeleton)"
        )
    kp = _drop_weak_joints(keypoints, width, height, settings.min_joint_confidence)
    kp, filled = fill_gaps(kp, detected, settings.max_gap)
    empty = ~(detected | filled)
    spans = runs(empty)
    if spans and settings.on_missing == "error":
        raise PoseError(
            f"{where}: no person detected in frames {_frames_text(spans)} ({int(empty.sum())} of "
            f"{n}), runs longer than max_gap={settings.max_gap} frames; trim the video, raise "
            "pose_extraction.max_gap (--max-gap), or keep them empty with "
            "pose_extraction.on_missing=empty (--on-missing empty)"
        )
    if spans:
        log.warning("%s: no person in frames %s; left empty", where, _frames_text(spans))
    kp[empty] = 0.0
    if settings.smoothing:
        kp = one_euro(
            kp,
            fps,
            min_cutoff=settings.min_cutoff,
            beta=settings.beta,
            d_cutoff=settings.d_cutoff,
            scale=float(max(width, height)),
        )
    info = {
        "frames": n,
        "detected": int(detected.sum()),
        "filled": np.flatnonzero(filled).tolist(),
        "empty": np.flatnonzero(empty).tolist(),
        "settings": settings.model_dump(mode="json"),
    }
    return zero_missing(kp), info


def extract_poses(
    source: FrameSource,
    frames: Iterable[np.ndarray],
    *,
    settings: PoseExtractConfig | None = None,
    estimator: PoseEstimator | None = None,
    cache_dir: Path | None = None,
) -> PoseSequence:
    """Poses of the person in an RGB video (see the module docstring).

    Args:
        source: the opened input (size, fps, path, content hash).
        frames: its frames, ``(H, W, 3)`` uint8 RGB, in order (read only on a cache miss).
        settings: extraction settings (default :class:`PoseExtractConfig`).
        estimator: default MediaPipe Pose (in this Python or ``.venv-pose``); tests inject fakes.
        cache_dir: cache root (raw estimates go to ``<cache_dir>/poses/``); None = no cache.

    Returns:
        A sequence in the video's pixel frame and fps; ``info`` records the extraction.

    Raises:
        PoseError: no estimator (the message names ``make pose-env``), nobody detected (see
            :func:`postprocess`).
    """
    settings = settings or PoseExtractConfig()
    estimator_id = ESTIMATOR_ID
    if estimator is not None:
        estimator_id = f"{estimator.name}/{type(estimator).__qualname__}"
    cached_path = None
    raw = None
    if cache_dir is not None:
        key = _cache_key(source, estimator_id, settings)
        cached_path = Path(cache_dir) / "poses" / f"{key}.npz"
        raw = _load_cached(cached_path) if cached_path.is_file() else None
    hit = raw is not None
    if raw is None:
        raw = _estimate_source(source, frames, estimator, settings)
        if cached_path is not None:
            _save_cached(cached_path, *raw)
    else:
        source.close()
    kp, info = postprocess(
        *raw,
        fps=source.fps,
        width=source.width,
        height=source.height,
        settings=settings,
        where=str(source.path),
    )
    info = {
        "kind": "rgb",
        "estimator": estimator_id,
        "cache": None if cached_path is None else str(cached_path),
        "cache_hit": hit,
        **info,
    }
    return PoseSequence(
        kp, source.fps, source.width, source.height, source=str(source.path), info=info
    )


def _estimate_source(
    source: FrameSource,
    frames: Iterable[np.ndarray],
    estimator: PoseEstimator | None,
    settings: PoseExtractConfig,
) -> tuple[np.ndarray, np.ndarray]:
    own = estimator is None
    if estimator is None:
        try:
            estimator = mediapipe_estimator(
                min_detection_confidence=settings.min_detection_confidence
            )
        except PoseEstimatorError as exc:
            source.close()
            raise PoseError(POSE_ENV_MISSING.format(path=source.path, cause=exc)) from exc
    try:
        return estimate_frames(frames, estimator)
    except PoseEstimatorError as exc:
        raise PoseError(POSE_ENV_MISSING.format(path=source.path, cause=exc)) from exc
    finally:
        source.close()
        close = getattr(estimator, "close", None)
        if own and close is not None:
            close()
