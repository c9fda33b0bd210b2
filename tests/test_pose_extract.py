"""Poses from a driving RGB video, without MediaPipe: the skeleton/RGB detector, the pipeline
around the estimator (gaps, smoothing, letterbox, cache, CLI) with a fake estimator that finds a
bright marker. The real estimator on a photograph is in test_pose_estimator.py."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
from skimage.data import astronaut
from typer.testing import CliRunner

from engine.cli import app
from engine.pose import PoseError, load_poses, resample, synthetic_dance, write_pose_video
from engine.pose.detect import detect_kind, frame_kind
from engine.pose.extract import PoseExtractConfig
from engine.pose.filters import fill_gaps, one_euro
from engine.pose.frames import open_frames

# A fixed skeleton around the marker: (dx, dy) per COCO-18 joint from the marker centre.
TEMPLATE = np.array(
    [[0, -40], [0, -25], [-12, -25], [-18, -8], [-20, 8], [12, -25], [18, -8], [20, 8],
     [-8, 10], [-9, 28], [-10, 44], [8, 10], [9, 28], [10, 44], [-3, -43], [3, -43],
     [-6, -41], [6, -41]],
    np.float32,
)  # fmt: skip


class MarkerEstimator:
    """Fake estimator: a person wherever the frame has white pixels (the marker), else None."""

    name = "marker"

    def __init__(self) -> None:
        self.calls = 0

    def estimate(self, image: np.ndarray) -> np.ndarray | None:
        self.calls += 1
        ys, xs = np.nonzero(image.min(axis=2) > 220)
        if len(xs) == 0:
            return None
        kp = np.ones((18, 3), np.float32)
        kp[:, :2] = TEMPLATE + np.array([xs.mean(), ys.mean()])
        return kp


def _write_mp4(frames: list[np.ndarray], path: Path, fps: float = 8, crf: int = 18) -> Path:
    height, width = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
        macro_block_size=1, quality=None, output_params=["-crf", str(crf)],
        ffmpeg_log_level="error",
    )  # fmt: skip
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def _marker_frames(centres: list[tuple[int, int] | None], size=(160, 120)) -> list[np.ndarray]:
    """Grey frames (an RGB video, not a skeleton) with a 9x9 white marker at each centre."""
    frames = []
    for centre in centres:
        frame = np.full((size[1], size[0], 3), 90, np.uint8)
        frame[::7] = 60  # texture
        if centre is not None:
            x, y = centre
            frame[y - 4 : y + 5, x - 4 : x + 5] = 255
        frames.append(frame)
    return frames


def _scaled(image: np.ndarray, k: float) -> np.ndarray:
    return (image.astype(np.float32) * k).astype(np.uint8)


# ------------------------------------------------------------------ detector


@pytest.mark.parametrize("size", [64, 512])
def test_rendered_skeletons_are_detected_as_skeletons(tmp_path: Path, size: int) -> None:
    seq = synthetic_dance(frames=4, fps=8, width=size, height=size)
    for ext in (".mp4", ".gif"):
        frames = list(open_frames(write_pose_video(seq, tmp_path / f"s{ext}")).frames)
        assert [frame_kind(f) for f in frames] == ["skeleton"] * 4, ext
        assert detect_kind(iter(frames))[0].kind == "skeleton"


def test_rgb_videos_bright_and_dark_are_never_skeletons(tmp_path: Path) -> None:
    photo = astronaut()
    discs = np.zeros((128, 256, 3), np.uint8)  # 8 saturated lights on black: hues but no limbs
    for i in range(8):
        hue = np.uint8([[[i * 20, 255, 255]]])
        colour = cv2.cvtColor(hue, cv2.COLOR_HSV2RGB)[0, 0].tolist()
        cv2.circle(discs, (16 + 30 * i, 64), 10, colour, -1)
    stage = photo.copy()  # a person lit on a black stage
    stage[:, :110] = 0
    stage[:, 400:] = 0
    cases = {
        "bright": photo,
        "dark": _scaled(photo, 0.15),
        "very dark": _scaled(photo, 0.05),
        "stage": stage,
        "lights": discs,
    }
    for name, image in cases.items():
        path = _write_mp4([image, image], tmp_path / "rgb.mp4")
        frames = list(open_frames(path).frames)
        assert frame_kind(frames[0]) == "rgb", name
        assert detect_kind(iter(frames))[0].kind == "rgb", name


def test_detection_skips_black_frames_and_rejects_an_all_black_input(tmp_path: Path) -> None:
    black = np.zeros((64, 64, 3), np.uint8)
    frames = [black, black, *_marker_frames([(30, 30)] * 2, size=(64, 64))]
    detection, read = detect_kind(iter(frames))
    assert detection.kind == "rgb" and detection.votes["blank"] == 2 and len(read) == 4
    path = _write_mp4([black] * 3, tmp_path / "black.mp4")
    with pytest.raises(PoseError, match=r"black.mp4: its first 3 frames are all black.*--kind"):
        load_poses(path)


# ------------------------------------------------------------------ loading


def test_skeleton_video_is_still_decoded_as_before(tmp_path: Path) -> None:
    seq = synthetic_dance(frames=4, fps=8, width=512, height=512)
    path = write_pose_video(seq, tmp_path / "pose.mp4")
    auto = load_poses(path, estimator=MarkerEstimator())
    forced = load_poses(path, kind="skeleton")
    assert auto.info is not None and auto.info["kind"] == "skeleton" and not auto.info["forced"]
    np.testing.assert_array_equal(auto.keypoints, forced.keypoints)
    present = seq.keypoints[..., 2] > 0
    err = np.abs(auto.keypoints[..., :2] - seq.keypoints[..., :2])[present]
    assert err.max() < 2.0  # the decoder's documented accuracy


def test_rgb_video_goes_to_the_estimator_never_the_decoder(tmp_path: Path) -> None:
    path = _write_mp4([_scaled(astronaut(), 0.15)] * 3, tmp_path / "dark.mp4")
    fake = MarkerEstimator()  # no white pixels in a dark photo: nobody found
    with pytest.raises(PoseError, match=r"dark.mp4: no person detected in any of its 3 frames"):
        load_poses(path, estimator=fake, cache_dir=tmp_path)
    assert fake.calls == 3


def test_missing_pose_env_names_the_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    monkeypatch.delenv("AVATAR_POSE_PYTHON", raising=False)
    monkeypatch.setattr("engine.pose.estimate.pose_python", lambda: None)
    path = _write_mp4(_marker_frames([(50, 50)] * 2), tmp_path / "dance.mp4")
    with pytest.raises(
        PoseError, match=r"dance.mp4 is an RGB video.*make pose-env.*--kind skeleton"
    ):
        load_poses(path, cache_dir=tmp_path)


def test_marker_follows_and_short_gaps_are_interpolated(tmp_path: Path) -> None:
    centres = [(40, 50), (50, 52), None, None, (80, 58), (90, 60)]
    path = _write_mp4(_marker_frames(centres), tmp_path / "gap.mp4")
    settings = PoseExtractConfig(smoothing=False, max_gap=2)
    seq = load_poses(path, estimator=MarkerEstimator(), extraction=settings, cache_dir=tmp_path)
    assert seq.info is not None and seq.info["filled"] == [2, 3] and seq.info["empty"] == []
    assert (seq.width, seq.height, seq.fps) == (160, 120, 8.0)
    truth = [(40, 50), (50, 52), (60, 54), (70, 56), (80, 58), (90, 60)]  # gaps: linear
    for t, (x, y) in enumerate(truth):
        np.testing.assert_allclose(seq.keypoints[t, :, :2], TEMPLATE + np.array([x, y]), atol=0.6)


def test_long_gaps_are_reported_never_silent(tmp_path: Path) -> None:
    centres = [(40, 50), None, None, None, (80, 58), None]
    path = _write_mp4(_marker_frames(centres), tmp_path / "blank.mp4")
    strict = PoseExtractConfig(max_gap=1)
    with pytest.raises(PoseError, match=r"blank.mp4: no person detected in frames 1-3 \(3 of 6\)"):
        load_poses(path, estimator=MarkerEstimator(), extraction=strict, cache_dir=tmp_path)
    lenient = PoseExtractConfig(max_gap=1, on_missing="empty")
    seq = load_poses(path, estimator=MarkerEstimator(), extraction=lenient, cache_dir=tmp_path)
    assert seq.info["empty"] == [1, 2, 3] and seq.info["filled"] == [5]
    assert (seq.keypoints[1:4] == 0).all() and (seq.keypoints[[0, 4, 5], :, 2] > 0).all()


def test_portrait_and_landscape_are_letterboxed_into_the_render_size(tmp_path: Path) -> None:
    for size, centre in (((96, 160), (48, 80)), ((160, 96), (80, 48))):
        path = _write_mp4(_marker_frames([centre] * 2, size=size), tmp_path / "v.mp4")
        seq = load_poses(path, estimator=MarkerEstimator(), cache_dir=tmp_path)
        assert (seq.width, seq.height) == size
        out = resample(seq, width=512, height=512)  # the render's step
        scale = 512 / max(size)
        offset = np.array([(512 - scale * size[0]) / 2, (512 - scale * size[1]) / 2])
        expected = (TEMPLATE + centre) * scale + offset
        np.testing.assert_allclose(out.keypoints[0, :, :2], expected, atol=0.6 * scale)
        assert (
            abs(out.keypoints[0, 1, 0] - 256) < 2
            and abs(out.keypoints[0, 1, 1] - 256 + 25 * scale) < 2
        )


def test_raw_estimates_are_cached_by_content_and_detector_settings(tmp_path: Path) -> None:
    path = _write_mp4(_marker_frames([(40, 50), (60, 50)]), tmp_path / "c.mp4")
    fake = MarkerEstimator()
    first = load_poses(path, estimator=fake, cache_dir=tmp_path / "cache")
    assert fake.calls == 2 and not first.info["cache_hit"]
    smoother = PoseExtractConfig(min_cutoff=0.5)  # post-processing only: still a hit
    again = load_poses(path, estimator=fake, extraction=smoother, cache_dir=tmp_path / "cache")
    assert fake.calls == 2 and again.info["cache_hit"]
    other = PoseExtractConfig(min_detection_confidence=0.7)  # changes the raw estimates: a miss
    load_poses(path, estimator=fake, extraction=other, cache_dir=tmp_path / "cache")
    assert fake.calls == 4
    _write_mp4(_marker_frames([(40, 50), (61, 50)]), path)  # new content: a miss
    load_poses(path, estimator=fake, cache_dir=tmp_path / "cache")
    assert fake.calls == 6


def test_kind_applies_to_visual_inputs_only(dance_json: Path) -> None:
    with pytest.raises(PoseError, match=r"kind='rgb'.*only to videos"):
        load_poses(dance_json, kind="rgb")


# ------------------------------------------------------------------ filters


def test_one_euro_removes_jitter_and_follows_motion() -> None:
    rng = np.random.default_rng(0)
    still = np.ones((96, 18, 3), np.float32)
    still[..., :2] = 256 + rng.normal(0, 2.0, (96, 18, 2))
    out = one_euro(still, 24, min_cutoff=1.0, beta=20.0, scale=512)
    assert np.std(out[24:, :, :2] - 256) < np.std(still[24:, :, :2] - 256) / 2  # measured 2.19x
    ramp = np.ones((96, 18, 3), np.float32)
    ramp[..., 0] = 100 + 7 * np.arange(96)[:, None]  # 168 px/s at 24 fps
    ramp[..., 1] = 200
    out = one_euro(ramp, 24, min_cutoff=1.0, beta=20.0, scale=512)
    assert np.abs(out[24:, :, 0] - ramp[24:, :, 0]).max() < 3.0  # measured 2.66 px
    gap = ramp.copy()
    gap[40:44, 3] = 0  # a joint missing for 4 frames stays missing, then restarts at the data
    out = one_euro(gap, 24, min_cutoff=1.0, beta=20.0, scale=512)
    assert (out[40:44, 3] == 0).all() and out[44, 3, 0] == gap[44, 3, 0]


def test_fill_gaps_holds_the_edges_and_leaves_long_runs() -> None:
    kp = np.zeros((7, 18, 3), np.float32)
    kp[[1, 5], :, 2] = 1
    kp[1, :, 0], kp[5, :, 0] = 10, 50
    detected = np.array([0, 1, 0, 0, 0, 1, 0], bool)
    filled_kp, filled = fill_gaps(kp, detected, max_gap=3)
    assert filled.tolist() == [True, False, True, True, True, False, True]
    np.testing.assert_allclose(filled_kp[:, 0, 0], [10, 10, 20, 30, 40, 50, 50])
    _, filled = fill_gaps(kp, detected, max_gap=2)
    assert filled.tolist() == [True, False, False, False, False, False, True]


# ------------------------------------------------------------------ CLI and config


def test_cli_converts_an_rgb_video_with_a_preview(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("engine.pose.extract.mediapipe_estimator", lambda **_: MarkerEstimator())
    src = _write_mp4(_marker_frames([(40, 50), None, (60, 50)]), tmp_path / "dance.mp4")
    runner = CliRunner()
    args = ["poses", "convert", str(src), str(tmp_path / "poses.json"), "--preview"]
    result = runner.invoke(app, [*args, str(tmp_path / "preview.mp4"), "--max-gap", "1"])
    assert result.exit_code == 0, result.output
    assert "rgb" in result.output and "1 filled" in result.output
    seq = load_poses(tmp_path / "poses.json")
    assert seq.num_frames == 3 and (seq.keypoints[..., 2] > 0).all()
    preview = list(open_frames(tmp_path / "preview.mp4").frames)
    assert len(preview) == 3 and preview[0].shape == (120, 160, 3)
    assert np.abs(preview[0].astype(int) - _marker_frames([(40, 50)])[0]).max() > 100  # drawn
    bad = runner.invoke(app, ["poses", "convert", str(src), "x.json", "--kind", "video"])
    assert bad.exit_code == 2 and "auto, skeleton, rgb" in bad.output


def test_render_config_takes_pose_kind_and_extraction(dance_json: Path) -> None:
    from engine.config import ConfigError, load_config

    config = load_config(
        None,
        preset="tiny",
        overrides=[f"poses={dance_json}", "pose_kind=rgb", "pose_extraction.max_gap=3"],
    )
    assert config.pose_kind == "rgb" and config.pose_extraction.max_gap == 3
    with pytest.raises(ConfigError, match="pose_extraction"):
        load_config(None, preset="tiny", overrides=["pose_extraction.smoothin=false"])
