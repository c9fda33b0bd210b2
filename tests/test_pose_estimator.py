"""The offline estimator for real: MediaPipe Pose (its model ships in the wheel), run in the
separate environment `make pose-env` builds (part of `make install`), on a real photograph of a
person: Pose MSE, and pose extraction from an RGB video made of that photograph moved by known
amounts."""

from __future__ import annotations

from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
from skimage.data import astronaut

from engine.metrics.pose_mse import MediaPipeEstimator, make_estimator, pose_python, pose_scores
from engine.pose import PoseError, load_poses
from engine.pose.extract import PoseExtractConfig
from engine.pose.skeleton import JOINT_NAMES

pytestmark = pytest.mark.skipif(
    pose_python() is None,
    reason="no mediapipe environment: run `make pose-env` (or set AVATAR_POSE_PYTHON)",
)
FACE = [JOINT_NAMES.index(n) for n in ("nose", "right_eye", "left_eye", "right_ear", "left_ear")]
# Per frame: scale and shift (px) of the photograph in a 512x512 frame: a smooth zoom and pan.
MOTION = [(0.75 + 0.1 * t / 7, 20 + 6 * t, 30 + 4 * t) for t in range(8)]


@pytest.fixture(scope="module")
def estimator():
    est = make_estimator("mediapipe")
    assert isinstance(est, MediaPipeEstimator)
    yield est
    est.close()


def _place(image: np.ndarray, scale: float, dx: float, dy: float) -> np.ndarray:
    """The photograph scaled by ``scale`` and shifted by (dx, dy) on a grey 512x512 frame."""
    matrix = np.float32([[scale, 0, dx], [0, scale, dy]])
    return cv2.warpAffine(
        image, matrix, (512, 512), flags=cv2.INTER_AREA, borderValue=(128, 128, 128)
    )


def _write_mp4(frames: list[np.ndarray], path: Path, fps: float = 24) -> Path:
    writer = imageio_ffmpeg.write_frames(
        str(path), (512, 512), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
        macro_block_size=1, quality=None, output_params=["-crf", "18"], ffmpeg_log_level="error",
    )  # fmt: skip
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def test_finds_the_astronaut(estimator):
    image = astronaut()  # 512x512, a person from the chest up, face at about (230, 120)
    keypoints = estimator.estimate(image)
    assert keypoints is not None and keypoints.shape == (18, 3)
    nose = keypoints[JOINT_NAMES.index("nose")]
    assert nose[2] > 0.5 and 150 < nose[0] < 300 and 60 < nose[1] < 200, nose
    shoulders = keypoints[[JOINT_NAMES.index("right_shoulder"), JOINT_NAMES.index("left_shoulder")]]
    assert (shoulders[:, 1] > nose[1]).all()  # shoulders below the nose


def test_pose_mse_of_a_video_against_its_own_poses(estimator):
    frames = [astronaut(), np.zeros((512, 512, 3), np.uint8)]  # a person, then no one
    truth = estimator.estimate(frames[0])
    scores = pose_scores(frames, np.stack([truth, truth]), estimator)
    assert scores["detection_rate"] == 0.5
    assert scores["pose_mse"] == pytest.approx(0.0, abs=1e-6)


def _errors(seq, reference: np.ndarray) -> np.ndarray:
    """(frames, face joints) distance in px between extracted and transformed reference joints."""
    errs = []
    for (scale, dx, dy), kp in zip(MOTION, seq.keypoints, strict=True):
        assert (kp[FACE, 2] > 0).all()
        expected = reference[FACE] * scale + np.array([dx, dy])
        errs.append(np.linalg.norm(kp[FACE, :2] - expected, axis=1))
    return np.stack(errs)


def test_rgb_video_keypoints_follow_the_known_transform(estimator, tmp_path: Path):
    frames = [_place(astronaut(), *m) for m in MOTION]
    video = _write_mp4(frames, tmp_path / "astronaut.mp4")
    first = estimator.estimate(frames[0])  # the face in photograph coordinates, from frame 0
    scale, dx, dy = MOTION[0]
    reference = (first[:, :2] - np.array([dx, dy])) / scale
    raw = load_poses(video, extraction=PoseExtractConfig(smoothing=False), cache_dir=tmp_path)
    assert raw.info["kind"] == "rgb" and not raw.info["forced"]  # detected, not decoded
    assert (raw.width, raw.height, raw.fps) == (512, 512, 24.0)
    err = _errors(raw, reference)
    print(f"face joints, no smoothing: mean {err.mean():.2f} px, max {err.max():.2f} px")
    assert err.mean() < 4.0 and err.max() < 8.0  # measured 2.3 / 6.5 px
    smooth = load_poses(video, cache_dir=tmp_path)  # defaults: One-Euro on; raw from the cache
    assert smooth.info["cache_hit"]
    err = _errors(smooth, reference)
    print(f"face joints, One-Euro defaults: mean {err.mean():.2f} px, max {err.max():.2f} px")
    assert err.mean() < 8.0 and err.max() < 12.0  # lag while the filter learns the speed


def test_blank_frames_of_an_rgb_video_are_reported(tmp_path: Path):
    photo, black = _place(astronaut(), *MOTION[0]), np.zeros((512, 512, 3), np.uint8)
    video = _write_mp4([photo, black, black, black, photo], tmp_path / "blank.mp4")
    with pytest.raises(PoseError, match=r"no person detected in frames 1-3 \(3 of 5\)"):
        load_poses(video, extraction=PoseExtractConfig(max_gap=2), cache_dir=tmp_path)
    seq = load_poses(video, extraction=PoseExtractConfig(max_gap=3), cache_dir=tmp_path)
    assert seq.info["filled"] == [1, 2, 3] and seq.info["empty"] == []


def test_avatar_render_takes_a_driving_rgb_video(tmp_path: Path):
    """A real dance-video-like input goes straight into `avatar render` (spec `poses:`): the
    poses are extracted (recorded in the manifest), never decoded as a skeleton."""
    import json

    from typer.testing import CliRunner

    from engine.cli import app

    _write_mp4([_place(astronaut(), *m) for m in MOTION], tmp_path / "dance.mp4")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "prompt: an astronaut dancing\nposes: dance.mp4\nfps: 8\n"
        f"sampler: {{steps: 2}}\ncache_dir: {tmp_path / 'cache'}\n"
    )
    result = CliRunner().invoke(app, ["render", str(spec), "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    info = manifest["poses"]["info"]
    assert info["kind"] == "rgb" and manifest["poses"]["frames"] == 3  # 8 frames at 24 fps → 8 fps
