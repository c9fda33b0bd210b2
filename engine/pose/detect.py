"""Tell a rendered OpenPose skeleton from an RGB video, so an RGB video is never decoded as one.

A rendered pose map (ControlNet's OpenPose style, see :mod:`engine.pose.draw`) is a black
background with a few strokes whose colours are the 18 standard hues (multiples of 20°), fully
saturated, at two brightness levels (limbs 60 %, joints 100 %). A frame is judged a skeleton when
all three hold:

* **dark**: at least :data:`MIN_DARK` of its pixels have every channel <= :data:`INK_LEVEL`;
* **pose colours**: of the other ("ink") pixels, at least :data:`MIN_POSE_COLOUR` have a
  standard hue (within ±4°), saturation >= 150/255 and a limb or joint brightness; H.264 chroma
  subsampling blurs thin strokes, so the bar is low (measured: 0.46 for a 64 px CRF-10 mp4, 0.82
  at 512 px, 1.0 for GIF/PNG; RGB photographs, bright or darkened, 0.00-0.24);
* **many hues**: at least :data:`MIN_HUES` distinct standard hues are present (a skeleton draws
  up to 18; a saturated costume or a neon sign on black shows 1-3);
* **two levels**: limbs (60 % brightness) make up :data:`LIMB_SHARE` of the pose-coloured pixels,
  the rest joints (measured 0.42-0.86 from 64 to 512 px; coloured lights on black: ~0 or ~1).

Measured on H.264 re-encodes at CRF 28 (64-128 px), pose-colour share 0.18-0.21 and >= 13 hues:
still skeletons. Rendered skeletons that fail these tests (heavier compression, other styles)
are read as RGB, where the estimator finds no person and the error names ``--kind skeleton``.

A frame whose pixels are all near-black (:data:`BLANK_LEVEL`) is *blank*: it tells nothing. The
input's kind is decided on its first :data:`SAMPLE_FRAMES` non-blank frames: a skeleton when at
least :data:`MIN_SKELETON_VOTES` of them are; otherwise RGB. A dark RGB video is RGB: its ink
pixels are dim (brightness below the limb level) and its dark pixels are not exactly black.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

FrameKind = Literal["skeleton", "rgb", "blank"]
PoseKind = Literal["auto", "skeleton", "rgb"]

INK_LEVEL = 24  # max channel above this = a stroke (or scene) pixel; below = background
BLANK_LEVEL = 4  # every pixel's max channel at most this (after H.264: black stays 0-2) = blank
BLANK_FRACTION = 0.999
MIN_DARK = 0.6
MIN_POSE_COLOUR = 0.12
MIN_HUES = 6
MIN_SATURATION = 150
HUE_TOLERANCE = 2  # OpenCV 8-bit hue units (2°): ±4°
LIMB_VALUES = (120, 185)  # 0.6 x 255 = 153 ± compression
JOINT_VALUE = 215
SAMPLE_FRAMES = 5
MAX_SCAN_FRAMES = 48  # frames buffered while looking for non-blank ones
MAX_SCAN_BYTES = 256 << 20  # ... and at most this many bytes of them (large frames: fewer)
MIN_SKELETON_VOTES = 0.8
LIMB_SHARE = (0.2, 0.95)


@dataclass(frozen=True)
class FrameStats:
    """What :func:`frame_kind` measured on one frame (fractions in 0..1)."""

    dark: float
    """Fraction of pixels with max channel <= INK_LEVEL."""
    pose_colour: float
    """Fraction of ink pixels with a standard OpenPose colour."""
    hues: int
    """Distinct standard hues present (0..18)."""
    limb_share: float
    """Fraction of the pose-coloured pixels at limb brightness."""
    blank: bool

    @property
    def kind(self) -> FrameKind:
        """``blank``, ``skeleton`` or ``rgb`` by the rules of the module docstring."""
        if self.blank:
            return "blank"
        skeleton = (
            self.dark >= MIN_DARK
            and self.pose_colour >= MIN_POSE_COLOUR
            and self.hues >= MIN_HUES
            and LIMB_SHARE[0] <= self.limb_share <= LIMB_SHARE[1]
        )
        return "skeleton" if skeleton else "rgb"


def frame_stats(image: np.ndarray) -> FrameStats:
    """Measure one frame.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
    """
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, image.shape
    peak = image.max(axis=2)
    blank = float((peak <= BLANK_LEVEL).mean()) >= BLANK_FRACTION
    ink = peak > INK_LEVEL
    n_ink = int(ink.sum())
    hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV).astype(np.int16)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    standard_hue = np.abs(hue - 10 * np.round(hue / 10)) <= HUE_TOLERANCE
    limb_value = (val >= LIMB_VALUES[0]) & (val <= LIMB_VALUES[1])
    coloured = ink & standard_hue & (sat >= MIN_SATURATION)
    limbs, pose = coloured & limb_value, coloured & (limb_value | (val >= JOINT_VALUE))
    counts = np.bincount(((hue[pose] + 5) // 10 % 18).ravel(), minlength=18)
    hues = int((counts >= max(2, 0.002 * n_ink)).sum())
    return FrameStats(
        dark=float(1.0 - n_ink / peak.size),
        pose_colour=float(pose.sum() / max(n_ink, 1)),
        hues=hues,
        limb_share=float(limbs.sum() / max(int(pose.sum()), 1)),
        blank=blank,
    )


def frame_kind(image: np.ndarray) -> FrameKind:
    """``skeleton``, ``rgb`` or ``blank`` for one ``(H, W, 3)`` uint8 RGB frame."""
    return frame_stats(image).kind


@dataclass(frozen=True)
class Detection:
    """The decided kind of an input and the evidence (for errors and the manifest)."""

    kind: Literal["skeleton", "rgb"] | None
    """None when every scanned frame was blank."""
    votes: dict[str, int]
    """Scanned frames per frame kind."""

    def record(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {"kind": self.kind, "frames_scanned": dict(self.votes)}


def detect_kind(frames: Iterator[np.ndarray]) -> tuple[Detection, list[np.ndarray]]:
    """Decide whether ``frames`` are rendered skeletons or RGB, reading as few as needed.

    Args:
        frames: ``(H, W, 3)`` uint8 RGB frames in time order (consumed up to
            :data:`MAX_SCAN_FRAMES` frames, :data:`MAX_SCAN_BYTES` bytes of them, or
            :data:`SAMPLE_FRAMES` non-blank ones).

    Returns:
        ``(detection, read)``: ``read`` holds the frames consumed, to be processed before the rest
        of ``frames``.
    """
    read: list[np.ndarray] = []
    votes = {"skeleton": 0, "rgb": 0, "blank": 0}
    held = 0
    for frame in frames:
        read.append(frame)
        held += frame.nbytes
        votes[frame_kind(frame)] += 1
        enough = votes["skeleton"] + votes["rgb"] >= SAMPLE_FRAMES
        if enough or len(read) >= MAX_SCAN_FRAMES or held >= MAX_SCAN_BYTES:
            break
    seen = votes["skeleton"] + votes["rgb"]
    if seen == 0:
        return Detection(None, votes), read
    skeleton = votes["skeleton"] >= MIN_SKELETON_VOTES * seen
    return Detection("skeleton" if skeleton else "rgb", votes), read
