"""The micro preset: its world, its metrics (and their place in metrics.json), its shipped weights.

One micro model and one 4-frame render per prompt serve the whole module (this machine is slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.compose import pose_body_mask
from engine.metrics.clip_score import tiny_clip
from engine.metrics.inputs import ScoreInputs, load_render
from engine.metrics.micro import (
    appearance_drift,
    background_change,
    classify_scenes,
    figure_iou,
    figure_masks,
    garment_colours,
)
from engine.metrics.micro_report import MICRO_AGGREGATE
from engine.metrics.pose_mse import NoEstimator
from engine.metrics.report import score_inputs, score_render
from engine.micro.world import (
    SCENES,
    draw_figure,
    draw_scene,
    make_sample,
    parse_caption,
    sample_look,
)
from engine.pose import PoseSequence, save_poses_json

PROMPTS = (
    "a woman in a red dress dancing on a beach",
    "a man in a blue shirt dancing in a forest",
)
POSE_SEED = 11  # world poses 0..3 of this seed: four clearly different poses
# Measured on this machine with the weights of 2026-12-04 16:56 (10 steps, guidance 4, latent
# inter-frame, four world poses that jump): figure IoU per frame 0.71 0.55 0.65 0.49 (red dress,
# mean 0.60) and 0.69 0.67 0.51 0.49 (blue shirt, mean 0.59); ground truth through the segmenter
# 0.96; a figure mask against another pose's body: 0.16 on average (the level of a model that draws
# no figure in the pose). 0.45 leaves room for retrained weights and fails a figure-less model.
MIN_FIGURE_IOU = 0.45
# With the weights of run 4 (offset noise, 2026-12-05): the background's scene right in 4 of 4
# frames for both prompts (figure IoU 0.83 0.82 0.78 0.80 and 0.82 0.82 0.73 0.64); run 3's
# weights, which drifted to a city street, scored 0 of 16 on the demo.
MIN_SCENE_RIGHT = 3


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


@pytest.fixture(scope="module")
def world() -> list:
    return [make_sample(3, i) for i in range(6)]


# ----------------------------------------------------------------------------------- the world


def test_world_is_deterministic_and_figures_match_their_pose_maps(world) -> None:
    again = make_sample(3, 4)
    assert np.array_equal(again.image, world[4].image)
    assert np.array_equal(again.pose_map, world[4].pose_map)
    assert again.look == world[4].look
    assert not np.array_equal(world[0].image, world[1].image)  # samples differ
    for s in world:
        body = pose_body_mask(s.keypoints, 64, 64) > 0
        assert _iou(s.mask > 0, body) >= 0.9, s.look.caption
        assert s.pose_map[body].any()  # the pose map draws the skeleton inside the figure


# ---------------------------------------------------------------- the metrics on ground truth


def test_segmenter_and_colour_on_ground_truth(world) -> None:
    frames = np.stack([s.image for s in world])
    kp = np.stack([s.keypoints for s in world])
    iou = figure_iou(figure_masks(frames), kp)
    # measured on 24 samples of seed 3: mean 0.96, min 0.76 (a green dress on a library's shelves)
    assert iou.mean() >= 0.9 and iou.min() >= 0.7, iou
    assert garment_colours(frames, kp) == [s.look.colour for s in world]


def test_scene_classifier_on_ground_truth() -> None:
    # measured: 3,000 of 3,000 frames of seed 7 right; here 48 frames of another seed, all six
    # scenes, each classified from its background outside the dilated person mask
    samples = [make_sample(5, i) for i in range(48)]
    truth = [s.look.scene for s in samples]
    assert set(truth) == set(SCENES)
    frames, kp = np.stack([s.image for s in samples]), np.stack([s.keypoints for s in samples])
    assert classify_scenes(frames, kp) == truth
    beach = next(s for s in samples if s.look.scene == "beach")
    night = draw_scene("night", 64, np.random.default_rng(0))
    draw_figure(night, beach.keypoints, beach.look, np.random.default_rng(0))
    assert classify_scenes(night[None], beach.keypoints[None]) == ["night"]  # same dancer


def _redrawn(sample, *, look_seed: int | None = None, scene_seed: int | None = None) -> np.ndarray:
    """``sample``'s pose drawn again with another look and/or over another scene."""
    rng = np.random.default_rng(look_seed or 0)
    look = sample_look(rng) if look_seed is not None else sample.look
    scene_rng = np.random.default_rng(scene_seed or 0)
    canvas = draw_scene(sample.look.scene, 64, scene_rng) if scene_seed else sample.scene.copy()
    draw_figure(canvas, sample.keypoints, look, np.random.default_rng(0))
    return canvas


def test_drift_and_background_change_zero_for_identical_frames_positive_for_changed(
    world,
) -> None:
    s = world[0]
    kp = np.stack([s.keypoints, s.keypoints])
    same = np.stack([s.image, s.image])
    assert appearance_drift(same, kp) == {"body_hist_l1": 0.0, "torso_texture_change": 0.0}
    assert background_change(same, kp) == 0.0
    new_look = np.stack([s.image, _redrawn(s, look_seed=99)])  # other clothes, same scene
    drift = appearance_drift(new_look, kp)
    assert drift["body_hist_l1"] > 0.2
    assert background_change(new_look, kp) == 0.0
    new_scene = np.stack([s.image, _redrawn(s, scene_seed=5)])  # same figure, scene moved
    assert background_change(new_scene, kp) > 1.0
    assert appearance_drift(new_scene, kp)["body_hist_l1"] < 0.05


def test_score_inputs_micro_section_and_plot(world, tmp_path: Path) -> None:
    from engine.metrics.report import write_report

    frames = [s.image for s in world[:3]]
    kp = np.stack([s.keypoints for s in world[:3]])
    inputs = ScoreInputs(frames, kp, None, world[0].look.caption)
    result = score_inputs(inputs, clip=tiny_clip(), estimator=NoEstimator(), micro=True)
    micro = result["micro"]
    assert list(micro["aggregate"]) == list(MICRO_AGGREGATE)
    assert len(micro["per_frame"]["figure_iou"]) == 3
    assert len(micro["per_pair"]["background_change"]) == 2
    assert micro["settings"]["prompt_colour"] == world[0].look.colour
    assert micro["per_frame"]["colour_right"][0] is True
    assert micro["per_frame"]["scene"] == [s.look.scene for s in world[:3]]
    assert micro["settings"]["prompt_scene"] == world[0].look.scene
    assert micro["per_frame"]["scene_right"][0] is True
    assert micro["aggregate"]["figure_iou"] > 0.85
    assert "micro" not in score_inputs(inputs, clip=tiny_clip(), estimator=NoEstimator())
    written = write_report(result, tmp_path)
    assert (
        json.loads((tmp_path / "metrics.json").read_text())["micro"]["aggregate"]
        == (written["micro"]["aggregate"])
    )
    from PIL import Image

    assert Image.open(tmp_path / "metrics.png").size == (1400, 2000)  # the micro row drawn


# ------------------------------------------------------------------ the shipped micro weights


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> list[Path]:
    """Each prompt of :data:`PROMPTS` rendered on the same 4 world poses with the shipped weights."""
    from engine.chain import FrameChain
    from engine.config import load_config
    from engine.models.registry import build_components
    from engine.render import render

    root = tmp_path_factory.mktemp("micro")
    kp = np.stack([make_sample(POSE_SEED, i).keypoints for i in range(4)])
    save_poses_json(PoseSequence(kp, fps=8.0, width=64, height=64), root / "poses.json")
    outs, chain = [], None
    for i, prompt in enumerate(PROMPTS):
        config = load_config(
            None,
            preset="micro",
            overrides=[
                f"poses={root / 'poses.json'}",
                f"prompt={prompt}",
                "seed=5",
                "sampler.steps=10",
                "output.contact_sheet=false",
                f"cache_dir={root / 'cache'}",
            ],
        )
        chain = chain or FrameChain(build_components(config.model), config.model.attention)
        render(config, root / f"r{i}", chain=chain, progress=False)
        outs.append(root / f"r{i}")
    return outs


def _frames_kp(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    inputs = load_render(folder)
    assert inputs.keypoints is not None
    return np.stack(inputs.frames), inputs.keypoints


def test_micro_render_follows_pose_colour_and_scene(renders) -> None:
    for folder, prompt in zip(renders, PROMPTS, strict=True):
        frames, kp = _frames_kp(folder)
        iou = figure_iou(figure_masks(frames), kp)
        assert iou.mean() >= MIN_FIGURE_IOU, (prompt, iou)
        colour = prompt.split()[4]
        seen = garment_colours(frames, kp)
        assert sum(c == colour for c in seen) >= 3, (prompt, seen)  # most of the 4 frames
        scenes = classify_scenes(frames, kp)
        right = sum(c == parse_caption(prompt)[1] for c in scenes)
        assert right >= MIN_SCENE_RIGHT, (prompt, scenes)


def test_different_poses_move_the_figure(renders) -> None:
    masks = [figure_masks(_frames_kp(folder)[0]) for folder in renders]
    same_pose = [_iou(masks[0][t], masks[1][t]) for t in range(4)]  # two prompts, one pose
    other_pose = [_iou(m[t], m[u]) for m in masks for t in range(4) for u in range(t + 1, 4)]
    # measured: same pose 0.75 0.50 0.43 0.52 (mean 0.55), other poses mean 0.16
    assert np.mean(same_pose) > np.mean(other_pose) + 0.2, (same_pose, other_pose)


def test_avatar_metrics_adds_the_micro_section(renders) -> None:
    result = score_render(renders[1], estimator="none", plot=False)
    micro = result["micro"]
    assert micro["settings"]["prompt_colour"] == "blue"
    assert micro["settings"]["prompt_source"].startswith("render config prompt")
    assert micro["aggregate"]["figure_iou"] >= MIN_FIGURE_IOU
    assert result["settings"]["clip"].startswith("tiny_clip")
    assert "micro preset" in result["settings"]["clip_note"]
    assert set(result["aggregate"]) >= {"frame_niqe", "frame_l1", "body_clip"}  # paper's kept


def test_cli_micro_flag_for_an_mp4_and_off_for_a_render(renders, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from engine.cli import app

    runner = CliRunner()
    args = [
        "metrics",
        str(renders[0] / "video.mp4"),
        "--poses",
        str(renders[0].parent / "poses.json"),
    ]
    args += ["--prompt", PROMPTS[0], "--clip", "tiny", "--estimator", "none", "--micro"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "mp4")])
    assert result.exit_code == 0, result.output
    assert "micro world (red garment colour named)" in result.output
    micro = json.loads((tmp_path / "mp4" / "metrics.json").read_text())["micro"]
    assert micro["settings"]["prompt_source"] == "argument"
    assert micro["aggregate"]["figure_iou"] >= MIN_FIGURE_IOU - 0.1  # through H.264
    result = runner.invoke(app, ["metrics", str(renders[0]), "--estimator", "none", "--no-micro"])
    assert result.exit_code == 0, result.output
    assert "micro world" not in result.output and "micro preset" in result.output  # CLIP note
    assert "micro" not in json.loads((renders[0] / "metrics.json").read_text())


# ------------------------------------------------------------------------ the micro benchmark


def test_micro_benchmark_checks_say_plainly_when_a_module_does_not_help() -> None:
    from benchmarks.quality_micro import check_directions, format_checks, format_micro_table

    def run(case: str, variant: str, **metrics: float) -> dict:
        return {"case": case, "variant": variant, "metrics": metrics}

    runs = [
        run("p0", "full", body_hist_l1=0.2, torso_texture_change=2.0, frame_l1=5.0),
        run("p1", "full", body_hist_l1=0.4, torso_texture_change=2.0, frame_l1=7.0),
        run("p0", "no_intra", body_hist_l1=0.5, torso_texture_change=2.05, frame_l1=5.0),
        run("p1", "no_intra", body_hist_l1=0.3, torso_texture_change=2.0, frame_l1=7.0),
        run("p0", "no_inter", body_hist_l1=0.1, torso_texture_change=2.0, frame_l1=4.0),
        run("p1", "no_inter", body_hist_l1=0.1, torso_texture_change=2.0, frame_l1=4.0),
    ]
    checks = {(c["module"], c["metric"]): c for c in check_directions(runs)}
    intra = checks[("intra-frame LoRA", "body_hist_l1")]
    assert (intra["with_value"], intra["without_value"]) == pytest.approx((0.3, 0.4))
    assert intra["as_paper"] is True and (intra["cases_lower"], intra["cases"]) == (1, 2)
    assert checks[("inter-frame latent", "frame_l1")]["as_paper"] is False
    assert ("background plate", "background_change") not in checks  # variant not run
    text = format_checks(list(checks.values())).splitlines()
    assert "moved it DOWN by 25%, as the paper reports" in text[0]
    assert "did NOT move it clearly" in text[1]  # texture 2.0 vs 2.025: 1 %
    assert any("moved it UP" in line and "NOT as the paper reports" in line for line in text)
    lines = format_micro_table({"full": {"figure_iou": 0.7}}).splitlines()
    assert len(lines) == 3 and all(line.count("|") == 9 for line in lines)
    assert lines[2].startswith("| Ours (full") and "| 0.700 | — |" in lines[2]


def test_micro_benchmark_runs_end_to_end(tmp_path: Path, capsys) -> None:
    from benchmarks.quality import main, parse_args

    with pytest.raises(SystemExit):  # a micro-only variant on another preset
        parse_args(["--preset", "tiny", "--variants", "inter_kv"])
    with pytest.raises(SystemExit):
        parse_args(["--preset", "micro", "--prompts", "9"])
    args = ["--preset", "micro", "--prompts", "1", "--frames", "2", "--steps", "2"]
    args += ["--appearance-steps", "1", "--variants", "full", "no_background", "--no-plots"]
    record = main([*args, "--out", str(tmp_path)])
    assert record["preset"] == "micro" and set(record["table"]) == {"full", "no_background"}
    assert record["settings"]["estimator"] == "none" and record["machine"]["cpus"]
    (check,) = record["checks"]
    assert (check["module"], check["metric"]) == ("background plate", "background_change")
    assert record["table"]["full"]["background_change"] < 1.0  # the plate holds the background
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["runs"][0]["paper_metrics"]["frame_niqe"] is not None
    out = capsys.readouterr().out
    assert "| Ours (full: intra + plate + latent) |" in out and "background plate →" in out
    assert (tmp_path / "quality.md").read_text() in out
