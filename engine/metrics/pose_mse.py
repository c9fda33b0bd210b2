"""Pose MSE: keypoints estimated on the generated frames vs the input pose, plus detection rate.

Definition used here (the paper reports Pose MSE 1.48 for Dancing Avatar without stating its
scale or normalisation, so our numbers are not directly comparable to it):

* Both keypoint sets are COCO-18 ``(18, 3)`` float32 ``(x_px, y_px, confidence)`` in the pixel
  frame of the generated image (``width`` x ``height``); coordinates are normalised to 0..1 by
  dividing x by the width and y by the height.
* A joint counts when it is present in the input (confidence > 0: the ControlNet drew it) and
  estimated with confidence >= ``min_confidence`` (default 0.5).
* Per frame: ``mean_j ((dx_j / W)² + (dy_j / H)²) · POSE_MSE_SCALE`` over the counted joints, with
  ``POSE_MSE_SCALE = 1000`` (so 1.0 = an RMS joint error of ~3.2 % of the frame side).
* Video: the mean over frames with a value. A frame where the estimator finds no person is
  *undetected*: it has no MSE but counts against :func:`pose_scores`' ``detection_rate``
  (detected frames / all frames), which is reported separately, never silently dropped. A detected
  frame without any counted joint has no MSE either (``joints == 0``).

Estimators follow the :class:`PoseEstimator` protocol. The offline default is MediaPipe Pose
(``mediapipe==0.10.21`` ships its model in the wheel; ``model_complexity=1``), but it pins
``numpy<2``, which conflicts with this project's numpy 2.x / OpenCV 5: it runs in the separate
``.venv-pose`` (``make pose-env``, part of ``make install``) or in-process when importable. The
estimator is :mod:`engine.pose.estimate`, shared with pose extraction from driving RGB videos.
:class:`NoEstimator` (``none``) reports Pose MSE as null with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from engine.pose.estimate import (
    MEDIAPIPE_MISSING,
    MEDIAPIPE_TO_COCO18,
    MediaPipeEstimator,
    PoseEstimator,
    PoseEstimatorError,
    SubprocessPose,
    landmarks_to_coco18,
    pose_python,
)
from engine.pose.skeleton import NUM_JOINTS

__all__ = [
    "MEDIAPIPE_MISSING",
    "MEDIAPIPE_TO_COCO18",
    "POSE_MIN_CONFIDENCE",
    "POSE_MSE_SCALE",
    "MediaPipeEstimator",
    "NoEstimator",
    "PoseEstimator",
    "PoseEstimatorError",
    "SubprocessPose",
    "frame_pose_mse",
    "landmarks_to_coco18",
    "make_estimator",
    "pose_python",
    "pose_scores",
]

POSE_MSE_SCALE = 1000.0
POSE_MIN_CONFIDENCE = 0.5
EstimatorName = Literal["auto", "none", "mediapipe"]


@dataclass
class NoEstimator:
    """The ``none`` estimator: Pose MSE and detection rate are reported as null with ``reason``."""

    reason: str = "no pose estimator selected (--estimator none)"
    name: str = "none"

    def estimate(self, image: np.ndarray) -> np.ndarray | None:
        raise PoseEstimatorError(f"the 'none' estimator estimates nothing: {self.reason}")


def _mediapipe() -> MediaPipeEstimator:
    """In-process mediapipe if importable, else the worker in :func:`pose_python`."""
    try:
        return MediaPipeEstimator()
    except PoseEstimatorError:
        python = pose_python()
        if python is None:
            raise
        return MediaPipeEstimator(SubprocessPose(python))


def make_estimator(name: EstimatorName = "auto") -> PoseEstimator:
    """``mediapipe``, ``none``, or ``auto`` (mediapipe when available, else ``none`` + reason).

    mediapipe is available when importable here or through a separate Python with it
    (:func:`pose_python`: ``$AVATAR_POSE_PYTHON`` or the ``.venv-pose`` that ``make pose-env``
    builds). The estimator itself lives in :mod:`engine.pose.estimate` (shared with pose
    extraction from RGB videos).
    """
    if name == "none":
        return NoEstimator()
    if name == "mediapipe":
        return _mediapipe()
    if name == "auto":
        try:
            return _mediapipe()
        except PoseEstimatorError:
            return NoEstimator(
                "mediapipe is not installed (the optional extra [pose] pins numpy<2 and "
                "conflicts with this environment): run `make pose-env` (a separate .venv-pose) "
                "or set AVATAR_POSE_PYTHON to a Python that has mediapipe==0.10.21"
            )
    raise ValueError(f"unknown pose estimator {name!r}; use one of: auto, none, mediapipe")


def frame_pose_mse(
    estimated: np.ndarray,
    reference: np.ndarray,
    width: int,
    height: int,
    *,
    min_confidence: float = POSE_MIN_CONFIDENCE,
) -> tuple[float | None, int]:
    """Scaled normalised squared joint error of one frame (see module docstring).

    Args:
        estimated, reference: (18, 3) ``(x_px, y_px, confidence)`` in a width x height frame.
        min_confidence: estimated joints below it are ignored; reference joints need conf > 0.

    Returns:
        ``(mse, joints)``: mse in ``POSE_MSE_SCALE`` units (None when ``joints == 0``).
    """
    est, ref = np.asarray(estimated, np.float64), np.asarray(reference, np.float64)
    if est.shape != (NUM_JOINTS, 3) or ref.shape != (NUM_JOINTS, 3):
        raise ValueError(f"keypoints must be (18, 3), got {est.shape} and {ref.shape}")
    ok = (ref[:, 2] > 0) & (est[:, 2] >= min_confidence)
    joints = int(ok.sum())
    if joints == 0:
        return None, 0
    size = np.array([width, height], np.float64)
    d = (est[ok, :2] - ref[ok, :2]) / size
    return float(np.square(d).sum(axis=1).mean() * POSE_MSE_SCALE), joints


def pose_scores(
    frames: Sequence[np.ndarray],
    reference: np.ndarray,
    estimator: PoseEstimator,
    *,
    min_confidence: float = POSE_MIN_CONFIDENCE,
) -> dict[str, Any]:
    """Pose MSE per frame and for the video, and the detection rate.

    Args:
        frames: T generated frames, (H, W, 3) uint8 RGB.
        reference: (T, 18, 3) input keypoints in the frames' pixel frame.
        estimator: a :class:`PoseEstimator`; :class:`NoEstimator` gives nulls with its reason.

    Returns:
        ``{"pose_mse": float | None, "detection_rate": float | None, "per_frame": {"pose_mse":
        [T float | None], "detected": [T bool | None], "joints": [T int]}, "reason": str | None}``.
    """
    reference = np.asarray(reference, np.float32)
    if len(reference) != len(frames):
        raise ValueError(f"got {len(reference)} reference poses for {len(frames)} frames")
    if isinstance(estimator, NoEstimator):
        empty: list[Any] = [None] * len(frames)
        return {
            "pose_mse": None,
            "detection_rate": None,
            "per_frame": {"pose_mse": empty, "detected": empty, "joints": [0] * len(frames)},
            "reason": estimator.reason,
        }
    mses: list[float | None] = []
    detected: list[bool] = []
    joints: list[int] = []
    for frame, ref in zip(frames, reference, strict=True):
        est = estimator.estimate(frame)
        detected.append(est is not None)
        if est is None:
            mses.append(None)
            joints.append(0)
            continue
        height, width = frame.shape[:2]
        mse, n = frame_pose_mse(est, ref, width, height, min_confidence=min_confidence)
        mses.append(mse)
        joints.append(n)
    values = [m for m in mses if m is not None]
    reason = None if values else "no frame with a detected person and a common confident joint"
    return {
        "pose_mse": float(np.mean(values)) if values else None,
        "detection_rate": float(np.mean(detected)) if len(detected) else None,
        "per_frame": {"pose_mse": mses, "detected": detected, "joints": joints},
        "reason": reason,
    }
