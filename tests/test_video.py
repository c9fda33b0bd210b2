"""The H.264 writer (PyAV's libx264, in process): what it writes reads back through ffmpeg with
the frames, rate, size and pixel format asked for; the file is in place only once complete."""

from __future__ import annotations

import numpy as np
import pytest

from engine.video import VideoWriter, probe_video, read_video_frames


def gradient(index: int, width: int = 64, height: int = 48) -> np.ndarray:
    """A smooth frame (H.264 at CRF 18 keeps it within a few grey levels)."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([x * 3 + index * 5, y * 4, (x + y + index * 9) % 256], axis=-1)
    return (frame % 256).astype(np.uint8)


@pytest.mark.parametrize("fps", [8.0, 30000 / 1001])
def test_round_trip(tmp_path, fps):
    path = tmp_path / "video.mp4"
    frames = [gradient(i) for i in range(12)]
    with VideoWriter(path, fps=fps, width=64, height=48, crf=18) as video:
        for frame in frames:
            video.write(frame)
        assert not path.exists(), "the mp4 must appear only when complete"
    info = probe_video(path)
    assert info["frames"] == 12 and (info["width"], info["height"]) == (64, 48)
    assert info["fps"] == pytest.approx(fps, abs=0.01)
    assert info["codec"].startswith("h264") and info["pix_fmt"].startswith("yuv420p")
    back = list(read_video_frames(path))
    errors = [
        np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(back, frames, strict=True)
    ]
    assert max(errors) < 4.0, f"mean abs error per frame {errors}"
    data = path.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat"), "+faststart: the index precedes the data"
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]


def test_bad_frame_names_it_and_leaves_nothing(tmp_path):
    path = tmp_path / "video.mp4"
    wrong = r"frame 1: expected \(48, 64, 3\) uint8"
    with pytest.raises(ValueError, match=wrong), VideoWriter(path, fps=8, width=64, height=48) as v:
        v.write(gradient(0))
        v.write(gradient(1, width=32))
    assert list(tmp_path.iterdir()) == [], "a failed video leaves no file, partial or final"
    with pytest.raises(ValueError, match="even frame sizes"):
        VideoWriter(path, fps=8, width=63, height=48)
    with pytest.raises(ValueError, match="fps must be > 0"):
        VideoWriter(path, fps=0, width=64, height=48)
