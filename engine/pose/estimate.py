"""The offline pose estimator: MediaPipe Pose, in this Python or in the separate ``.venv-pose``.

One implementation serves both Pose MSE (:mod:`engine.metrics.pose_mse`, on generated frames) and
pose extraction from a driving RGB video (:mod:`engine.pose.extract`).

``mediapipe==0.10.21`` is the last wheel that ships its pose model (BlazePose,
``model_complexity=1``) inside, so it runs offline; it pins ``numpy<2``, which this project's
numpy 2.x / OpenCV 5 environment cannot share. ``make pose-env`` (part of ``make install``)
therefore builds ``.venv-pose`` and :class:`SubprocessPose` drives
``engine/metrics/mediapipe_worker.py`` there over a pipe. MediaPipe Pose finds one person per
image: the most prominent one (its detector's highest-scoring person).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from engine.pose.skeleton import NUM_JOINTS

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
MODEL_COMPLEXITY = 1  # the only BlazePose model inside the mediapipe 0.10.21 wheel
WORKER = Path(__file__).resolve().parents[1] / "metrics" / "mediapipe_worker.py"

MEDIAPIPE_MISSING = (
    "Pose MSE with the mediapipe estimator needs the optional extra [pose] "
    "(pip install 'dancing-avatar[pose]', i.e. mediapipe==0.10.21). mediapipe 0.10.21 pins "
    "numpy<2, which conflicts with this project's numpy 2.x and opencv 5: run `make pose-env` "
    "(a separate .venv-pose the estimator calls into) or set AVATAR_POSE_PYTHON to a Python "
    "with mediapipe, or use --estimator none (Pose MSE reported as null)"
)


class PoseEstimatorError(RuntimeError):
    """A pose estimator cannot be built or died (missing optional dependency); names the fix."""


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
        min_detection_confidence: the person detector's threshold (0..1) for the default ``pose``.

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
                    model_complexity=MODEL_COMPLEXITY,
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

    def close(self) -> None:
        """Release the model (ends the worker process of a :class:`SubprocessPose`)."""
        close = getattr(self._pose, "close", None)
        if close is not None:
            close()


class SubprocessPose:
    """MediaPipe Pose running in another Python (``make pose-env`` builds ``.venv-pose``, whose
    numpy<2 cannot share this environment), driven over a pipe by ``mediapipe_worker.py``.
    Same ``process(image)`` interface as ``mediapipe.solutions.pose.Pose``.

    Args:
        python: the interpreter that has mediapipe 0.10.21.
        min_detection_confidence: the person detector's threshold (0..1).

    Raises:
        PoseEstimatorError: the worker did not start; the message quotes its stderr.
    """

    def __init__(self, python: str, *, min_detection_confidence: float = 0.5) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the worker)
        try:
            self._proc = subprocess.Popen(
                [
                    python,
                    "-u",
                    str(WORKER),
                    "--min-detection-confidence",
                    str(min_detection_confidence),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        except OSError as exc:
            raise PoseEstimatorError(
                f"cannot run the mediapipe worker with {python} ({exc}); run `make pose-env`"
            ) from exc
        if self._readline() != "ready":
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)  # let it finish writing its error
            cause = self._error_tail()
            self.close()
            raise PoseEstimatorError(
                f"the mediapipe worker in {python} did not start ({cause}); "
                "rebuild it with `rm -rf .venv-pose && make pose-env`"
            )

    def _error_tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip().splitlines()
        return text[-1] if text else "no error output"

    def _readline(self) -> str:
        assert self._proc.stdout is not None
        return self._proc.stdout.readline().decode().strip()

    def process(self, image: np.ndarray) -> Any:
        """Landmarks of one (H, W, 3) uint8 RGB image, shaped like mediapipe's result."""
        assert self._proc.stdin is not None
        height, width = image.shape[:2]
        try:
            self._proc.stdin.write(
                f"{height} {width}\n".encode() + np.ascontiguousarray(image).tobytes()
            )
            self._proc.stdin.flush()
            line = self._readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise PoseEstimatorError(
                f"the mediapipe worker exited while estimating a pose ({self._error_tail()})"
            )
        marks = json.loads(line)
        if marks is None:
            return SimpleNamespace(pose_landmarks=None)
        landmark = [SimpleNamespace(x=x, y=y, visibility=v) for x, y, v in marks]
        return SimpleNamespace(pose_landmarks=SimpleNamespace(landmark=landmark))

    def close(self) -> None:
        """End the worker process (idempotent)."""
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout) if proc is not None else ():
            if stream is not None:
                stream.close()
        if not self._stderr.closed:
            self._stderr.close()

    def __del__(self) -> None:
        self.close()


def pose_python() -> str | None:
    """A Python with mediapipe: ``$AVATAR_POSE_PYTHON``, else ``.venv-pose`` of the checkout."""
    configured = os.environ.get("AVATAR_POSE_PYTHON")
    if configured:
        return configured
    local = Path(__file__).resolve().parents[2] / ".venv-pose" / "bin" / "python"
    return str(local) if local.exists() else None


def mediapipe_estimator(
    *, min_detection_confidence: float = 0.5, python: str | None = None
) -> MediaPipeEstimator:
    """MediaPipe Pose in this Python if importable, else the worker in ``python``.

    Args:
        min_detection_confidence: the person detector's threshold (0..1).
        python: the interpreter with mediapipe (default :func:`pose_python`).

    Raises:
        PoseEstimatorError: neither is available (message: run ``make pose-env``).
    """
    try:
        return MediaPipeEstimator(min_detection_confidence=min_detection_confidence)
    except PoseEstimatorError:
        python = python or pose_python()
        if python is None:
            raise
        pose = SubprocessPose(python, min_detection_confidence=min_detection_confidence)
        return MediaPipeEstimator(pose)
