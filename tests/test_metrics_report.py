"""Scoring whole videos: metrics.json / metrics.png, Pose MSE, `avatar metrics`, the benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from engine.cli import app
from engine.metrics import temporal_metrics
from engine.metrics.clip_score import tiny_clip
from engine.metrics.inputs import ScoreInputs
from engine.metrics.pose_mse import (
    POSE_MSE_SCALE,
    MediaPipeEstimator,
    NoEstimator,
    PoseEstimatorError,
    frame_pose_mse,
    landmarks_to_coco18,
    make_estimator,
    pose_scores,
)
from engine.metrics.report import AGGREGATE, PER_PAIR, score_inputs, score_render, score_video
from engine.pose import PoseSequence, save_poses_json, synthetic_dance
from engine.video import load_png, save_png
from tests.conftest import tiny_config

FRAMES = 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, tiny_chain) -> Path:
    """A tiny 3-frame render with the background plate, scored by the render hook."""
    from engine.render import render

    root = tmp_path_factory.mktemp("scored")
    poses = root / "poses.json"
    save_poses_json(synthetic_dance(frames=FRAMES, fps=8, width=64, height=64), poses)
    config = tiny_config(
        poses,
        "sampler.steps=2",
        "alignment.background=true",
        "background.mask_source=pose",
        "metrics=true",
        f"cache_dir={root / 'cache'}",
    )
    render(config, root / "out", chain=tiny_chain, progress=False)
    return root / "out"


def _check_layout(result: dict, frames: int) -> None:
    assert list(result["aggregate"]) == list(AGGREGATE)
    assert {len(v) for v in result["per_frame"].values()} == {frames}
    assert set(result["per_pair"]) == set(PER_PAIR)
    assert {len(v) for v in result["per_pair"].values()} == {frames - 1}


def test_render_hook_and_score_render(rendered: Path, clip) -> None:
    hooked = json.loads((rendered / "metrics.json").read_text())  # written by render(metrics=true)
    _check_layout(hooked, FRAMES)
    result = score_render(rendered, clip=clip, estimator="none")
    on_disk = json.loads((rendered / "metrics.json").read_text())
    assert on_disk["aggregate"] == result["aggregate"]
    _check_layout(result, FRAMES)
    agg, settings = result["aggregate"], result["settings"]
    assert settings["niqe_upscaled"] is True and settings["niqe_upscale_factor"] == 6
    assert result["source"]["masks"] == "masks/" and result["source"]["frames"] == FRAMES
    assert result["source"]["prompt"] == "manifest prompt.frame"
    for key in AGGREGATE:
        if not key.startswith("pose_"):
            assert isinstance(agg[key], float), key
    assert agg["pose_mse"] is None and "--estimator none" in result["null_reasons"]["pose_mse"]
    assert agg["background_l1"] == 0.0  # the plate is composited outside the person mask
    frames = [load_png(p) for p in sorted((rendered / "frames").glob("*.png"))]
    masks = [np.asarray(Image.open(p).convert("L")) > 0 for p in sorted(rendered.glob("masks/*"))]
    expected = temporal_metrics(frames, masks)
    assert agg["frame_l1"] == pytest.approx(expected["frame_l1"])
    assert agg["body_mse"] == pytest.approx(expected["frame_mse_body"])
    png = rendered / "metrics.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png) as img:
        assert img.size == (1400, 1500)


def test_identical_frames_are_perfectly_consistent(tmp_path: Path, clip) -> None:
    frame = cv2.resize(data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)
    (tmp_path / "frames").mkdir()
    for i in range(FRAMES):
        save_png(frame, tmp_path / "frames" / f"{i:06d}.png")
    poses = tmp_path / "poses.json"
    still = synthetic_dance(frames=1, width=128, height=128)  # the same pose in every frame
    kp = np.repeat(still.keypoints, FRAMES, axis=0)
    save_poses_json(PoseSequence(kp, still.fps, 128, 128), poses)
    result = score_render(tmp_path, clip=clip, estimator="none", prompt="an astronaut", poses=poses)
    agg = result["aggregate"]
    for key in ("frame", "body", "background"):
        assert agg[f"{key}_l1"] == 0.0 and agg[f"{key}_mse"] == 0.0
        assert agg[f"{key}_clip"] == pytest.approx(100.0, abs=1e-3)
    assert result["settings"]["niqe_upscale_factor"] == 3
    assert result["source"]["masks"] == "drawn from the poses"
    assert len(set(result["per_frame"]["frame_niqe"])) == 1  # same frame, same score


def test_score_plain_mp4_with_poses(rendered: Path, tmp_path: Path, clip) -> None:
    poses = rendered.parent / "poses.json"
    result = score_video(rendered / "video.mp4", poses, tmp_path, "a dancer", clip=clip)
    _check_layout(result, FRAMES)
    assert result["source"]["kind"] == "video" and result["source"]["fps"] == 8.0
    assert result["aggregate"]["body_niqe"] is not None
    assert result["aggregate"]["text_alignment"] is not None
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "metrics.png").is_file()
    bare = score_video(rendered / "video.mp4", None, tmp_path / "bare", None, clip=clip)
    assert bare["aggregate"]["body_l1"] is None and bare["aggregate"]["text_alignment"] is None
    assert "--prompt" in bare["null_reasons"]["text_alignment"]


def test_cli_metrics_end_to_end(rendered: Path, tmp_path: Path, monkeypatch) -> None:
    result = runner.invoke(app, ["metrics", str(rendered), "--clip", "tiny", "--estimator", "none"])
    assert result.exit_code == 0, result.output
    assert "Frame NIQE" in result.output and "Background L1" in result.output
    assert f"wrote {rendered / 'metrics.json'}" in result.output
    video = [
        "metrics",
        str(rendered / "video.mp4"),
        "--poses",
        str(rendered.parent / "poses.json"),
        "--prompt",
        "a dancer",
        "--clip",
        "tiny",
        "--out",
        str(tmp_path / "scored"),
    ]
    result = runner.invoke(app, video)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "scored" / "metrics.png").is_file()
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # as if the [pose] extra were missing
    monkeypatch.setattr("engine.metrics.pose_mse.pose_python", lambda: None)  # and no .venv-pose
    for args, needle in (
        ([str(tmp_path / "missing")], "no such render folder or video"),
        ([str(rendered), "--estimator", "mediapipe", "--clip", "tiny"], "[pose]"),
        ([str(rendered), "--estimator", "openpose"], "auto, none, mediapipe"),
        ([str(tmp_path)], "no frames/*.png and no video.mp4"),
    ):
        result = runner.invoke(app, ["metrics", *args])
        assert result.exit_code == 2, result.output
        assert needle in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------ Pose MSE


class FakeEstimator:
    """Returns prepared keypoints (or None = no person) frame by frame."""

    name = "fake"

    def __init__(self, outputs: list[np.ndarray | None]) -> None:
        self.outputs = list(outputs)

    def estimate(self, image: np.ndarray) -> np.ndarray | None:
        return self.outputs.pop(0)


def test_pose_mse_math_with_fake_estimator() -> None:
    ref = synthetic_dance(frames=4, width=64, height=128).keypoints.copy()
    ref[0, 17] = 0  # a joint missing from the input never counts
    shifted = ref[0].copy()
    shifted[:, 0] += 6.4  # 0.1 of the width → 0.01 squared
    shifted[:, 1] -= 12.8  # 0.1 of the height → 0.01 squared
    shifted[17] = (60.0, 60.0, 1.0)  # a confident estimate of a joint missing in the input
    unsure = ref[2].copy()
    unsure[:, 2] = 0.1  # detected, but no joint confident enough
    frames = [np.zeros((128, 64, 3), np.uint8)] * 4
    fake = FakeEstimator([shifted, None, unsure, ref[3]])
    scores = pose_scores(frames, ref, fake)
    per = scores["per_frame"]
    assert per["pose_mse"][0] == pytest.approx(0.02 * POSE_MSE_SCALE)
    assert per["pose_mse"][1:] == [None, None, 0.0]
    assert per["detected"] == [True, False, True, True]
    assert per["joints"] == [17, 0, 0, 18]
    assert scores["detection_rate"] == 0.75  # the undetected frame is counted, not dropped
    assert scores["pose_mse"] == pytest.approx(0.01 * POSE_MSE_SCALE)  # mean of 20 and 0
    assert frame_pose_mse(ref[3], ref[3], 64, 128) == (0.0, 18)
    nothing = pose_scores(frames, ref, FakeEstimator([None] * 4))
    assert nothing["pose_mse"] is None and nothing["detection_rate"] == 0.0
    assert "no frame with a detected person" in nothing["reason"]
    none = pose_scores(frames, ref, NoEstimator())
    assert none["pose_mse"] is None and none["detection_rate"] is None and none["reason"]


def test_score_inputs_reports_pose_mse_and_detection(clip) -> None:
    seq = synthetic_dance(frames=3, width=64, height=64)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    inputs = ScoreInputs(frames, seq.keypoints, None, "a dancer", source={"path": "memory"})
    fake = FakeEstimator([seq.keypoints[0], None, seq.keypoints[2]])
    result = score_inputs(inputs, clip=clip, estimator=fake)
    assert result["aggregate"]["pose_mse"] == 0.0
    assert result["aggregate"]["pose_detection_rate"] == pytest.approx(2 / 3)
    assert result["per_frame"]["pose_detected"] == [True, False, True]
    assert result["aggregate"]["body_niqe"] is None  # no masks given
    assert "no person masks" in result["null_reasons"]["body_l1"]


def test_empty_person_mask_gives_null_body_scores(clip) -> None:
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    person = np.zeros((64, 64), bool)
    person[16:48, 24:40] = True
    masks = [person, np.zeros_like(person), person, person]
    inputs = ScoreInputs(frames, None, masks, None, source={"path": "memory"})
    result = score_inputs(inputs, clip=clip, estimator=NoEstimator())
    body_niqe = result["per_frame"]["body_niqe"]
    assert body_niqe[1] is None and None not in (body_niqe[0], body_niqe[2])
    assert result["per_pair"]["body_clip"][:2] == [None, None]  # both pairs touch frame 1
    assert result["per_pair"]["body_clip"][2] is not None
    assert None not in result["per_pair"]["body_l1"]  # the pair's union mask is not empty
    assert "1 frame(s) with an empty person mask" in result["null_reasons"]["body_clip"]
    assert result["aggregate"]["pose_mse"] is None
    assert result["null_reasons"]["pose_mse"] == "no input poses"


def _landmarks() -> list[SimpleNamespace]:
    return [SimpleNamespace(x=i / 40, y=1 - i / 40, visibility=0.5 + i / 80) for i in range(33)]


def test_mediapipe_adapter_maps_33_landmarks_to_coco18() -> None:
    lms = _landmarks()
    kp = landmarks_to_coco18(lms, 200, 100)
    assert kp.shape == (18, 3) and kp.dtype == np.float32
    for coco, mp_index in ((0, 0), (2, 12), (5, 11), (8, 24), (13, 27), (14, 5), (17, 7)):
        lm = lms[mp_index]
        assert kp[coco] == pytest.approx((lm.x * 200, lm.y * 100, lm.visibility))
    neck = (
        (lms[11].x + lms[12].x) / 2 * 200,
        (lms[11].y + lms[12].y) / 2 * 100,
        lms[11].visibility,
    )
    assert kp[1] == pytest.approx(neck)

    class FakePose:
        def __init__(self, found: bool) -> None:
            self.found = found

        def process(self, image: np.ndarray) -> SimpleNamespace:
            return SimpleNamespace(
                pose_landmarks=SimpleNamespace(landmark=lms) if self.found else None
            )

    image = np.zeros((100, 200, 3), np.uint8)
    assert MediaPipeEstimator(FakePose(True)).estimate(image) == pytest.approx(kp)
    assert MediaPipeEstimator(FakePose(False)).estimate(image) is None


def test_missing_mediapipe_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    monkeypatch.setattr("engine.metrics.pose_mse.pose_python", lambda: None)
    with pytest.raises(PoseEstimatorError, match=r"\[pose\].*numpy<2.*--estimator none"):
        make_estimator("mediapipe")
    auto = make_estimator("auto")
    assert isinstance(auto, NoEstimator) and "mediapipe is not installed" in auto.reason
    with pytest.raises(ValueError, match="unknown pose estimator 'openpose'"):
        make_estimator("openpose")  # type: ignore[arg-type]


# ------------------------------------------------------------------ quality benchmark


def test_benchmark_table_formatting() -> None:
    from benchmarks.quality import COLUMNS, PAPER_ROWS, format_deltas, format_table, mean_by_variant

    runs = [
        {"variant": "full", "metrics": {"frame_l1": 2.0, "frame_niqe": 5.0, "pose_mse": None}},
        {"variant": "full", "metrics": {"frame_l1": 4.0, "frame_niqe": 7.0, "pose_mse": None}},
        {"variant": "no_inter", "metrics": {"frame_l1": 9.0, "frame_niqe": 6.0, "pose_mse": None}},
    ]
    table = mean_by_variant(runs)
    assert table["full"] == {"frame_l1": 3.0, "frame_niqe": 6.0, "pose_mse": None}
    lines = format_table(table).splitlines()
    assert len(lines) == 2 + 2 + len(PAPER_ROWS)
    assert all(line.count("|") == len(COLUMNS) + 2 for line in lines)
    assert lines[2].startswith("| Ours (full) | 6.00 | — |") and lines[2].endswith("| 3.00 |")
    assert lines[3].startswith("| w/o inter-frame |")
    assert "| *Paper: Dancing Avatar* | 2.99 |" in lines[4] and "270.31" in lines[4]
    deltas = format_deltas(table)
    assert "| Frame L1 ↓: full vs w/o inter-frame | 3.000 | 9.000 | -6.000 |" in deltas
    assert "Background L1" in deltas and "— | — | — |" in deltas


def test_benchmark_mirrored_poses_swap_sides() -> None:
    from benchmarks.quality import mirrored, pose_sequence

    kp = synthetic_dance(frames=2, width=64, height=64).keypoints
    out = mirrored(kp, 64, shift=0.0)
    assert out[0, 2] == pytest.approx((64 - kp[0, 5, 0], kp[0, 5, 1], 1.0))  # R ← mirrored L
    assert out[0, 0, 0] == pytest.approx(64 - kp[0, 0, 0])
    seq = pose_sequence("mirrored_12fps", 4, 64, 64)
    assert seq.fps == 12.0 and seq.keypoints.shape == (4, 18, 3)


def test_benchmark_micro_suite_runs(tmp_path: Path, capsys) -> None:
    from benchmarks.quality import main

    args = ["--suite", "micro", "--frames", "2", "--steps", "2", "--appearance-steps", "1"]
    record = main([*args, "--no-plots", "--out", str(tmp_path)])
    assert set(record["table"]) == {"full", "no_intra", "no_background", "no_inter"}
    assert len(record["runs"]) == 4 and record["settings"]["frames"] == 2
    assert record["table"]["full"]["background_l1"] == 0.0
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["timings_s"]["total"] > 0 and saved["machine"]["cpus"]
    assert "| Ours (full) |" in capsys.readouterr().out
