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
``numpy<2``, which conflicts with this project's numpy 2.x / OpenCV 5: it is the optional extra
``[pose]``, to be installed in a separate environment, and is imported lazily. :class:`NoEstimator`
(``none``) reports Pose MSE as null with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from engine.pose.skeleton import NUM_JOINTS

POSE_MSE_SCALE = 1000.0
POSE_MIN_CONFIDENCE = 0.5
EstimatorName = Literal["auto", "none", "mediapipe"]

# COCO-18 joint ← MediaPipe Pose landmark index (33 landmarks; left/right = the person's own, as
# in OpenPose). The neck (COCO 1) has no landmark: it is the mid-point of the shoulders 11 / 12.
MEDIAPIPE_TO_COCO18: dict[int, int] = {
    0: 0,  # nose
    2: 12,  # right_shoulder
    3: 14,  # right_elbow
    4: 16,  # right_wrist
    5: 11,  # left_shoulder
    6: 13,  # left_elbow
    7: 15,  # left_wrist
    8: 24,  # right_hip
    9: 26,  # right_knee
    10: 28,  # right_ankle
    11: 23,  # left_hip
    12: 25,  # left_knee
    13: 27,  # left_ankle
    14: 5,  # right_eye
    15: 2,  # left_eye
    16: 8,  # right_ear
    17: 7,  # left_ear
}
NECK, MP_LEFT_SHOULDER, MP_RIGHT_SHOULDER = 1, 11, 12

MEDIAPIPE_MISSING = (
    "Pose MSE with the mediapipe estimator needs the optional extra [pose] "
    "(pip install 'dancing-avatar[pose]', i.e. mediapipe==0.10.21). mediapipe 0.10.21 pins "
    "numpy<2, which conflicts with this project's numpy 2.x and opencv 5: run `make pose-env` "
    "(a separate .venv-pose the estimator calls into) or set AVATAR_POSE_PYTHON to a Python "
    "with mediapipe, or use --estimator none (Pose MSE reported as null)"
)


class PoseEstimatorError(RuntimeError):
    """A pose estimator cannot be built (missing optional dependency); the message names the fix."""


@runtime_checkable
class PoseEstimator(Protocol):
    """Finds one person's COCO-18 keypoints in an image."""

    name: str

    def estimate(self, image: np.ndarray) -> np.ndarray | None:
        """Keypoints of the most prominent person, or None when no person is found.

        Args:
            image: (H, W, 3) uint8 RGB, 0..255.

        Returns:
            (18, 3) float32 ``(x_px, y_px, confidence)`` in the image's pixel frame, confidence in
            0..1 (0 = missing joint), or None.
        """
        ...


@dataclass
class NoEstimator:
    """The ``none`` estimator: Pose MSE and detection rate are reported as null with ``reason``."""

    reason: str = "no pose estimator selected (--estimator none)"
    name: str = "none"

    def estimate(self, image: np.ndarray) -> np.ndarray | None:
        raise PoseEstimatorError(f"the 'none' estimator estimates nothing: {self.reason}")


def landmarks_to_coco18(landmarks: Sequence[Any], width: int, height: int) -> np.ndarray:
    """MediaPipe's 33 normalised pose landmarks → COCO-18 keypoints in pixels.

    Args:
        landmarks: 33 objects with ``x``, ``y`` (0..1 of the width / height, may lie outside) and
            ``visibility`` (0..1), as in ``results.pose_landmarks.landmark``.
        width, height: the image size in pixels.

    Returns:
        (18, 3) float32 ``(x_px, y_px, confidence)``; confidence = visibility (the neck: the
        smaller of the two shoulders'), position of the neck = mid-point of the shoulders.
    """
    if len(landmarks) < 33:
        raise ValueError(f"expected 33 MediaPipe pose landmarks, got {len(landmarks)}")
    out = np.zeros((NUM_JOINTS, 3), np.float32)
    for coco, mp_index in MEDIAPIPE_TO_COCO18.items():
        lm = landmarks[mp_index]
        out[coco] = (lm.x * width, lm.y * height, lm.visibility)
    left, right = out[5], out[2]  # COCO left / right shoulder
    out[NECK] = ((left[0] + right[0]) / 2, (left[1] + right[1]) / 2, min(left[2], right[2]))
    out[:, 2] = np.clip(out[:, 2], 0.0, 1.0)
    return out


class MediaPipeEstimator:
    """MediaPipe Pose (BlazePose, ``model_complexity=1``, whose model ships in the wheel).

    Args:
        pose: an object with ``process(image) -> result`` (``result.pose_landmarks`` None or with
            ``.landmark``); default ``mediapipe.solutions.pose.Pose(static_image_mode=True,
            model_complexity=1)``, imported lazily. Tests inject a fake.

    Raises:
        PoseEstimatorError: mediapipe is missing or unusable (see :data:`MEDIAPIPE_MISSING`).
    """

    name = "mediapipe"

    def __init__(self, pose: Any | None = None, *, min_detection_confidence: float = 0.5) -> None:
        if pose is None:
            try:
                import mediapipe as mp  # optional extra [pose]

                pose = mp.solutions.pose.Pose(
                    static_image_mode=True,
                    model_complexity=1,
                    min_detection_confidence=min_detection_confidence,
                )
            except (ImportError, AttributeError, RuntimeError, ValueError) as exc:
                raise PoseEstimatorError(f"{MEDIAPIPE_MISSING} (cause: {exc})") from exc
        self._pose = pose

    def estimate(self, image: np.ndarray) -> np.ndarray | None:
        """(18, 3) float32 keypoints in pixels, or None (no person); image (H, W, 3) uint8 RGB."""
        result = self._pose.process(np.ascontiguousarray(image))
        if result is None or getattr(result, "pose_landmarks", None) is None:
            return None
        height, width = image.shape[:2]
        return landmarks_to_coco18(result.pose_landmarks.landmark, width, height)


class SubprocessPose:
    """MediaPipe Pose running in another Python (``make pose-env`` builds ``.venv-pose``, whose
    numpy<2 cannot share this environment), driven over a pipe by ``mediapipe_worker.py``.
    Same ``process(image)`` interface as ``mediapipe.solutions.pose.Pose``."""

    def __init__(self, python: str) -> None:
        worker = Path(__file__).with_name("mediapipe_worker.py")
        self._proc = subprocess.Popen(
            [python, "-u", str(worker)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        if self._readline() != "ready":
            raise PoseEstimatorError(f"the mediapipe worker in {python} did not start")

    def _readline(self) -> str:
        assert self._proc.stdout is not None
        return self._proc.stdout.readline().decode().strip()

    def process(self, image: np.ndarray) -> Any:
        assert self._proc.stdin is not None
        height, width = image.shape[:2]
        self._proc.stdin.write(
            f"{height} {width}\n".encode() + np.ascontiguousarray(image).tobytes()
        )
        self._proc.stdin.flush()
        line = self._readline()
        if not line:
            raise PoseEstimatorError("the mediapipe worker exited while estimating a pose")
        marks = json.loads(line)
        if marks is None:
            return SimpleNamespace(pose_landmarks=None)
        landmark = [SimpleNamespace(x=x, y=y, visibility=v) for x, y, v in marks]
        return SimpleNamespace(pose_landmarks=SimpleNamespace(landmark=landmark))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def __del__(self) -> None:
        self.close()


def pose_python() -> str | None:
    """A Python with mediapipe: ``$AVATAR_POSE_PYTHON``, else ``.venv-pose`` of the checkout."""
    configured = os.environ.get("AVATAR_POSE_PYTHON")
    if configured:
        return configured
    local = Path(__file__).resolve().parents[2] / ".venv-pose" / "bin" / "python"
    return str(local) if local.exists() else None


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
    builds).
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
