"""Render COCO-18 keypoints as OpenPose pose maps, decode pose maps back, overlay skeletons.

The pose map style is the ControlNet OpenPose annotator's (controlnet_aux ``draw_bodypose``): black
background, limb ``i`` a filled ellipse in ``0.6 * COLORS[i]``, then joint ``j`` a filled disc in
full-intensity ``COLORS[j]``. Because every joint colour has a 255 channel and every limb colour's
channels are at most 153 (same hues, 60 % value), joint discs can be told apart from limbs by
colour alone, which is what :func:`decode_pose_map` relies on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import cv2
import numpy as np

from engine.pose.sequence import PoseSequence
from engine.pose.skeleton import COLORS, LIMBS, NUM_JOINTS

LIMB_COLOR_SCALE = 0.6
REFERENCE_SIZE = 512  # the annotator's stickwidth 4 / radius 4 are for ~512 px images
_SHIFT = 4  # sub-pixel bits for cv2.circle, so decoded centres are not truncated to whole pixels


def stroke_sizes(width: int, height: int) -> tuple[int, int]:
    """Return ``(stickwidth, radius)`` in pixels for a ``width x height`` pose map.

    Both are 4 at a 512 px short side (the annotator's values), scaled with the short side, at least
    1 px (stick half-width) and 2 px (joint radius).
    """
    scale = min(width, height) / REFERENCE_SIZE
    return max(1, round(4 * scale)), max(2, round(4 * scale))


def render_pose_map(
    keypoints: np.ndarray, width: int, height: int, *, stickwidth: int | None = None
) -> np.ndarray:
    """Draw one frame of keypoints as an OpenPose pose map.

    Args:
        keypoints: ``(18, 3)`` float ``(x_px, y_px, confidence)`` in the ``width x height`` frame;
            joints with confidence <= 0 (and limbs touching them) are not drawn.
        width, height: output size in pixels.
        stickwidth: limb half-thickness in pixels; default from :func:`stroke_sizes`.

    Returns:
        ``(height, width, 3)`` uint8 RGB image.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    assert kp.shape == (NUM_JOINTS, 3), kp.shape
    default_stick, radius = stroke_sizes(width, height)
    stick = default_stick if stickwidth is None else int(stickwidth)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    present = kp[:, 2] > 0
    for i, (a, b) in enumerate(LIMBS):
        if not (present[a] and present[b]):
            continue
        (x1, y1), (x2, y2) = kp[a, :2], kp[b, :2]
        length = math.hypot(x1 - x2, y1 - y2)
        angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
        centre = (int((x1 + x2) / 2), int((y1 + y2) / 2))
        polygon = np.asarray(
            cv2.ellipse2Poly(centre, (int(length / 2), stick), int(angle), 0, 360, 1), np.int32
        )
        colour = [float(int(c * LIMB_COLOR_SCALE)) for c in COLORS[i]]
        cv2.fillConvexPoly(canvas, polygon, colour)
    one = 1 << _SHIFT
    for j in np.flatnonzero(present):
        centre = (round(kp[j, 0] * one), round(kp[j, 1] * one))
        cv2.circle(canvas, centre, radius * one, COLORS[j], -1, cv2.LINE_8, _SHIFT)
    return canvas


def render_pose_maps(seq: PoseSequence) -> Iterator[np.ndarray]:
    """Yield one ``(seq.height, seq.width, 3)`` uint8 RGB pose map per frame of ``seq``."""
    for kp in seq.keypoints:
        yield render_pose_map(kp, seq.width, seq.height)


def _joint_labels(img: np.ndarray, min_saturation: int, min_value: int) -> np.ndarray:
    """Label each pixel ``(H, W)`` int16 with the joint whose colour hue it has, else -1.

    The joint colours are fully saturated, full value, with hues exactly ``20 * j`` degrees apart;
    a pixel gets joint ``round(hue / 20) mod 18`` when its HSV value >= ``min_value`` and
    saturation >= ``min_saturation`` (limb colours share the hues at 60 % value, so a value
    threshold between 153 and 255 tells them apart). Hue survives H.264/JPEG chroma loss better
    than exact RGB matching.
    """
    hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV)  # 8-bit: H in [0, 180)
    labels = (((hsv[..., 0].astype(np.int16) + 5) // 10) % NUM_JOINTS).astype(np.int16)
    labels[(hsv[..., 1] < min_saturation) | (hsv[..., 2] < min_value)] = -1
    return labels


def decode_pose_map(
    img: np.ndarray,
    *,
    min_saturation: int = 128,
    min_value: int = 190,
    min_area: int | None = None,
) -> np.ndarray:
    """Recover COCO-18 keypoints from an OpenPose pose map (one person).

    Pixels are assigned to joints by hue (see ``_joint_labels``: bright, saturated pixels only, so
    the 0.6-scaled limbs and the black background are ignored); each joint's pixels are grouped
    into 8-connected blobs and the largest blob of at least ``min_area`` pixels gives the joint at
    its centroid with confidence 1. Joints without such a blob are missing ``(0, 0, 0)``. With
    several people in the map the largest blob per joint wins, which can mix people. Reliable
    (< 1 px) from about 384 px short side up, through H.264 and JPEG; at 256 px the face joints
    overlap and heavy compression (CRF >= 28) can lose or invent a few.

    Args:
        img: ``(H, W, 3)`` uint8 RGB pose map.
        min_saturation, min_value: HSV thresholds (0-255) for a pixel to count as a joint colour.
        min_area: smallest accepted blob in pixels; default a quarter of the disc area expected
            at this resolution (see :func:`stroke_sizes`), which rejects colour-blend fringes.

    Returns:
        ``(18, 3)`` float32 ``(x_px, y_px, confidence)``.
    """
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8, (img.shape, img.dtype)
    height, width = img.shape[:2]
    if min_area is None:
        _, radius = stroke_sizes(width, height)
        min_area = max(3, int(0.25 * math.pi * radius * radius))
    labels = _joint_labels(img, min_saturation, min_value)
    out = np.zeros((NUM_JOINTS, 3), dtype=np.float32)
    counts = np.bincount(labels.ravel() + 1, minlength=NUM_JOINTS + 1)[1:]
    for j in np.flatnonzero(counts >= min_area):
        mask = (labels == j).astype(np.uint8)
        n, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if n < 2:
            continue
        areas = stats[1:, cv2.CC_STAT_AREA]
        best = int(np.argmax(areas))
        if areas[best] < min_area:
            continue
        out[j] = (centroids[best + 1][0], centroids[best + 1][1], 1.0)
    return out


def overlay_pose(frame: np.ndarray, keypoints: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Draw the pose-map skeleton over an RGB frame (for contact sheets and previews).

    Args:
        frame: ``(H, W, 3)`` uint8 RGB; the keypoints must be in its pixel space.
        keypoints: ``(18, 3)`` float ``(x_px, y_px, confidence)``.
        alpha: opacity of the skeleton in ``[0, 1]``; background pixels are left untouched.

    Returns:
        A new ``(H, W, 3)`` uint8 RGB image.
    """
    assert frame.ndim == 3 and frame.shape[2] == 3, frame.shape
    height, width = frame.shape[:2]
    pose = render_pose_map(keypoints, width, height)
    drawn = pose.any(axis=-1, keepdims=True)
    blend = frame.astype(np.float32) * (1.0 - alpha) + pose.astype(np.float32) * alpha
    out = np.where(drawn, blend, frame.astype(np.float32))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
