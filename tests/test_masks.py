"""Supplied person masks (``masks:``) line up with the poses: natural file order, the poses' fps
resampling and the poses' letterbox, counts checked, errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from engine.config import ConfigError
from engine.method import prepare_poses
from engine.pose import PoseSequence, resample, save_poses_json
from engine.session import CharacterChain, source_frame_index

SOURCE_W, SOURCE_H, SOURCE_FRAMES = 128, 64, 12
"""A landscape pose frame: letterboxed into 64x64 at scale 0.5 with 16-px bars above and below."""


def square(k: int) -> tuple[slice, slice]:
    """Rows, columns of source frame k's marker: an 8x8 square at x = 8k, y = 28."""
    return slice(28, 36), slice(8 * k, 8 * k + 8)


def write_inputs(folder: Path, count: int = SOURCE_FRAMES) -> tuple[Path, Path, Path]:
    """poses.json (12 frames at 12 fps, 128x64; the neck at the centre of frame k's square),
    masks/mask_0.png … mask_{count-1}.png (the squares) and a plate."""
    kp = np.zeros((SOURCE_FRAMES, 18, 3), np.float32)
    for k in range(SOURCE_FRAMES):
        kp[k, 1] = (8 * k + 4, 32, 1.0)  # neck
    poses = folder / "poses.json"
    save_poses_json(PoseSequence(kp, 12.0, SOURCE_W, SOURCE_H), poses)
    masks = folder / "masks"
    masks.mkdir()
    for k in range(count):
        image = np.zeros((SOURCE_H, SOURCE_W), np.uint8)
        image[square(k)] = 255
        Image.fromarray(image).save(masks / f"mask_{k}.png")
    plate = folder / "plate.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(plate)
    return poses, masks, plate


def session_for(tiny_chain, poses: Path, masks: Path, plate: Path, *extra: str):
    config = tiny_config(
        poses,
        "fps=6",
        "alignment.background=true",
        f"plate={plate}",
        f"masks={masks}",
        "chain.mask_dilate=0",
        "chain.mask_feather=0",
        *extra,
    )
    seq = prepare_poses(config)
    plate_image = np.zeros((64, 64, 3), np.uint8)
    return seq, CharacterChain(
        tiny_chain, config, seq.keypoints, prompt="a dancer", negative="", plate=plate_image
    )


def test_masks_follow_the_poses_order_fps_and_letterbox(tiny_chain, tmp_path):
    poses, masks, plate = write_inputs(tmp_path)
    seq, session = session_for(tiny_chain, poses, masks, plate)
    assert seq.num_frames == 6  # 12 frames at 12 fps → 6 at 6 fps: frame i shows source 2i
    for i in range(6):
        k = 2 * i  # mask_10 must be source frame 10, not the third file in string order
        expected = np.zeros((64, 64), np.float32)
        expected[30:34, 4 * k : 4 * k + 4] = 1.0  # x·0.5, y·0.5 + 16 (the poses' letterbox)
        got = session.mask(i)
        assert got is not None and np.array_equal(got, expected), f"frame {i} (source {k})"
        x, y = seq.keypoints[i, 1, :2]  # the resampled neck sits in the middle of its mask
        assert got[int(y), int(x)] == 1.0 and (x, y) == (4 * k + 2, 32)


def test_mask_count_is_checked_and_errors_name_the_file(tiny_chain, tmp_path):
    poses, masks, plate = write_inputs(tmp_path, count=SOURCE_FRAMES - 1)
    with pytest.raises(
        ConfigError, match=r"11 mask images .*mask_0\.png … mask_10\.png.* 12 frames"
    ):
        session_for(tiny_chain, poses, masks, plate)
    Image.fromarray(np.zeros((SOURCE_H, SOURCE_W), np.uint8)).save(masks / "mask_11.png")
    (masks / "mask_3.png").write_bytes(b"not a png")
    _, session = session_for(tiny_chain, poses, masks, plate, "fps=12")
    with pytest.raises(ValueError, match=r"mask_3\.png"):
        session.mask(3)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(masks / "mask_3.png")
    with pytest.raises(ValueError, match=r"mask_3\.png is 64x64 .* 128x64"):
        session.mask(3)


@pytest.mark.parametrize(("frames", "fps_in", "fps_out"), [(12, 12, 6), (5, 10, 4), (7, 8, 20)])
def test_source_frame_index_is_the_pose_resamplers_nearest_frame(frames, fps_in, fps_out):
    """A joint confident only on even (then odd) frames is never interpolated: the resampler
    copies it from the nearest frame, which must be the frame the masks take."""
    index = source_frame_index(frames, fps_in, fps_out)
    for parity in (0, 1):
        kp = np.zeros((frames, 18, 3), np.float32)
        for k in range(parity, frames, 2):
            kp[k, 0] = (k + 1, 1, 1.0)
        out = resample(PoseSequence(kp, fps_in, 64, 64), fps=fps_out).keypoints
        assert len(out) == len(index)
        for i, k in enumerate(index):
            if k % 2 == parity:
                assert out[i, 0, 0] == k + 1, (i, k)
            else:
                assert out[i, 0, 2] == 0.0, (i, k)
