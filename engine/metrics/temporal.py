"""Temporal-consistency metrics between adjacent video frames: Frame L1 and Frame MSE.

Definitions used here (the paper reports "Frame L1" ≈ 270 without stating its scale, so its
numbers are not directly comparable; a per-pixel mean on 0..255 can never exceed 255):

* ``frame_l1(a, b)``  = mean over pixels and channels of ``|a - b|``, values on the 0..255 scale
  (so 0..255; multiply by 3 for a per-pixel sum over RGB, or by H·W·3 for a total sum).
* ``frame_mse(a, b)`` = mean over pixels and channels of ``(a - b)²`` on the 0..255 scale
  (0..65025).
* With a ``mask`` (bool (H, W)) the mean is taken over the True pixels only (all channels).
* Video scores (:func:`temporal_metrics`) average the per-pair values over all adjacent pairs
  ``(f_t, f_{t+1})``. For the body/background split of a pair the body region is the union of
  the two frames' person masks and the background its complement, so a pixel the person enters
  or leaves counts as body in that pair.

Identical frames give exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def adjacent_pairs(frames: Sequence[T] | np.ndarray) -> list[tuple[T, T]]:
    """``[(f0, f1), (f1, f2), ...]``: the T-1 adjacent pairs of a sequence (or (T, ...) array)."""
    return [(frames[i], frames[i + 1]) for i in range(len(frames) - 1)]


def _diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Flattened float64 differences a - b inside the mask (all channels)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"frames must have the same shape, got {a.shape} and {b.shape}")
    d = a.astype(np.float64) - b.astype(np.float64)
    if mask is None:
        return d.ravel()
    m = np.asarray(mask, bool)
    if m.shape != a.shape[:2]:
        raise ValueError(f"mask shape {m.shape} must equal the frame's (H, W) {a.shape[:2]}")
    if not m.any():
        raise ValueError(f"mask of shape {m.shape} is empty: no pixels to compare")
    return d[m].ravel()


def frame_l1(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute difference of two frames on the 0..255 scale (see module docstring).

    Args:
        a, b: frames (H, W, C) or (H, W), uint8 0..255 (or float on the same 0..255 scale).
        mask: optional bool (H, W); only True pixels count. Empty mask → ValueError.
    """
    return float(np.abs(_diff(a, b, mask)).mean())


def frame_mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared difference of two frames on the 0..255 scale (0..65025).

    Args:
        a, b: frames (H, W, C) or (H, W), uint8 0..255 (or float on the same 0..255 scale).
        mask: optional bool (H, W); only True pixels count. Empty mask → ValueError.
    """
    return float(np.square(_diff(a, b, mask)).mean())


def _mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def temporal_metrics(
    frames: Sequence[np.ndarray] | np.ndarray,
    person_masks: Sequence[np.ndarray] | np.ndarray | None = None,
) -> dict[str, float]:
    """Frame L1/MSE of a video averaged over its adjacent pairs, whole frame and per region.

    Args:
        frames: T >= 2 frames, each (H, W, 3) uint8 RGB (a list or a (T, H, W, 3) array).
        person_masks: optional T bool (H, W) person masks (True = person), aligned with frames.

    Returns:
        ``{"frame_l1", "frame_mse"}``, plus with masks ``"frame_l1_body"``, ``"frame_mse_body"``,
        ``"frame_l1_background"``, ``"frame_mse_background"``. A pair whose region is empty
        (no person in either frame, or person everywhere) is skipped for that region; a region
        with no usable pair is NaN.
    """
    if len(frames) < 2:
        raise ValueError(f"temporal metrics need at least 2 frames, got {len(frames)}")
    pairs = adjacent_pairs(frames)
    out = {
        "frame_l1": _mean_or_nan([frame_l1(a, b) for a, b in pairs]),
        "frame_mse": _mean_or_nan([frame_mse(a, b) for a, b in pairs]),
    }
    if person_masks is None:
        return out
    if len(person_masks) != len(frames):
        raise ValueError(f"got {len(person_masks)} person masks for {len(frames)} frames")
    regions: dict[str, tuple[list[float], list[float]]] = {"body": ([], []), "background": ([], [])}
    for (a, b), (ma, mb) in zip(pairs, adjacent_pairs(person_masks), strict=True):
        body = np.asarray(ma, bool) | np.asarray(mb, bool)
        for name, region in (("body", body), ("background", ~body)):
            if region.any():
                regions[name][0].append(frame_l1(a, b, region))
                regions[name][1].append(frame_mse(a, b, region))
    for name, (l1s, mses) in regions.items():
        out[f"frame_l1_{name}"] = _mean_or_nan(l1s)
        out[f"frame_mse_{name}"] = _mean_or_nan(mses)
    return out
