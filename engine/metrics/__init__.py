"""Evaluation metrics of the Dancing Avatar paper (arXiv 2308.07749), all offline.

* Image quality, no reference (lower is better): :func:`niqe` (whole frame),
  :func:`background_niqe` / :func:`masked_niqe` (blocks outside the person), body NIQE as
  ``niqe(crop_to_mask(frame, person_mask))``; :func:`brisque` (OpenCV, LIVE model).
* Temporal consistency: :func:`frame_l1`, :func:`frame_mse`, :func:`temporal_metrics`.
* CLIP: :class:`ClipScorer` (text alignment, frame consistency), :func:`tiny_clip`,
  :func:`load_clip`, :func:`body_image`, :func:`background_image`, :func:`masked_image`.

The CLIP names are imported lazily (they pull in transformers); the model/parameter files live in
``engine/metrics/data`` (provenance and licences in ``data/NOTICE.md``).
"""

from __future__ import annotations

import importlib
from typing import Any

from engine.metrics.brisque import brisque
from engine.metrics.niqe import (
    NIQE_MIN_BLOCKS,
    NIQE_MIN_SIDE,
    background_niqe,
    bbox_from_mask,
    crop_to_mask,
    masked_niqe,
    niqe,
)
from engine.metrics.temporal import adjacent_pairs, frame_l1, frame_mse, temporal_metrics

_CLIP_NAMES = (
    "ClipScorer",
    "background_image",
    "body_image",
    "load_clip",
    "masked_image",
    "tiny_clip",
)

__all__ = [
    "NIQE_MIN_BLOCKS",
    "NIQE_MIN_SIDE",
    "adjacent_pairs",
    "background_niqe",
    "bbox_from_mask",
    "brisque",
    "crop_to_mask",
    "frame_l1",
    "frame_mse",
    "masked_niqe",
    "niqe",
    "temporal_metrics",
    *_CLIP_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _CLIP_NAMES:
        return getattr(importlib.import_module("engine.metrics.clip_score"), name)
    raise AttributeError(f"module 'engine.metrics' has no attribute {name!r}")
