"""Pose readers under hostile files: declared sizes refused before decoding (GIF, PNG), Pillow's
bomb error turned into PoseError, detection buffers bounded by bytes, the bounded decoding child
(memory cap, timeout, exact keypoints), and resampling that refuses absurd frame rates."""

from __future__ import annotations

import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hostile import crafted_gif, honest_gif

from engine.pose import PoseError, convert_poses, load_poses, save_poses_json, synthetic_dance
from engine.pose.detect import MAX_SCAN_BYTES, detect_kind
from engine.pose.isolated import load_poses_isolated
from engine.pose.sequence import resample


def _png(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (1-bit grey) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))  # fmt: skip


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(
    ("name", "data", "says"),
    [
        ("big.gif", crafted_gif(5000, 5000, 4), "4096x4096"),  # under Pillow's own bomb limit
        ("bomb.gif", crafted_gif(65535, 65535, 1), "decompression bomb"),
        ("frames/f_0.png", _png(30000, 30000), "decompression bomb"),
        ("frames/f_1.png", _png(5000, 5000), "4096x4096"),
    ],
)
def test_declared_sizes_are_refused_before_decoding(tmp_path: Path, name, data, says):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    before, start = _peak_mb(), time.perf_counter()
    with pytest.raises(PoseError, match=says):
        load_poses(path.parent if name.startswith("frames/") else path, kind="skeleton")
    assert time.perf_counter() - start < 2.0
    assert _peak_mb() - before < 50  # decoding one 5000x5000 frame alone would be 75 MB


def test_detection_holds_bounded_bytes():
    frame = np.zeros((2048, 2048, 3), np.uint8)  # blank: never decides, keeps reading
    detection, read = detect_kind(iter([frame] * 48))
    assert detection.kind is None
    assert sum(f.nbytes for f in read) <= MAX_SCAN_BYTES + frame.nbytes
    assert len(read) < 48


def test_isolated_decoding_is_exact_bounded_and_timed(tmp_path: Path):
    save_poses_json(synthetic_dance(frames=4, fps=8, width=64, height=64), tmp_path / "p.json")
    convert_poses(tmp_path / "p.json", tmp_path / "sk.gif")
    options = {"max_frames": 64, "kind": "auto", "cache_dir": str(tmp_path / "cache")}
    child = load_poses_isolated(tmp_path / "sk.gif", memory_mb=3072, timeout_s=120, **options)
    here = load_poses(tmp_path / "sk.gif", max_frames=64)
    assert np.array_equal(child.keypoints, here.keypoints) and child.fps == here.fps
    assert child.source == str(tmp_path / "sk.gif") and child.info == here.info

    honest_gif(tmp_path / "big.gif", 2048, 24)  # 24 x 12 MiB of RGB frames, plus Python
    with pytest.raises(PoseError, match="decode_memory_mb"):
        load_poses_isolated(tmp_path / "big.gif", memory_mb=600, timeout_s=120, **options)
    start = time.perf_counter()
    with pytest.raises(PoseError, match="decode_timeout_s"):
        load_poses_isolated(tmp_path / "big.gif", memory_mb=3072, timeout_s=0.2, **options)
    assert time.perf_counter() - start < 5.0
    start = time.perf_counter()
    with pytest.raises(PoseError, match="cancelled"):
        load_poses_isolated(tmp_path / "big.gif", memory_mb=3072, timeout_s=120,
                            cancelled=lambda: time.perf_counter() - start > 0.3, **options)  # fmt: skip
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("fps", [5e-324, 1e300])
def test_resampling_refuses_absurd_frame_rates(fps):
    seq = synthetic_dance(frames=16, fps=8, width=64, height=64)
    with pytest.raises(PoseError, match="fps"):
        resample(seq, fps=fps)


def test_gif_frames_held_are_bounded_by_bytes(tmp_path: Path, monkeypatch):
    from engine.pose import frames

    monkeypatch.setattr(frames, "MAX_DECODED_BYTES", 20 << 20)  # 20 MiB: 6 frames of 1024²
    honest_gif(tmp_path / "long.gif", 1024, 12)
    with pytest.raises(PoseError, match="MiB of decoded frames"):
        frames.open_gif(tmp_path / "long.gif")
