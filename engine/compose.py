"""Person masks and background compositing.

The frame chain keeps the background equal to a plate outside the person: latents are blended
with the noised plate latent during denoising (blended latent diffusion) and the decoded frame is
composited over the plate with a feathered mask. Masks come from the pose (limb capsules, head
disc, torso polygon; dilated, then feathered) or from supplied per-frame images.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.pose.skeleton import HEAD, LIMBS, TORSO


def pose_body_mask(keypoints: np.ndarray, width: int, height: int) -> np.ndarray:
    """Binary body mask drawn from one frame's keypoints.

    Args:
        keypoints: (18, 3) float32 (x_px, y_px, confidence); confidence 0 = missing joint.
        width, height: mask size in pixels.

    Returns:
        (height, width) uint8 in {0, 1}: limb capsules + head disc + torso polygon. Capsule width
        scales with the body (a fraction of the neck–hip or shoulder distance).
    """
    mask = np.zeros((height, width), np.uint8)
    ok = keypoints[:, 2] > 0
    pts = keypoints[:, :2]
    scale = _body_scale(keypoints)
    thickness = max(2, round(0.22 * scale))
    for a, b in LIMBS:
        if ok[a] and ok[b]:
            pa, pb = np.round(pts[a]).astype(int), np.round(pts[b]).astype(int)
            cv2.line(mask, tuple(pa), tuple(pb), 1, thickness, lineType=cv2.LINE_8)
    for j in np.flatnonzero(ok):
        cv2.circle(mask, tuple(np.round(pts[j]).astype(int)), thickness // 2 + 1, 1, -1)
    torso = [j for j in TORSO if ok[j]]
    if len(torso) >= 3:
        cv2.fillConvexPoly(mask, np.round(pts[torso]).astype(np.int32), 1)
    head = [j for j in HEAD if ok[j]]
    if head:
        centre = pts[head].mean(axis=0)
        cv2.circle(mask, tuple(np.round(centre).astype(int)), max(2, int(0.35 * scale)), 1, -1)
    return mask


def _body_scale(keypoints: np.ndarray) -> float:
    """A length in pixels proportional to body size: neck–hip, else shoulder width, else 10 px."""
    ok = keypoints[:, 2] > 0
    for a, b in ((1, 8), (1, 11), (2, 5)):
        if ok[a] and ok[b]:
            return float(np.linalg.norm(keypoints[a, :2] - keypoints[b, :2])) or 10.0
    return 10.0


def soften_mask(mask: np.ndarray, *, dilate_px: int, feather_px: int) -> np.ndarray:
    """Dilate a binary mask, then feather its edge outwards.

    Returns (H, W) float32 in [0, 1]; 1 inside the dilated mask. The feathered ramp lies outside
    the dilated region and reaches exactly 0 within ``feather_px`` of it, so every pixel farther
    than ``dilate_px + feather_px`` from the body is exactly 0.
    """
    binary = (mask > 0).astype(np.uint8)
    if dilate_px > 0:
        kernel = cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1)
        )
        binary = np.asarray(cv2.dilate(binary, kernel), dtype=np.uint8)
    if feather_px <= 0:
        return binary.astype(np.float32)
    # Distance outside the region → linear ramp 1 → 0 over feather_px pixels.
    dist = cv2.distanceTransform(1 - binary, cv2.DIST_L2, 5)
    return np.clip(1.0 - dist / float(feather_px), 0.0, 1.0).astype(np.float32)


def person_mask(
    keypoints: np.ndarray, width: int, height: int, *, dilate: float, feather: float
) -> np.ndarray:
    """Soft person mask (H, W) float32 in [0, 1] from keypoints; dilate/feather as fractions of
    the frame's shorter side (``chain.mask_dilate`` / ``chain.mask_feather``)."""
    side = min(width, height)
    return soften_mask(
        pose_body_mask(keypoints, width, height),
        dilate_px=round(dilate * side),
        feather_px=round(feather * side),
    )


def load_mask(
    path: Path, width: int, height: int, *, source_size: tuple[int, int] | None = None
) -> np.ndarray:
    """A supplied mask image (white = person) as (H, W) uint8 {0, 1} at the frame size.

    The mask is letterboxed into ``width`` x ``height`` exactly as the poses are
    (:func:`engine.pose.resample`): scaled by ``min(width / w0, height / h0)`` and centred, where
    ``(w0, h0) = source_size`` is the pose sequence's frame; the bars are background (0). A mask
    stored at another resolution than the pose frame must have its aspect ratio (within 1 px).

    Args:
        path: PNG/JPEG, any mode (converted to 8-bit grey, >= 128 = person).
        source_size: the pose frame (w0, h0); None = the mask's own size.

    Raises:
        ValueError: unreadable file, or aspect ratio other than the pose frame's; names the file.
    """
    try:
        with Image.open(path) as file:
            grey = np.asarray(file.convert("L"), dtype=np.float32)
    except OSError as e:
        raise ValueError(f"cannot read mask {path}: {e}") from None
    hm, wm = grey.shape
    w0, h0 = source_size or (wm, hm)
    if abs(wm * h0 / w0 - hm) > 1.0:
        raise ValueError(
            f"mask {path} is {wm}x{hm} but the poses' frame is {w0}x{h0}: a different aspect "
            "ratio cannot be lined up with the poses; give masks drawn on the pose frame"
        )
    scale = min(width / w0, height / h0)  # the poses' letterbox (engine.pose.sequence)
    sx, sy = scale * w0 / wm, scale * h0 / hm  # mask pixels → output pixels
    ox, oy = (width - scale * w0) / 2.0, (height - scale * h0) / 2.0
    # Pixel centres map like keypoints: (u + 0.5) * s + offset = u' + 0.5.
    matrix = np.array([[sx, 0.0, ox + 0.5 * sx - 0.5], [0.0, sy, oy + 0.5 * sy - 0.5]])
    warped = cv2.warpAffine(
        grey,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    return (warped >= 128.0).astype(np.uint8)


def latent_mask(mask: np.ndarray, factor: int) -> torch.Tensor:
    """(H, W) soft mask → (1, 1, H/f, W/f) float32: a latent cell counts as person if any of its
    pixels does (max-pool), so latent blending never pastes plate over the person."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.max_pool2d(t, kernel_size=factor, stride=factor)


def composite(frame: np.ndarray, plate: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``mask·frame + (1−mask)·plate`` → (H, W, 3) uint8; exactly the plate where mask is 0.

    Args:
        frame, plate: (H, W, 3) uint8 RGB. mask: (H, W) float32 in [0, 1], 1 = person.
    """
    m = mask[..., None].astype(np.float32)
    out = m * frame.astype(np.float32) + (1.0 - m) * plate.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
