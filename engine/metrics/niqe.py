"""NIQE (Natural Image Quality Evaluator), a no-reference image quality score: lower is better.

Mittal, Soundararajan & Bovik, "Making a 'Completely Blind' Image Quality Analyzer", IEEE SPL 2013.
This is a NumPy port of basicsr 1.4.2 ``basicsr/metrics/niqe.py`` (``calculate_niqe`` with
``convert_to='y'``, ``input_order='HWC'``), which reproduces the official MATLAB release, and it
uses the official pristine model parameters shipped in ``data/niqe_pris_params.npz``.

Conventions (identical to basicsr):

* Input: ``uint8`` RGB ``(H, W, 3)`` in 0..255, or ``uint8`` ``(H, W)`` taken as the luminance
  itself (no conversion). Colour images are reduced to the Y channel of YCbCr, ITU-R BT.601
  "studio swing" as MATLAB's ``rgb2ycbcr``: ``Y = 16 + (65.481 R + 128.553 G + 24.966 B)`` with
  R, G, B in 0..1, so Y lies in 16..235; Y is then rounded to integers (as in basicsr/MATLAB).
* ``crop_border`` pixels are removed from every edge before anything else.
* The image is cut to whole 96×96 blocks from the top-left corner (the remainder on the right and
  bottom is ignored); blocks do not overlap.
* Two scales: full resolution and MATLAB ``imresize(img, 0.5)`` (bicubic, antialiased,
  symmetric borders) ported exactly below — ``cv2.resize``/PIL give different numbers.
* Per scale: MSCN coefficients with the 7×7 Gaussian window (``mode='nearest'`` borders,
  ``sigma + 1`` in the denominator); per block 18 AGGD/GGD features → 36 per block.
* Score: ``sqrt((mu_p - mu_d) pinv((cov_p + cov_d) / 2) (mu_p - mu_d)^T)`` with ``mu_d`` the
  NaN-ignoring mean of the block features and ``cov_d`` their covariance over NaN-free blocks
  (flat blocks give NaN features).

Minimum size: the covariance needs at least :data:`NIQE_MIN_BLOCKS` = 2 whole 96×96 blocks (e.g.
96×192; at scale 2 they are 2 blocks of 48×48). That minimum is well defined but statistically
weak; :func:`crop_to_mask` therefore pads crops to :data:`NIQE_MIN_SIDE` = 192 per side
(≥ 4 blocks).

Precision: everything runs in float64 (as MATLAB does); basicsr works in float32. The results agree
to ~1e-5 relative on ordinary photos, but an image with large exactly-flat areas (e.g. the black
areas of ``skimage.data.astronaut``) gets MSCN coefficients there that are pure rounding noise, and
their AGGD features depend on the precision: 3.1005 here vs 3.0649 from basicsr for astronaut.
Given the same float64 input and resize, basicsr's code reproduces our value to 1e-12. The resize
is an explicit tap loop (no BLAS), so results do not depend on the BLAS library or thread count.
"""

from __future__ import annotations

import functools
import importlib.resources
import math

import numpy as np
from scipy.ndimage import convolve
from scipy.special import gamma

BLOCK = 96
NIQE_MIN_BLOCKS = 2
NIQE_MIN_SIDE = 2 * BLOCK
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


@functools.lru_cache(maxsize=1)
def pristine_params() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official pristine model: ``mu`` (1, 36), ``cov`` (36, 36) and the 7×7 window, float64."""
    ref = importlib.resources.files("engine.metrics") / "data" / "niqe_pris_params.npz"
    with ref.open("rb") as fh, np.load(fh) as npz:
        return (
            np.asarray(npz["mu_pris_param"], np.float64),
            np.asarray(npz["cov_pris_param"], np.float64),
            np.asarray(npz["gaussian_window"], np.float64),
        )


def to_y_channel(img: np.ndarray) -> np.ndarray:
    """Luminance used by NIQE, float64 (H, W), integer-valued, 16..235 for RGB, 0..255 for gray.

    Args:
        img: uint8 RGB (H, W, 3), or uint8 gray (H, W) / (H, W, 1), returned as is (float64).
    """
    if img.dtype != np.uint8:
        raise TypeError(
            f"NIQE expects a uint8 image in 0..255, got dtype {img.dtype}; convert with "
            "np.clip(x * 255, 0, 255).round().astype(np.uint8) for 0..1 floats"
        )
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        return img.astype(np.float64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"NIQE expects (H, W, 3) RGB or (H, W) gray, got shape {img.shape}")
    # Same float32/float64 sequence as basicsr's to_y_channel(bgr2ycbcr(y_only=True)).
    x = img.astype(np.float32) / 255.0
    y = np.dot(x, [65.481, 128.553, 24.966]) + 16.0
    y = (y / 255.0).astype(np.float32) * 255.0
    return np.round(y).astype(np.float64)


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    near = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return near + far


def _resize_taps(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based source indices, both (out_len, taps), of MATLAB's bicubic imresize."""
    kernel_width = 4.0 / scale if scale < 1 else 4.0  # antialiasing widens the kernel
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # 1-based input coordinate of each output pixel
    left = np.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    dist = u[:, None] - idx
    w = scale * _cubic(dist * scale) if scale < 1 else _cubic(dist)
    w /= w.sum(axis=1, keepdims=True)
    i0 = (idx - 1).astype(np.int64)  # 0-based; symmetric (edge-repeating) reflection
    i0 = np.where(i0 < 0, -i0 - 1, i0)
    i0 = np.where(i0 >= in_len, 2 * in_len - 1 - i0, i0)
    return w, i0


def _resize_axis0(img: np.ndarray, out_len: int, scale: float) -> np.ndarray:
    w, idx = _resize_taps(img.shape[0], out_len, scale)
    out = np.zeros((out_len, *img.shape[1:]))
    # Explicit tap loop (no BLAS): results do not depend on the BLAS library or thread count.
    for k in range(w.shape[1]):
        out += w[:, k, None] * img[idx[:, k]]
    return out


def imresize_matlab(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(img, scale)`` (bicubic, antialiasing) of a 2-D float image, no rounding.

    Output size is ``ceil(H * scale), ceil(W * scale)``; float64 out, same value range as in.
    Rows are resized first, then columns, as in basicsr's port.
    """
    h, w = img.shape
    rows = _resize_axis0(np.asarray(img, np.float64), math.ceil(h * scale), scale)
    return _resize_axis0(rows.T, math.ceil(w * scale), scale).T


@functools.lru_cache(maxsize=1)
def _gamma_table() -> tuple[np.ndarray, np.ndarray]:
    gam = np.arange(0.2, 10.001, 0.001)
    r_gam = np.square(gamma(2 / gam)) / (gamma(1 / gam) * gamma(3 / gam))
    return gam, r_gam


def _aggd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AGGD (alpha, beta_l, beta_r) per block of x (n, h, w), as basicsr ``estimate_aggd_param``."""
    x = x.reshape(x.shape[0], -1)
    gam, r_gam = _gamma_table()
    with np.errstate(invalid="ignore", divide="ignore"):
        sq = x**2
        left_std = np.sqrt((sq * (x < 0)).sum(1) / (x < 0).sum(1))
        right_std = np.sqrt((sq * (x > 0)).sum(1) / (x > 0).sum(1))
        gammahat = left_std / right_std
        rhat = np.abs(x).mean(1) ** 2 / sq.mean(1)
        rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / (gammahat**2 + 1) ** 2
        # NaN rows give argmin 0 (alpha = 0.2), exactly as np.argmin does in basicsr.
        alpha = gam[np.argmin((r_gam[None, :] - rhatnorm[:, None]) ** 2, axis=1)]
        ratio = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, left_std * ratio, right_std * ratio


def _block_features(blocks: np.ndarray) -> np.ndarray:
    """18 features per MSCN block: blocks (n, h, w) float64 → (n, 18)."""
    alpha, bl, br = _aggd(blocks)
    feats = [alpha, (bl + br) / 2]
    for shift in _SHIFTS:
        prod = blocks * np.roll(blocks, shift, axis=(1, 2))
        alpha, bl, br = _aggd(prod)
        mean = (br - bl) * (gamma(2 / alpha) / gamma(1 / alpha))
        feats += [alpha, mean, bl, br]
    return np.stack(feats, axis=1)


def _mscn(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    mu = convolve(img, window, mode="nearest")
    sigma = np.sqrt(np.abs(convolve(np.square(img), window, mode="nearest") - np.square(mu)))
    return (img - mu) / (sigma + 1)


def _to_blocks(img: np.ndarray, size: int) -> np.ndarray:
    """(nh*size, nw*size) → (nh*nw, size, size), raster (row-major) block order."""
    nh, nw = img.shape[0] // size, img.shape[1] // size
    return img.reshape(nh, size, nw, size).transpose(0, 2, 1, 3).reshape(nh * nw, size, size)


def niqe_features(y: np.ndarray) -> np.ndarray:
    """Per-block NIQE features of a luminance image.

    Args:
        y: float (H, W) luminance in 0..255 (see :func:`to_y_channel`), at least 96×96.

    Returns:
        float64 (nh * nw, 36), one row per whole 96×96 block in row-major order; may hold NaN.
    """
    nh, nw = y.shape[0] // BLOCK, y.shape[1] // BLOCK
    if nh * nw == 0:
        raise ValueError(f"NIQE needs an image of at least {BLOCK}x{BLOCK}, got {y.shape}")
    _, _, window = pristine_params()
    img = np.asarray(y, np.float64)[: nh * BLOCK, : nw * BLOCK]
    scale1 = _block_features(_to_blocks(_mscn(img, window), BLOCK))
    half = imresize_matlab(img / 255.0, 0.5) * 255.0
    scale2 = _block_features(_to_blocks(_mscn(half, window), BLOCK // 2))
    return np.concatenate([scale1, scale2], axis=1)


def niqe_from_features(feats: np.ndarray) -> float:
    """NIQE distance of block features (n, 36) to the pristine model (NaN-robust)."""
    mu_p, cov_p, _ = pristine_params()
    valid = feats[~np.isnan(feats).any(axis=1)]
    if len(valid) < NIQE_MIN_BLOCKS:
        raise ValueError(
            f"NIQE needs at least {NIQE_MIN_BLOCKS} 96x96 blocks with finite features, got "
            f"{len(valid)} of {len(feats)} (flat or too small image); use a larger image or region"
        )
    mu_d = np.nanmean(feats, axis=0)
    cov_d = np.cov(valid, rowvar=False)
    diff = mu_p[0] - mu_d
    quality = diff @ np.linalg.pinv((cov_p + cov_d) / 2) @ diff
    return float(np.sqrt(quality))


def _prepare(img: np.ndarray, crop_border: int) -> np.ndarray:
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    y = to_y_channel(img)
    if crop_border:
        y = y[crop_border:-crop_border, crop_border:-crop_border]
    n_blocks = (y.shape[0] // BLOCK) * (y.shape[1] // BLOCK)
    if n_blocks < NIQE_MIN_BLOCKS:
        raise ValueError(
            f"NIQE needs at least {NIQE_MIN_BLOCKS} whole {BLOCK}x{BLOCK} blocks (e.g. 96x192), "
            f"got a {y.shape[0]}x{y.shape[1]} image after crop_border={crop_border}; "
            f"pad it with crop_to_mask(..., min_size={NIQE_MIN_SIDE}) or use a larger image"
        )
    return y


def niqe(img: np.ndarray, *, crop_border: int = 0) -> float:
    """NIQE of a whole image (lower = more natural; typical photos 2..6).

    Args:
        img: uint8 RGB (H, W, 3) or gray (H, W), 0..255, at least 2 whole 96×96 blocks.
        crop_border: pixels removed from each edge first.
    """
    return niqe_from_features(niqe_features(_prepare(img, crop_border)))


def masked_niqe(
    img: np.ndarray, mask: np.ndarray, *, min_coverage: float = 0.9, crop_border: int = 0
) -> float:
    """NIQE over the 96×96 blocks that lie (mostly) inside ``mask`` — e.g. Background NIQE.

    Masked-out pixels are not filled or inpainted (that would score the filling): MSCN features
    are computed on the whole image as usual, and only blocks whose fraction of ``mask`` pixels is
    ``>= min_coverage`` enter the mean/covariance. Blocks with a few masked-out pixels (at most
    ``1 - min_coverage``) are kept, so edges of the excluded region leak in slightly.

    Args:
        img: uint8 RGB (H, W, 3) or gray (H, W).
        mask: bool (H, W), True = pixels to evaluate (for Background NIQE pass ``~person_mask``).
        min_coverage: in (0, 1], the minimum fraction of True pixels for a block to count.
        crop_border: pixels removed from each edge of image and mask first.

    Raises:
        ValueError: fewer than 2 blocks qualify (lower ``min_coverage`` or use full-image NIQE).
    """
    m = np.asarray(mask, bool)
    if m.shape != img.shape[:2]:
        raise ValueError(f"mask shape {m.shape} must equal image shape {img.shape[:2]}")
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    y = _prepare(img, crop_border)
    if crop_border:
        m = m[crop_border:-crop_border, crop_border:-crop_border]
    nh, nw = y.shape[0] // BLOCK, y.shape[1] // BLOCK
    coverage = _to_blocks(m[: nh * BLOCK, : nw * BLOCK].astype(np.float64), BLOCK).mean((1, 2))
    keep = coverage >= min_coverage
    if keep.sum() < NIQE_MIN_BLOCKS:
        raise ValueError(
            f"masked NIQE needs at least {NIQE_MIN_BLOCKS} 96x96 blocks with mask coverage >= "
            f"{min_coverage}, got {int(keep.sum())} of {nh * nw}; lower min_coverage or use niqe()"
        )
    return niqe_from_features(niqe_features(y)[keep])


def background_niqe(
    img: np.ndarray, person_mask: np.ndarray, *, min_coverage: float = 0.9
) -> float:
    """Background NIQE: :func:`masked_niqe` on the complement of the person mask (bool (H, W))."""
    return masked_niqe(img, ~np.asarray(person_mask, bool), min_coverage=min_coverage)


def bbox_from_mask(mask: np.ndarray, pad: int = 0) -> tuple[int, int, int, int]:
    """Tight box ``(y0, x0, y1, x1)`` (half-open) around True pixels, grown by ``pad``, clamped.

    Raises:
        ValueError: the mask is empty (no True pixel) or not 2-D.
    """
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        raise ValueError(f"mask of shape {m.shape} is empty: no person pixels to box")
    h, w = m.shape
    return (
        max(int(rows[0]) - pad, 0),
        max(int(cols[0]) - pad, 0),
        min(int(rows[-1]) + 1 + pad, h),
        min(int(cols[-1]) + 1 + pad, w),
    )


def crop_to_mask(
    img: np.ndarray, mask: np.ndarray, *, pad: int = 0, min_size: int = NIQE_MIN_SIDE
) -> np.ndarray:
    """Crop ``img`` to the mask's bounding box (Body NIQE input), padded up to ``min_size``.

    The box is clamped to the image. A crop side shorter than ``min_size`` is extended by
    symmetric reflection of the crop itself (``np.pad(mode='symmetric')``, centred), so no
    pixels from outside the box are used; the default 192 gives ≥ 4 whole NIQE blocks. Crops
    much smaller than that are mostly mirrored copies, and their NIQE is unreliable (a crop of
    one pixel becomes flat and :func:`niqe` raises).

    Args:
        img: (H, W, C) or (H, W) array, any dtype.
        mask: bool (H, W), True = person.
        pad: margin in pixels added around the tight box before clamping.
        min_size: minimum height and width of the result.

    Returns:
        array of the same dtype, (max(h, min_size), max(w, min_size)[, C]).
    """
    if np.shape(mask) != img.shape[:2]:
        raise ValueError(f"mask shape {np.shape(mask)} must equal image shape {img.shape[:2]}")
    y0, x0, y1, x1 = bbox_from_mask(mask, pad)
    crop = img[y0:y1, x0:x1]
    need_h, need_w = max(min_size - crop.shape[0], 0), max(min_size - crop.shape[1], 0)
    if need_h or need_w:
        widths = [(need_h // 2, need_h - need_h // 2), (need_w // 2, need_w - need_w // 2)]
        widths += [(0, 0)] * (crop.ndim - 2)
        crop = np.pad(crop, widths, mode="symmetric")
    return np.ascontiguousarray(crop)
