"""The `avatar` command line end to end on the tiny preset (reads the mp4 back)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from engine.cli import app
from engine.pose import load_poses, synthetic_dance, write_pose_video
from engine.video import probe_video

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_render_example_writes_playable_video(tmp_path: Path):
    out = tmp_path / "demo"
    result = runner.invoke(
        app,
        [
            "render",
            str(ROOT / "examples" / "dance.yaml"),
            "--out",
            str(out),
            "--quiet",
            "--set",
            "sampler.steps=4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"video: {out / 'video.mp4'}" in result.output
    info = probe_video(out / "video.mp4")
    assert info["frames"] == 16 and abs(info["fps"] - 8.0) < 1e-6
    assert (info["width"], info["height"]) == (64, 64)
    assert info["codec"].startswith("h264") and info["pix_fmt"].startswith("yuv420p")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["sampler"]["steps"] == 4
    assert len(manifest["seeds"]) == 16 and len(set(manifest["seeds"])) == 16
    assert {"poses", "refine", "chain", "outputs", "total"} <= set(manifest["timings_s"])
    assert len(list((out / "frames").glob("*.png"))) == 16
    assert (out / "contact_sheet.png").is_file()


def test_render_accepts_a_pose_map_video(tmp_path: Path):
    """Text2Video-Zero style: a rendered OpenPose skeleton video, 512x512, 16 frames."""
    write_pose_video(
        synthetic_dance(frames=16, fps=8, width=512, height=512), tmp_path / "skeleton.mp4"
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text("prompt: an astronaut dancing\nposes: skeleton.mp4\nsampler:\n  steps: 2\n")
    result = runner.invoke(
        app,
        [
            "render",
            str(spec),
            "--out",
            str(tmp_path / "o"),
            "-q",
            "--set",
            "alignment.inter_frame=none",
        ],
    )
    assert result.exit_code == 0, result.output
    assert probe_video(tmp_path / "o" / "video.mp4")["frames"] == 16


def test_render_errors_are_one_clean_line(tmp_path: Path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("prompt: x\nposes: nowhere.json\n")
    result = runner.invoke(app, ["render", str(spec), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert (
        "error:" in result.output
        and "nowhere.json" in result.output
        and "Traceback" not in result.output
    )
    result = runner.invoke(
        app, ["render", str(spec), "--out", str(tmp_path / "o"), "--set", "sampler.steps=0"]
    )
    assert result.exit_code == 2 and "sampler.steps" in result.output


def test_poses_convert_and_presets(tmp_path: Path):
    shutil.copy(ROOT / "examples" / "dance" / "poses.json", tmp_path / "in.json")
    result = runner.invoke(
        app,
        ["poses", "convert", str(tmp_path / "in.json"), str(tmp_path / "maps.mp4"), "--fps", "4"],
    )
    assert result.exit_code == 0, result.output
    back = load_poses(tmp_path / "maps.mp4")
    assert len(back.keypoints) == 8 and back.fps == 4
    original = load_poses(tmp_path / "in.json")
    assert np.abs(back.keypoints[0, :, :2] - original.keypoints[0, :, :2]).mean() < 2.0
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0 and "tiny" in result.output and "sd15" in result.output
