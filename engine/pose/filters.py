"""Clean up per-frame pose estimates: One-Euro smoothing over time and filling short gaps.

Both work on keypoints ``(F, 18, 3)`` float ``(x_px, y_px, confidence)``; confidence 0 = missing.
"""

from __future__ import annotations

import math

import numpy as np


def _alpha(cutoff: np.ndarray | float, fps: float) -> np.ndarray:
    """Smoothing factor of a first-order low-pass at ``cutoff`` Hz sampled at ``fps``."""
    tau = 1.0 / (2.0 * math.pi * np.asarray(cutoff, np.float64))
    return 1.0 / (1.0 + tau * fps)


def one_euro(
    keypoints: np.ndarray,
    fps: float,
    *,
    min_cutoff: float,
    beta: float,
    d_cutoff: float = 1.0,
    scale: float = 1.0,
) -> np.ndarray:
    """One-Euro filter (Casiez, Roussel, Vogel, CHI 2012) on every joint's x and y over time.

    Per coordinate: the speed estimate is low-passed at ``d_cutoff`` Hz, and the position is
    low-passed at ``min_cutoff + beta * |speed|`` Hz, so a still joint is smoothed hard (jitter
    removed) and a fast one lightly (little lag). Speeds are measured in ``scale`` units per
    second (pass the frame's larger side so ``beta`` does not depend on the resolution). A joint
    missing in a frame (confidence 0) restarts its filter at the next frame where it is present.

    Args:
        keypoints: ``(F, 18, 3)`` float; only x and y are filtered, confidence is kept.
        fps: frame rate (> 0).
        min_cutoff: cutoff in Hz for a still joint (> 0); lower = smoother.
        beta: speed coefficient (>= 0); higher = less lag on fast moves.
        d_cutoff: cutoff in Hz of the speed estimate (> 0).
        scale: pixels per unit of speed.

    Returns:
        A filtered float32 copy, same shape; missing joints untouched.
    """
    kp = np.array(keypoints, np.float64, copy=True)
    if kp.shape[0] < 2:
        return kp.astype(np.float32)
    pos = kp[..., :2] / scale
    present = kp[..., 2] > 0
    a_d = _alpha(d_cutoff, fps)
    prev = pos[0].copy()
    speed = np.zeros_like(prev)
    live = present[0].copy()
    for t in range(1, len(kp)):
        here = present[t]
        restart = here & ~live
        raw_speed = (pos[t] - prev) * fps
        speed = np.where(live[:, None], a_d * raw_speed + (1 - a_d) * speed, 0.0)
        a = _alpha(min_cutoff + beta * np.abs(speed), fps)
        smooth = a * pos[t] + (1 - a) * prev
        smooth = np.where(restart[:, None], pos[t], smooth)
        prev = np.where(here[:, None], smooth, prev)
        speed = np.where(here[:, None], speed, 0.0)
        live = here
        pos[t] = np.where(here[:, None], smooth, pos[t])
    kp[..., :2] = pos * scale
    return kp.astype(np.float32)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the runs of True in a 1-D bool array (stop exclusive)."""
    padded = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def fill_gaps(
    keypoints: np.ndarray, detected: np.ndarray, max_gap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fill runs of frames where nobody was detected, when no longer than ``max_gap`` frames.

    A run between two detected frames is interpolated linearly (joints present in both
    neighbours: x, y and confidence; others copied from the nearer neighbour); a run at the start
    or end holds the nearest detected frame. Longer runs stay undetected.

    Args:
        keypoints: ``(F, 18, 3)`` float; undetected frames' content is ignored.
        detected: ``(F,)`` bool, True where a person was found.
        max_gap: the longest run (frames) that is filled; 0 fills nothing.

    Returns:
        ``(keypoints, filled)``: a float32 copy and ``(F,)`` bool, True for frames filled here.
    """
    kp = np.array(keypoints, np.float64, copy=True)
    detected = np.asarray(detected, bool)
    filled = np.zeros(len(kp), bool)
    if not detected.any():
        return kp.astype(np.float32), filled
    for start, stop in runs(~detected):
        if stop - start > max_gap:
            continue
        before, after = start - 1, stop
        for t in range(start, stop):
            if before < 0:
                kp[t] = kp[after]
            elif after >= len(kp):
                kp[t] = kp[before]
            else:
                a = (t - before) / (after - before)
                k0, k1 = kp[before], kp[after]
                both = (k0[:, 2] > 0) & (k1[:, 2] > 0)
                nearest = k0 if a < 0.5 else k1
                kp[t] = np.where(both[:, None], (1 - a) * k0 + a * k1, nearest)
            filled[t] = True
    return kp.astype(np.float32), filled
