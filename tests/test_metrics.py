"""Correctness tests of engine.metrics on fixed photos (no generated content, no network)."""

from __future__ import annotations

import importlib
import importlib.resources

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from engine.metrics import (
    NIQE_MIN_SIDE,
    adjacent_pairs,
    background_niqe,
    bbox_from_mask,
    brisque,
    crop_to_mask,
    frame_l1,
    frame_mse,
    masked_niqe,
    niqe,
    temporal_metrics,
)
from engine.metrics.niqe import imresize_matlab, pristine_params

NOISE_SIGMAS = (0, 5, 15, 30)
BLUR_SIGMAS = (0, 1, 2, 4)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()  # (512, 512, 3) uint8 RGB


@pytest.fixture(scope="module")
def person_mask() -> np.ndarray:
    m = np.zeros((512, 512), bool)
    m[60:512, 150:340] = True  # a tall "person" touching the bottom edge
    return m


def _noisy(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return img
    noise = np.random.default_rng(0).normal(0.0, sigma, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _blurred(img: np.ndarray, sigma: float) -> np.ndarray:
    return img if sigma == 0 else cv2.GaussianBlur(img, (0, 0), sigma)


# ---------------------------------------------------------------- data files


def test_data_files_are_package_resources() -> None:
    root = importlib.resources.files("engine.metrics") / "data"
    for name in ("niqe_pris_params.npz", "brisque_model_live.yml", "brisque_range_live.yml"):
        assert (root / name).is_file(), name
    assert "Apache" in (root / "NOTICE.md").read_text(encoding="utf-8")
    mu, cov, window = pristine_params()
    assert mu.shape == (1, 36) and cov.shape == (36, 36) and window.shape == (7, 7)
    assert np.isclose(window.sum(), 1.0)


# ---------------------------------------------------------------- NIQE


def test_niqe_regression_astronaut(astronaut: np.ndarray) -> None:
    # Cross-checked against basicsr 1.4.2 calculate_niqe (its niqe.py + matlab_functions.imresize
    # run unchanged): fed our float64 Y and float64 imresize it gives 3.10045153318 (equal to
    # 1e-12). basicsr as shipped gives 3.0649 (1.2 % lower) because it works in float32: in the
    # flat saturated-black areas of this photo the scale-2 MSCN coefficients are pure rounding
    # noise, whose AGGD features depend on the precision (feeding basicsr float64 Y alone already
    # moves it to 3.0916). We compute in float64 like the MATLAB original.
    assert niqe(astronaut) == pytest.approx(3.1004515, abs=1e-4)


def test_niqe_matches_basicsr_on_photo_without_flat_regions() -> None:
    # basicsr 1.4.2 calculate_niqe(bgr, crop_border=0) on skimage coffee: 4.115241615 (float32);
    # ours (float64) 4.115331588, relative difference 2.2e-5.
    assert niqe(data.coffee()) == pytest.approx(4.115241615, rel=1e-4)
    # Gray input is used as luminance directly (basicsr input_order='HW'): 3.096206619.
    assert niqe(data.camera()) == pytest.approx(3.096206619, rel=1e-4)


def test_imresize_matlab_shapes_and_constants() -> None:
    img = np.full((97, 50), 7.25)
    out = imresize_matlab(img, 0.5)
    assert out.shape == (49, 25)
    np.testing.assert_allclose(out, 7.25, rtol=1e-12)
    ramp = np.tile(np.arange(64, dtype=np.float64), (8, 1))
    # Interior of a linear ramp stays linear (cubic kernel reproduces linear functions).
    np.testing.assert_allclose(np.diff(imresize_matlab(ramp, 0.5)[:, 4:-4], axis=1), 2.0)


@pytest.mark.parametrize("degrade, levels", [(_noisy, NOISE_SIGMAS), (_blurred, BLUR_SIGMAS)])
def test_niqe_rises_with_degradation(astronaut: np.ndarray, degrade, levels) -> None:
    scores = [niqe(degrade(astronaut, s)) for s in levels]
    assert all(np.diff(scores) > 0.5), scores


def test_niqe_input_errors(astronaut: np.ndarray) -> None:
    with pytest.raises(TypeError, match="uint8"):
        niqe(astronaut.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="at least 2 whole 96x96 blocks"):
        niqe(astronaut[:96, :150])
    assert np.isfinite(niqe(astronaut[:96, :192]))  # the documented minimum
    assert niqe(astronaut, crop_border=4) != niqe(astronaut)


def test_masked_niqe(astronaut: np.ndarray, person_mask: np.ndarray) -> None:
    full = np.ones(person_mask.shape, bool)
    assert masked_niqe(astronaut, full) == pytest.approx(niqe(astronaut), rel=1e-12)
    bg = background_niqe(astronaut, person_mask)
    assert bg == pytest.approx(masked_niqe(astronaut, ~person_mask))
    assert np.isfinite(bg) and bg != pytest.approx(niqe(astronaut))
    # The background NIQE ignores the person: changing person pixels leaves it unchanged when
    # no kept block overlaps the person (min_coverage=1.0 keeps only pure-background blocks).
    scrambled = astronaut.copy()
    scrambled[person_mask] = _noisy(astronaut, 40)[person_mask]
    assert masked_niqe(scrambled, ~person_mask, min_coverage=1.0) == pytest.approx(
        masked_niqe(astronaut, ~person_mask, min_coverage=1.0), abs=0.2
    )
    with pytest.raises(ValueError, match="mask coverage"):
        masked_niqe(astronaut, np.zeros_like(person_mask))
    with pytest.raises(ValueError, match="mask shape"):
        masked_niqe(astronaut, person_mask[:100])


def test_bbox_from_mask_at_borders() -> None:
    m = np.zeros((100, 80), bool)
    m[0, 0] = m[99, 79] = True
    assert bbox_from_mask(m) == (0, 0, 100, 80)
    m = np.zeros((100, 80), bool)
    m[95:, 70:] = True
    assert bbox_from_mask(m, pad=10) == (85, 60, 100, 80)  # clamped at the far edges
    with pytest.raises(ValueError, match="empty"):
        bbox_from_mask(np.zeros((10, 10), bool))


def test_crop_to_mask_pads_small_and_border_crops(astronaut: np.ndarray) -> None:
    tiny = np.zeros((512, 512), bool)
    tiny[0:20, 500:512] = True  # touches the top and right edges
    crop = crop_to_mask(astronaut, tiny)
    assert crop.shape == (NIQE_MIN_SIDE, NIQE_MIN_SIDE, 3) and crop.dtype == np.uint8
    # The original pixels sit in the centre of the reflected padding.
    top, left = (NIQE_MIN_SIDE - 20) // 2, (NIQE_MIN_SIDE - 12) // 2
    np.testing.assert_array_equal(crop[top : top + 20, left : left + 12], astronaut[0:20, 500:512])
    assert np.isfinite(niqe(crop))
    big = np.zeros((512, 512), bool)
    big[10:500, 20:300] = True
    assert crop_to_mask(astronaut, big, pad=30).shape == (512, 330, 3)  # top clamped at 0
    one = np.zeros((512, 512), bool)
    one[200, 300] = True
    with pytest.raises(ValueError, match="finite features"):
        niqe(crop_to_mask(astronaut, one))  # a single pixel reflects into a flat image
    with pytest.raises(ValueError, match="empty"):
        crop_to_mask(astronaut, np.zeros((512, 512), bool))


# ---------------------------------------------------------------- BRISQUE


@pytest.mark.parametrize("degrade, levels", [(_noisy, NOISE_SIGMAS), (_blurred, BLUR_SIGMAS)])
def test_brisque_rises_with_degradation(astronaut: np.ndarray, degrade, levels) -> None:
    scores = [brisque(degrade(astronaut, s)) for s in levels]
    assert all(np.diff(scores) > 1.0), scores


def test_brisque_gray_equals_rgb(astronaut: np.ndarray) -> None:
    gray = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    assert brisque(gray) == pytest.approx(brisque(astronaut))
    with pytest.raises(TypeError, match="uint8"):
        brisque(astronaut.astype(np.float64))


def test_brisque_without_contrib_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # engine.metrics.brisque is shadowed by the re-exported function; fetch the module itself.
    brisque_mod = importlib.import_module("engine.metrics.brisque")
    monkeypatch.delattr(cv2, "quality")
    with pytest.raises(ImportError, match="opencv-contrib-python-headless"):
        brisque_mod._quality_module()


# ---------------------------------------------------------------- temporal


def test_frame_differences(astronaut: np.ndarray, person_mask: np.ndarray) -> None:
    assert frame_l1(astronaut, astronaut.copy()) == 0.0
    assert frame_mse(astronaut, astronaut.copy(), person_mask) == 0.0
    a = np.zeros((4, 6, 3), np.uint8)
    b = a.copy()
    b[:2] = 10  # top half differs by 10 in every channel
    top = np.zeros((4, 6), bool)
    top[:2] = True
    assert frame_l1(a, b) == pytest.approx(5.0) and frame_mse(a, b) == pytest.approx(50.0)
    assert frame_l1(a, b, top) == pytest.approx(10.0) and frame_mse(a, b, top) == 100.0
    assert frame_l1(b, a, ~top) == 0.0
    assert frame_l1(np.full((2, 2), 255, np.uint8), np.zeros((2, 2), np.uint8)) == 255.0
    with pytest.raises(ValueError, match="empty"):
        frame_l1(a, b, np.zeros((4, 6), bool))
    with pytest.raises(ValueError, match="same shape"):
        frame_l1(a, b[:3])


def test_temporal_metrics(astronaut: np.ndarray, person_mask: np.ndarray) -> None:
    assert adjacent_pairs([1, 2, 3]) == [(1, 2), (2, 3)]
    still = temporal_metrics([astronaut] * 3, [person_mask] * 3)
    assert set(still) == {
        "frame_l1",
        "frame_mse",
        "frame_l1_body",
        "frame_mse_body",
        "frame_l1_background",
        "frame_mse_background",
    }
    assert all(v == 0.0 for v in still.values())
    moved = astronaut.copy()
    moved[person_mask] = 255 - moved[person_mask]  # only the person changes
    scores = temporal_metrics(np.stack([astronaut, moved]), np.stack([person_mask] * 2))
    assert scores["frame_l1_background"] == 0.0 and scores["frame_l1_body"] > 0
    assert scores["frame_l1"] == pytest.approx(scores["frame_l1_body"] * person_mask.mean())
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_metrics([astronaut])


# ---------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def scorer():
    from engine.metrics.clip_score import tiny_clip

    return tiny_clip(seed=0)


def test_clip_consistency_of_identical_frames(scorer, astronaut: np.ndarray) -> None:
    cons = scorer.consistency([astronaut, astronaut.copy(), astronaut])
    assert cons.shape == (2,)
    torch.testing.assert_close(cons, torch.full((2,), 100.0), atol=1e-3, rtol=0)
    other = scorer.consistency([astronaut, data.coffee()])
    assert other.item() < 100.0 - 1e-3


def test_clip_text_alignment_and_embeddings(scorer, astronaut: np.ndarray) -> None:
    frames = np.stack([astronaut, _blurred(astronaut, 3), _noisy(astronaut, 30)])  # (3,H,W,3)
    scores = scorer.text_alignment(frames, "a woman dancing on the beach, high quality")
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and (scores.abs() <= 100.0 + 1e-4).all()
    emb = scorer.image_embeddings(list(frames))
    assert emb.shape == (3, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    scorer.batch_size = 2  # batching must not change the result
    try:
        torch.testing.assert_close(scorer.image_embeddings(frames), emb, atol=1e-5, rtol=0)
    finally:
        scorer.batch_size = 32
    from engine.metrics.clip_score import tiny_clip

    torch.testing.assert_close(tiny_clip(seed=0).image_embeddings(frames), emb)


def test_clip_preprocess_sizes() -> None:
    from engine.metrics.clip_score import preprocess

    imgs = [np.zeros((40, 100, 3), np.uint8), np.full((90, 33), 255, np.uint8)]
    x = preprocess(imgs, 32)
    assert x.shape == (2, 3, 32, 32)
    mean, std = (
        torch.tensor([0.48145466, 0.4578275, 0.40821073]),
        torch.tensor([0.26862954, 0.26130258, 0.27577711]),
    )
    torch.testing.assert_close(x[0, :, 5, 5], -mean / std)
    torch.testing.assert_close(x[1, :, 5, 5], (1 - mean) / std)


def test_clip_body_and_background_variants(scorer, astronaut, person_mask) -> None:
    from engine.metrics.clip_score import background_image, body_image, masked_image

    body = body_image(astronaut, person_mask, pad=8)
    assert body.shape == (512 - 52, 190 + 16, 3)  # clamped at the bottom edge
    bg = background_image(astronaut, person_mask)
    expected = np.round(astronaut[~person_mask].mean(axis=0)).astype(np.uint8)
    assert (bg[person_mask] == expected).all()
    np.testing.assert_array_equal(bg[~person_mask], astronaut[~person_mask])
    assert (masked_image(astronaut, person_mask, "grey")[person_mask] == 128).all()
    assert (masked_image(astronaut, np.ones_like(person_mask))[0, 0] == 128).all()
    with pytest.raises(ValueError, match="fill"):
        masked_image(astronaut, person_mask, "black")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        body_image(astronaut, np.zeros_like(person_mask))
    scores = scorer.consistency([body, body.copy()])
    torch.testing.assert_close(scores, torch.tensor([100.0]), atol=1e-3, rtol=0)
