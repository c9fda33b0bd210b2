"""Tests for engine.pose: readers, writers, pose-map render/decode, resampling and validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.pose import (
    PoseError,
    PoseSequence,
    convert_poses,
    decode_pose_map,
    load_poses,
    overlay_pose,
    render_pose_map,
    render_pose_maps,
    resample,
    save_poses_json,
    synthetic_dance,
    validate,
    write_pose_video,
)
from engine.pose.skeleton import BODY25_TO_COCO18, COLORS, LIMBS, NUM_JOINTS

REPO = Path(__file__).resolve().parents[1]
MAX_MEAN_ERR_PX = 2.0


def _dance(frames: int = 6, fps: float = 8.0, size: tuple[int, int] = (512, 512)) -> PoseSequence:
    return synthetic_dance(frames, fps, size[0], size[1])


def _with_missing(seq: PoseSequence, joints: tuple[int, ...]) -> PoseSequence:
    kp = seq.keypoints.copy()
    kp[:, list(joints)] = 0.0
    return PoseSequence(kp, seq.fps, seq.width, seq.height, seq.source)


def _errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per-joint pixel errors over joints present in ``want``; asserts presence matches."""
    np.testing.assert_array_equal(got[..., 2] > 0, want[..., 2] > 0)
    present = want[..., 2] > 0
    return np.linalg.norm(got[..., :2] - want[..., :2], axis=-1)[present]


def _openpose_frame(people: list[list[float]]) -> dict[str, object]:
    return {"version": 1.3, "people": [{"pose_keypoints_2d": p} for p in people]}


# --- synthetic dance and the example -------------------------------------------------------------


@pytest.mark.parametrize("size", [(512, 512), (768, 512), (384, 640)])
def test_synthetic_dance_is_valid_smooth_and_in_frame(size: tuple[int, int]) -> None:
    seq = synthetic_dance(48, 24.0, *size)
    validate(seq, max_frames=48)
    kp = seq.keypoints
    assert kp.shape == (48, NUM_JOINTS, 3) and kp.dtype == np.float32
    assert (kp[..., 2] == 1.0).all()
    assert (kp[..., 0] > 0).all() and (kp[..., 0] < size[0]).all()
    assert (kp[..., 1] > 0).all() and (kp[..., 1] < size[1]).all()
    step = np.linalg.norm(np.diff(kp[..., :2], axis=0), axis=-1)
    assert step.max() < 0.05 * min(size)  # smooth: no joint jumps > 5 % of the frame per 1/24 s
    assert kp[:, 1, 0].std() > 1.0  # it moves
    # person's right is image left; head above neck above hips above ankles
    assert (kp[:, 2, 0] < kp[:, 5, 0]).all() and (kp[:, 8, 0] < kp[:, 11, 0]).all()
    assert (kp[:, 0, 1] < kp[:, 1, 1]).all() and (kp[:, 1, 1] < kp[:, 8, 1]).all()
    assert (kp[:, 8, 1] < kp[:, 10, 1]).all()


def test_synthetic_dance_is_periodic_every_two_seconds() -> None:
    kp = synthetic_dance(17, 8.0).keypoints
    np.testing.assert_allclose(kp[0], kp[16], atol=1e-3)


def test_example_poses_json_matches_generator() -> None:
    seq = load_poses(REPO / "examples" / "dance" / "poses.json")
    assert (seq.num_frames, seq.fps, seq.width, seq.height) == (16, 8.0, 512, 512)
    np.testing.assert_allclose(seq.keypoints, synthetic_dance(16, 8.0).keypoints, atol=0.051)


# --- poses.json ----------------------------------------------------------------------------------


def test_poses_json_round_trip_keeps_missing_joints(tmp_path: Path) -> None:
    seq = _with_missing(_dance(5), (9, 10))
    path = save_poses_json(seq, tmp_path / "sub" / "poses.json")
    obj = json.loads(path.read_text())
    assert set(obj) == {"fps", "width", "height", "frames"}
    assert len(obj["frames"]) == 5 and obj["frames"][0][9] == [0.0, 0.0, 0.0]
    back = load_poses(path)
    assert (back.fps, back.width, back.height, back.source) == (8.0, 512, 512, str(path))
    np.testing.assert_allclose(back.keypoints, seq.keypoints, atol=0.006)


# --- OpenPose JSON -------------------------------------------------------------------------------


def test_openpose_coco18_folder_picks_most_confident_person(tmp_path: Path) -> None:
    kp = _dance(3).keypoints
    ghost = np.full((NUM_JOINTS, 3), 0.1, dtype=np.float32)  # faint second person
    for i in range(3):
        frame = _openpose_frame([ghost.ravel().tolist(), kp[i].ravel().tolist()])
        (tmp_path / f"clip_{i:012d}_keypoints.json").write_text(json.dumps(frame))
    (tmp_path / "clip_000000000000_rendered.png").write_bytes(b"not read: JSON wins")
    seq = load_poses(tmp_path)
    assert seq.num_frames == 3 and seq.fps == 8.0
    np.testing.assert_allclose(seq.keypoints, kp, atol=1e-4)
    # size from the keypoint extent, rounded up to a multiple of 8
    assert seq.width == math.ceil(kp[..., 0].max() / 8) * 8
    assert seq.height == math.ceil(kp[..., 1].max() / 8) * 8
    seq = load_poses(tmp_path, fps=24, width=512, height=600)
    assert (seq.fps, seq.width, seq.height) == (24.0, 512, 600)


def test_openpose_body25_single_file_maps_to_coco18(tmp_path: Path) -> None:
    coco = _dance(2).keypoints
    frames = []
    for i in range(2):
        body25 = np.zeros((25, 3), dtype=np.float32)
        body25[list(BODY25_TO_COCO18)] = coco[i]
        body25[8] = (256.0, 300.0, 0.9)  # BODY_25 mid-hip: not a COCO-18 joint
        body25[19:] = (250.0, 420.0, 0.8)  # feet
        frames.append(_openpose_frame([body25.ravel().tolist()]))
    path = tmp_path / "body25.json"
    path.write_text(json.dumps(frames))
    seq = load_poses(path, width=512, height=512)
    assert seq.keypoints.shape == (2, NUM_JOINTS, 3)
    np.testing.assert_allclose(seq.keypoints, coco, atol=1e-4)


def test_openpose_frames_without_people_are_all_missing(tmp_path: Path) -> None:
    kp = _dance(1).keypoints[0]
    frames = [
        _openpose_frame([kp.ravel().tolist()]),
        {"version": 1.3, "people": []},
        {"people": [{"pose_keypoints_2d": []}]},
    ]
    path = tmp_path / "three.json"
    path.write_text(json.dumps(frames))
    seq = load_poses(path, width=512, height=512)
    assert seq.num_frames == 3
    assert (seq.keypoints[1:] == 0).all()
    single = tmp_path / "empty_keypoints.json"
    single.write_text(json.dumps(frames[1]))
    empty = load_poses(single)
    assert empty.num_frames == 1 and (empty.keypoints == 0).all()


def test_openpose_normalised_keypoints_with_canvas(tmp_path: Path) -> None:
    kp = _dance(1).keypoints[0].copy()
    kp[:, 0] /= 512
    kp[:, 1] /= 512
    people = [{"pose_keypoints_2d": kp.ravel().tolist()}]
    frame = {"people": people, "canvas_width": 512, "canvas_height": 512}
    path = tmp_path / "aux.json"
    path.write_text(json.dumps(frame))
    seq = load_poses(path)
    assert (seq.width, seq.height) == (512, 512)
    np.testing.assert_allclose(seq.keypoints[0], _dance(1).keypoints[0], atol=1e-3)


# --- render / decode -----------------------------------------------------------------------------


def test_joint_colours_are_hues_twenty_degrees_apart() -> None:
    hsv = cv2.cvtColor(np.array([COLORS], dtype=np.uint8), cv2.COLOR_RGB2HSV)[0]
    np.testing.assert_array_equal(hsv[:, 0], np.arange(NUM_JOINTS) * 10)
    assert (hsv[:, 1:] == 255).all()


def test_render_pose_map_style() -> None:
    kp = _dance(1).keypoints[0]
    img = render_pose_map(kp, 512, 512)
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    assert (img[0, 0] == 0).all()  # black background
    for j in (0, 4, 13):  # joint discs in full colour at the joint
        x, y = round(float(kp[j, 0])), round(float(kp[j, 1]))
        assert tuple(img[y, x]) == COLORS[j]
    a, b = LIMBS[6]  # neck -> right hip, midway: limb colour scaled by 0.6
    mid = (kp[a, :2] + kp[b, :2]) / 2
    assert tuple(img[round(float(mid[1])), round(float(mid[0]))]) == tuple(
        int(c * 0.6) for c in COLORS[6]
    )
    blank = render_pose_map(np.zeros((NUM_JOINTS, 3), np.float32), 64, 32)
    assert blank.shape == (32, 64, 3) and not blank.any()


def test_decode_render_round_trip_png_under_2px() -> None:
    rng = np.random.default_rng(0)
    seq = synthetic_dance(8, 3.0)  # spread over a cycle: arms up, down, crossing
    errors = []
    for kp in seq.keypoints:
        jitter = kp.copy()
        jitter[:, :2] += rng.uniform(-0.5, 0.5, size=(NUM_JOINTS, 2))
        errors.append(_errors(decode_pose_map(render_pose_map(jitter, 512, 512)), jitter))
    assert np.concatenate(errors).mean() <= MAX_MEAN_ERR_PX


def test_decode_keeps_missing_joints_missing() -> None:
    kp = _with_missing(_dance(1), (3, 4, 9, 10, 12, 13, 16)).keypoints[0]
    got = decode_pose_map(render_pose_map(kp, 512, 512))
    assert _errors(got, kp).mean() <= MAX_MEAN_ERR_PX


def test_overlay_pose_blends_only_skeleton_pixels() -> None:
    kp = _dance(1).keypoints[0]
    frame = np.full((512, 512, 3), 100, dtype=np.uint8)
    out = overlay_pose(frame, kp, alpha=0.5)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert (out[0, 0] == 100).all()
    x, y = round(float(kp[0, 0])), round(float(kp[0, 1]))
    np.testing.assert_array_equal(out[y, x], [178, 50, 50])  # 0.5 * 100 + 0.5 * (255, 0, 0)


# --- pose-map media ------------------------------------------------------------------------------


def test_mp4_round_trip(tmp_path: Path) -> None:
    seq = _with_missing(_dance(6), (15, 17))
    path = write_pose_video(seq, tmp_path / "pose.mp4")
    back = load_poses(path)
    assert (back.num_frames, back.fps, back.width, back.height) == (6, 8.0, 512, 512)
    assert _errors(back.keypoints, seq.keypoints).mean() <= MAX_MEAN_ERR_PX


def test_gif_round_trip(tmp_path: Path) -> None:
    seq = _dance(6)
    kp = np.concatenate([seq.keypoints, seq.keypoints[-1:]])  # identical last frames get merged
    seq = PoseSequence(kp, 8.0, 512, 512)
    back = load_poses(write_pose_video(seq, tmp_path / "pose.gif"))
    assert (back.num_frames, back.fps, back.width, back.height) == (7, 8.0, 512, 512)
    assert _errors(back.keypoints, seq.keypoints).mean() <= MAX_MEAN_ERR_PX


def test_foreign_gif_fps_from_frame_delay(tmp_path: Path) -> None:
    frames = [Image.fromarray(f) for f in render_pose_maps(_dance(3, size=(256, 256)))]
    path = tmp_path / "foreign.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
    back = load_poses(path)  # 125 ms is stored as 12 cs = 120 ms; snapped back to 8 fps
    assert back.num_frames == 3 and back.fps == 8.0


def test_png_folder_round_trip_in_natural_order(tmp_path: Path) -> None:
    seq = _dance(3)
    folder = write_pose_video(seq, tmp_path / "frames")
    assert sorted(p.name for p in folder.iterdir())[0] == "frame_000000.png"
    back = load_poses(folder, fps=12)
    assert (back.num_frames, back.fps, back.width, back.height) == (3, 12.0, 512, 512)
    assert _errors(back.keypoints, seq.keypoints).mean() <= MAX_MEAN_ERR_PX
    named = tmp_path / "named"  # f_2 before f_10: natural sort
    named.mkdir()
    for i, img in zip((1, 2, 10), render_pose_maps(seq), strict=True):
        Image.fromarray(img).save(named / f"f_{i}.png")
    np.testing.assert_array_equal(load_poses(named).keypoints, back.keypoints)
    with pytest.raises(PoseError, match="already holds 3 image files"):
        write_pose_video(seq, folder)


def test_mp4_needs_even_size(tmp_path: Path) -> None:
    with pytest.raises(PoseError, match=r"pose\.mp4: .*even size"):
        write_pose_video(_dance(1, size=(511, 512)), tmp_path / "pose.mp4")


def test_convert_json_to_mp4_and_openpose_to_json(tmp_path: Path) -> None:
    src = save_poses_json(_dance(8), tmp_path / "in.json")
    out = convert_poses(src, tmp_path / "out.mp4", fps=4, width=384, height=256)
    assert (out.num_frames, out.fps, out.width, out.height) == (4, 4.0, 384, 256)
    back = load_poses(tmp_path / "out.mp4")
    assert (back.num_frames, back.width, back.height) == (4, 384, 256)
    assert _errors(back.keypoints, out.keypoints).mean() <= MAX_MEAN_ERR_PX
    op = tmp_path / "op.json"
    op.write_text(json.dumps([_openpose_frame([k.ravel().tolist()]) for k in _dance(2).keypoints]))
    conv = convert_poses(op, tmp_path / "op_poses.json", input_width=512, input_height=512)
    assert load_poses(tmp_path / "op_poses.json").num_frames == conv.num_frames == 2


# --- resampling ----------------------------------------------------------------------------------


def _linear(frames: int, fps: float) -> PoseSequence:
    """Every joint moves right 10 px per frame from x = 10 + j, y = 100."""
    kp = np.zeros((frames, NUM_JOINTS, 3), dtype=np.float32)
    kp[..., 0] = 10.0 * np.arange(frames)[:, None] + 10.0 + np.arange(NUM_JOINTS)
    kp[..., 1] = 100.0
    kp[..., 2] = 1.0
    return PoseSequence(kp, fps, 512, 512)


@pytest.mark.parametrize(
    ("frames", "fps_in", "fps_out", "expected"),
    [(16, 8, 16, 32), (16, 8, 4, 8), (16, 8, 6, 12), (16, 8, 30, 60), (1, 8, 2, 1), (3, 24, 8, 1)],
)
def test_resample_fps_frame_counts(
    frames: int, fps_in: float, fps_out: float, expected: int
) -> None:
    out = resample(_linear(frames, fps_in), fps=fps_out)
    assert out.num_frames == expected and out.fps == fps_out
    assert out.keypoints.shape == (expected, NUM_JOINTS, 3) and out.keypoints.dtype == np.float32


def test_resample_fps_interpolates_and_keeps_missing() -> None:
    seq = _linear(4, 8.0)
    kp = seq.keypoints.copy()
    kp[1, 5] = 0.0  # left_shoulder missing in frame 1
    up = resample(PoseSequence(kp, 8.0, 512, 512), fps=16)
    assert up.num_frames == 8
    np.testing.assert_allclose(up.keypoints[1, 0], [15.0, 100.0, 1.0])  # halfway frames 0 and 1
    np.testing.assert_allclose(up.keypoints[5, 3], [38.0, 100.0, 1.0])  # halfway frames 2 and 3
    np.testing.assert_allclose(up.keypoints[1, 5], [0.0, 0.0, 0.0])  # a=0.5 -> nearest is frame 1
    np.testing.assert_allclose(up.keypoints[3, 5], [35.0, 100.0, 1.0])  # frame 1.5 -> frame 2
    np.testing.assert_allclose(up.keypoints[2, 5], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(up.keypoints[7, 0], [40.0, 100.0, 1.0])  # clamped to the last frame
    down = resample(seq, fps=4)
    np.testing.assert_allclose(down.keypoints[:, 0, 0], [10.0, 30.0])


def test_resample_space_keeps_aspect_and_missing() -> None:
    seq = _with_missing(synthetic_dance(2, 8.0, 640, 480), (4,))
    out = resample(seq, width=512, height=512)  # scale 0.8, letterbox 64 px top and bottom
    kp, src = out.keypoints, seq.keypoints
    assert (out.width, out.height, out.num_frames) == (512, 512, 2)
    present = src[..., 2] > 0
    np.testing.assert_allclose(kp[..., 0][present], src[..., 0][present] * 0.8, atol=1e-3)
    np.testing.assert_allclose(kp[..., 1][present], src[..., 1][present] * 0.8 + 64, atol=1e-3)
    assert (kp[:, 4] == 0).all()
    wide = resample(_dance(1), width=1024, height=512)  # same height, 256 px pillarbox each side
    np.testing.assert_allclose(wide.keypoints[..., 0], _dance(1).keypoints[..., 0] + 256, atol=1e-3)
    validate(out)
    validate(wide)


# --- validation and load errors ------------------------------------------------------------------


def _bad(kp_edit: tuple[int, int, int, float] | None = None, **kw: object) -> PoseSequence:
    kp = _dance(3).keypoints.copy()
    if kp_edit is not None:
        f, j, c, v = kp_edit
        kp[f, j, c] = v
    args: dict[str, object] = {"fps": 8.0, "width": 512, "height": 512, "source": "clip.json"}
    args |= kw
    if "keypoints" in args:
        kp = np.asarray(args.pop("keypoints"))
    return PoseSequence(kp, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seq", "match"),
    [
        (_bad(keypoints=np.zeros((0, 18, 3))), r"clip\.json: .*no frames"),
        (_bad(keypoints=np.zeros((2, 17, 3))), r"clip\.json: .*shape \(2, 17, 3\)"),
        (_bad((1, 4, 0, float("nan"))), r"clip\.json: frame 1, joint right_wrist: x is nan"),
        (_bad((2, 13, 1, float("inf"))), r"frame 2, joint left_ankle: y is inf"),
        (_bad((2, 7, 0, 600.0)), r"frame 2, joint left_wrist: \(600\.0, .*outside the 512x512"),
        (_bad((0, 0, 1, -40.0)), r"frame 0, joint nose: .*outside"),
        (_bad((1, 16, 2, 1.5)), r"frame 1, joint right_ear: confidence 1\.5 is outside \[0, 1\]"),
        (_bad((0, 2, 2, -0.1)), r"frame 0, joint right_shoulder: confidence -0\.1"),
        (_bad(fps=0.0), r"clip\.json: fps is 0\.0"),
        (_bad(fps=-8.0), r"fps is -8\.0"),
        (_bad(width=0), r"width is 0"),
    ],
)
def test_validate_errors(seq: PoseSequence, match: str) -> None:
    with pytest.raises(PoseError, match=match):
        validate(seq)


def test_validate_max_frames_and_tolerance() -> None:
    with pytest.raises(PoseError, match=r"clip\.json: 3 frames is more than max_frames=2"):
        validate(_bad(), max_frames=2)
    validate(_bad((0, 7, 0, 514.0)))  # within the small border tolerance
    kp = _dance(1).keypoints.copy()
    kp[0, 3] = (900.0, -50.0, 0.0)  # far out but missing: not checked
    validate(PoseSequence(kp, 8.0, 512, 512))


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PoseError, match=r"nope\.json: no such file"):
        load_poses(tmp_path / "nope.json")
    (tmp_path / "poses.txt").write_text("x")
    with pytest.raises(PoseError, match=r"poses\.txt: unknown pose input type '\.txt'"):
        load_poses(tmp_path / "poses.txt")
    (tmp_path / "bad.json").write_text('{"fps": 8, "frames": [')
    with pytest.raises(PoseError, match=r"bad\.json: invalid JSON at line 1"):
        load_poses(tmp_path / "bad.json")
    (tmp_path / "nofps.json").write_text('{"width": 512, "height": 512, "frames": []}')
    with pytest.raises(PoseError, match=r"nofps\.json: poses\.json lacks fps"):
        load_poses(tmp_path / "nofps.json")
    frames = _dance(2).keypoints.tolist()
    frames[1] = frames[1][:17]
    (tmp_path / "short.json").write_text(
        json.dumps({"fps": 8, "width": 512, "height": 512, "frames": frames})
    )
    with pytest.raises(PoseError, match=r"short\.json: frame 1 has 17 joints"):
        load_poses(tmp_path / "short.json")
    (tmp_path / "op_000000000001_keypoints.json").write_text(
        json.dumps(_openpose_frame([[1.0] * 60]))
    )
    with pytest.raises(PoseError, match=r"op_000000000001_keypoints\.json, person 0: .*60 values"):
        load_poses(tmp_path / "op_000000000001_keypoints.json")
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(PoseError, match=r"broken\.mp4: "):
        load_poses(tmp_path / "broken.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PoseError, match=r"empty: folder holds no OpenPose"):
        load_poses(tmp_path / "empty")
    save_poses_json(_dance(3), tmp_path / "long.json")
    with pytest.raises(PoseError, match=r"long\.json: 3 frames is more than max_frames=2"):
        load_poses(tmp_path / "long.json", max_frames=2)
    write_pose_video(_dance(3, size=(128, 128)), tmp_path / "long.mp4")
    with pytest.raises(PoseError, match=r"long\.mp4: has more than max_frames=2"):
        load_poses(tmp_path / "long.mp4", max_frames=2)
    big = _dance(1).keypoints * np.array([2.0, 2.0, 1.0], np.float32)
    (tmp_path / "big.json").write_text(json.dumps(_openpose_frame([big.ravel().tolist()])))
    with pytest.raises(PoseError, match=r"big\.json: frame 0, joint \w+: .*outside the 512x512"):
        load_poses(tmp_path / "big.json", width=512, height=512)
