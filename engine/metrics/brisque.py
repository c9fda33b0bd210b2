"""BRISQUE no-reference image quality: lower is better, on a nominal 0..100 scale.

Mittal, Moorthy & Bovik, "No-Reference Image Quality Assessment in the Spatial Domain", IEEE TIP
2012. Computed with OpenCV contrib's ``cv2.quality.QualityBRISQUE`` and its SVR model trained on
the LIVE database (``data/brisque_model_live.yml``, ``data/brisque_range_live.yml``, OpenCV sample
files, Apache-2.0). OpenCV converts the image to 8-bit grayscale itself (``BGR2GRAY``), so the RGB
input is reordered to BGR first; the score is the first element of the returned ``cv::Scalar``.
Very clean images can score exactly 0.0 (observed: the output is floored at 0), so near 0 the score
saturates and stops ranking images.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
from typing import Any

import numpy as np

_MODEL = "brisque_model_live.yml"
_RANGE = "brisque_range_live.yml"


def _quality_module() -> Any:
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - cv2 is a hard dependency
        raise ImportError(
            "BRISQUE needs OpenCV with the contrib 'quality' module: "
            "pip install opencv-contrib-python-headless"
        ) from exc
    quality = getattr(cv2, "quality", None)
    if quality is None or not hasattr(quality, "QualityBRISQUE_create"):
        raise ImportError(
            f"cv2 {cv2.__version__} has no cv2.quality.QualityBRISQUE (the contrib modules are "
            "missing). Install opencv-contrib-python-headless and uninstall any other OpenCV "
            "distribution (opencv-python, opencv-python-headless, opencv-contrib-python): only one "
            "may be installed, as they share the cv2 package"
        )
    return quality


@functools.lru_cache(maxsize=1)
def _brisque_model() -> Any:
    """The ``QualityBRISQUE`` object, loaded once (the model file is ~0.5 MB of YAML)."""
    quality = _quality_module()
    data = importlib.resources.files("engine.metrics") / "data"
    with contextlib.ExitStack() as stack:  # as_file: also works from a zipped install
        model = stack.enter_context(importlib.resources.as_file(data / _MODEL))
        rng = stack.enter_context(importlib.resources.as_file(data / _RANGE))
        return quality.QualityBRISQUE_create(str(model), str(rng))


def brisque(img: np.ndarray) -> float:
    """BRISQUE score of one image (lower = better; pristine photos ~0..30, heavy noise → 60+).

    Args:
        img: uint8 RGB (H, W, 3) or gray (H, W), 0..255.

    Returns:
        the score as a float, nominally 0..100.
    """
    if img.dtype != np.uint8:
        raise TypeError(
            f"BRISQUE expects a uint8 image in 0..255, got dtype {img.dtype}; convert with "
            "np.clip(x * 255, 0, 255).round().astype(np.uint8) for 0..1 floats"
        )
    if img.ndim == 3 and img.shape[2] == 3:
        img = np.ascontiguousarray(img[..., ::-1])  # RGB → BGR, OpenCV's channel order
    elif img.ndim != 2:
        raise ValueError(f"BRISQUE expects (H, W, 3) RGB or (H, W) gray, got shape {img.shape}")
    return float(_brisque_model().compute(img)[0])
