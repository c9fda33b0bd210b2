"""Parse OpenPose JSON output (COCO-18 or BODY_25) into COCO-18 keypoints.

OpenPose writes one JSON object per frame, ``{"version": ..., "people": [{"pose_keypoints_2d":
[x0, y0, c0, x1, ...]}, ...]}``, with 18 * 3 values for the COCO model or 25 * 3 for BODY_25
(mapped to COCO-18 with :data:`~engine.pose.skeleton.BODY25_TO_COCO18`). We read either a folder of
such per-frame files or one file holding a JSON list of them. controlnet_aux's variant (keypoints
normalised to ``[0, 1]`` plus ``canvas_width`` / ``canvas_height``) is read too.

Person choice: when a frame holds several people we take the one with the highest mean confidence
over the 18 COCO joints (the first such on ties); a frame with no people (or a null/empty
``pose_keypoints_2d``) gives all joints missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from engine.pose.sequence import PoseError, PoseSequence, zero_missing
from engine.pose.skeleton import BODY25_TO_COCO18, NUM_JOINTS

DEFAULT_FPS = 8.0
SIZE_MULTIPLE = 8
DEFAULT_SIZE = 512  # used when no frame has a confident joint to measure the extent from


def _person_coco18(values: object, where: str) -> np.ndarray | None:
    """Turn one ``pose_keypoints_2d`` list into ``(18, 3)`` float32, or None when it is empty."""
    if values is None or (isinstance(values, list) and not values):
        return None
    if not isinstance(values, list):
        raise PoseError(f"{where}: pose_keypoints_2d is {type(values).__name__}, expected a list")
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise PoseError(f"{where}: pose_keypoints_2d holds non-numbers ({exc})") from exc
    if arr.ndim != 1 or arr.size not in (NUM_JOINTS * 3, 25 * 3):
        raise PoseError(
            f"{where}: pose_keypoints_2d has {arr.size} values; expected {NUM_JOINTS * 3} "
            "(COCO-18) or 75 (BODY_25); re-export with --model_pose COCO or BODY_25"
        )
    kp = arr.reshape(-1, 3)
    if kp.shape[0] == 25:
        kp = kp[list(BODY25_TO_COCO18)]
    return kp


def parse_openpose_frame(obj: object, where: str) -> np.ndarray:
    """Parse one OpenPose per-frame object into ``(18, 3)`` float32 COCO-18 keypoints.

    Picks the person with the highest mean confidence; no people -> all joints missing (zeros).
    ``where`` names the file (and frame) in errors.
    """
    if not isinstance(obj, dict) or "people" not in obj:
        raise PoseError(
            f"{where}: not an OpenPose frame (a JSON object with a 'people' list); "
            "give OpenPose --write_json output or our poses.json"
        )
    people = obj["people"]
    if not isinstance(people, list):
        raise PoseError(f"{where}: 'people' is {type(people).__name__}, expected a list")
    best: np.ndarray | None = None
    for p, person in enumerate(people):
        if not isinstance(person, dict):
            raise PoseError(f"{where}, person {p}: expected an object with 'pose_keypoints_2d'")
        kp = _person_coco18(person.get("pose_keypoints_2d"), f"{where}, person {p}")
        if kp is not None and (best is None or kp[:, 2].mean() > best[:, 2].mean()):
            best = kp
    if best is None:
        return np.zeros((NUM_JOINTS, 3), dtype=np.float32)
    return zero_missing(best)


def _canvas(frames: Sequence[object], key: str) -> int | None:
    """The controlnet_aux ``canvas_width``/``canvas_height`` of the first frame carrying it."""
    for obj in frames:
        if isinstance(obj, dict) and isinstance(obj.get(key), int | float) and obj[key] > 0:
            return int(obj[key])
    return None


def _extent(values: np.ndarray) -> int:
    """Smallest multiple of 8 >= the largest confident coordinate (DEFAULT_SIZE if none)."""
    if values.size == 0:
        return DEFAULT_SIZE
    return max(SIZE_MULTIPLE, math.ceil(float(values.max()) / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def openpose_sequence(
    frames: Sequence[object],
    names: Sequence[str],
    *,
    source: str,
    fps: float | None = None,
    width: int | None = None,
    height: int | None = None,
) -> PoseSequence:
    """Build a sequence from OpenPose per-frame objects.

    Args:
        frames: the parsed JSON objects, one per frame, in time order.
        names: how to name each frame in errors (file name, or ``"<file>, frame <i>"``).
        source: the path the frames came from.
        fps: frame rate (OpenPose does not store one); default 8.
        width, height: the pixel frame of the keypoints; default ``canvas_width``/``canvas_height``
            when present, else the keypoint extent rounded up to a multiple of 8 (512 if empty).

    Returns:
        A sequence with keypoints ``(F, 18, 3)`` float32. Keypoints normalised to ``[0, 1]``
        (controlnet_aux) are scaled to pixels.
    """
    assert len(frames) == len(names), (len(frames), len(names))
    if not frames:
        raise PoseError(f"{source}: holds no OpenPose frames; give at least one frame")
    kp = np.stack(
        [parse_openpose_frame(obj, name) for obj, name in zip(frames, names, strict=True)]
    )
    width = width or _canvas(frames, "canvas_width")
    height = height or _canvas(frames, "canvas_height")
    conf = kp[..., 2] > 0
    if conf.any() and float(kp[conf][:, :2].max()) <= 1.0:
        if width is None or height is None:
            raise PoseError(
                f"{source}: keypoints look normalised to [0, 1] and the file gives no canvas size; "
                "pass width= and height= (the size of the frames they were detected in)"
            )
        kp[..., 0] *= width
        kp[..., 1] *= height
    width = width or _extent(kp[..., 0][conf])
    height = height or _extent(kp[..., 1][conf])
    fps = DEFAULT_FPS if fps is None else float(fps)
    return PoseSequence(kp, fps=fps, width=int(width), height=int(height), source=source)
