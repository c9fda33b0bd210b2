"""A skeleton preview: the extracted (or decoded) poses drawn over the input video, as an mp4.

For checking an extraction by eye before rendering: every frame of the input with its keypoints
overlaid in the OpenPose style (:func:`~engine.pose.draw.overlay_pose`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.pose.draw import overlay_pose
from engine.pose.frames import open_frames
from engine.pose.sequence import PoseError, PoseSequence

PREVIEW_CRF = 18


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad an odd-sized frame with one black row/column (H.264 yuv420p needs even sizes)."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)))


def write_preview(src: Path, seq: PoseSequence, dst: Path, *, max_frames: int = 512) -> Path:
    """Write ``dst`` (.mp4): each frame of the visual input ``src`` with ``seq``'s pose on it.

    Args:
        src: the video / GIF / image folder ``seq`` was loaded from.
        seq: keypoints in ``src``'s pixel frame, one per frame of ``src`` (before any resample).
        dst: an ``.mp4`` path (H.264, CRF 18, ``seq.fps``); parent folders are created.

    Raises:
        PoseError: ``dst`` is not .mp4, or ``seq`` does not match ``src`` (size or frame count).
    """
    dst = Path(dst)
    if dst.suffix.lower() != ".mp4":
        raise PoseError(f"{dst}: the preview is written as .mp4; give a path ending in .mp4")
    source = open_frames(Path(src), max_frames=max_frames, fps=seq.fps)
    if (source.width, source.height) != (seq.width, seq.height):
        source.close()
        raise PoseError(
            f"{src}: is {source.width}x{source.height} but the poses are in a "
            f"{seq.width}x{seq.height} frame; preview the poses before resampling them"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    size = (seq.width + seq.width % 2, seq.height + seq.height % 2)
    import imageio_ffmpeg  # here: engine imports this module where it is absent

    writer = imageio_ffmpeg.write_frames(
        str(dst),
        size,
        fps=seq.fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        macro_block_size=1,
        quality=None,
        output_params=["-crf", str(PREVIEW_CRF)],
        ffmpeg_log_level="error",
    )
    count = 0
    try:
        writer.send(None)
        for frame, kp in zip(source.frames, seq.keypoints, strict=False):
            writer.send(np.ascontiguousarray(_even(overlay_pose(frame, kp))))
            count += 1
    except (OSError, RuntimeError) as exc:
        raise PoseError(f"{dst}: ffmpeg failed writing the preview ({exc})") from exc
    finally:
        writer.close()
        source.close()
    if count != seq.num_frames:
        raise PoseError(
            f"{src}: has {count} frames but the poses have {seq.num_frames}; preview the poses "
            "before resampling them in time"
        )
    return dst
