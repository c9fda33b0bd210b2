"""Read and write rendered OpenPose pose maps: videos, GIFs and folders of frames.

Reading decodes every frame back to keypoints with :func:`~engine.pose.draw.decode_pose_map`;
writing renders every frame with :func:`~engine.pose.draw.render_pose_map`. Videos go through
imageio-ffmpeg (H.264 yuv420p at CRF 10 when writing, near-lossless for pose maps), GIFs through
Pillow, frame folders are PNG files named ``frame_000000.png`` ...
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from engine.pose.draw import decode_pose_map, render_pose_maps
from engine.pose.frames import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    FrameSource,
    natural_key,
    open_gif,
    open_images,
    open_video,
)
from engine.pose.sequence import PoseError, PoseSequence, validate

__all__ = [
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "decode_source",
    "natural_key",
    "read_pose_frames",
    "read_pose_gif",
    "read_pose_video",
    "write_pose_video",
]
MP4_CRF = 10


def _decode_all(frames: Iterable[np.ndarray], path: Path, max_frames: int) -> np.ndarray:
    """Decode ``(H, W, 3)`` uint8 pose maps to ``(F, 18, 3)`` float32, at most ``max_frames``."""
    out: list[np.ndarray] = []
    for frame in frames:
        if len(out) >= max_frames:
            raise PoseError(
                f"{path}: has more than max_frames={max_frames} frames; trim it or raise max_frames"
            )
        out.append(decode_pose_map(frame))
    if not out:
        raise PoseError(f"{path}: holds no frames; give a pose video with at least one frame")
    return np.stack(out)


def decode_source(
    source: FrameSource, frames: Iterable[np.ndarray] | None = None, *, max_frames: int = 512
) -> PoseSequence:
    """Decode the rendered pose maps of an opened input (``frames``: its frames, default
    ``source.frames``) into a sequence at the source's fps and size."""
    try:
        kp = _decode_all(source.frames if frames is None else frames, source.path, max_frames)
    finally:
        source.close()
    return PoseSequence(
        kp, fps=source.fps, width=source.width, height=source.height, source=str(source.path)
    )


def read_pose_video(path: Path, *, max_frames: int = 512, fps: float = 8.0) -> PoseSequence:
    """Read a pose-map video (.mp4/.webm/.avi/...) with ffmpeg; fps and size come from the file.

    ``fps`` is used only when the file reports none. Returns keypoints ``(F, 18, 3)`` float32.
    """
    return decode_source(open_video(path, fps=fps), max_frames=max_frames)


def read_pose_gif(path: Path, *, max_frames: int = 512, fps: float = 8.0) -> PoseSequence:
    """Read an animated pose-map GIF (frame rate: see :func:`engine.pose.frames.open_gif`).

    Returns keypoints ``(F, 18, 3)`` float32.
    """
    return decode_source(open_gif(path, max_frames=max_frames, fps=fps), max_frames=max_frames)


def read_pose_frames(
    path: Path, files: list[Path], *, max_frames: int = 512, fps: float = 8.0
) -> PoseSequence:
    """Read pose-map image files (already sorted in time order) from the folder ``path``.

    All frames must have the same size. Returns keypoints ``(F, 18, 3)`` float32 at ``fps``.
    """
    if len(files) > max_frames:
        raise PoseError(f"{path}: has {len(files)} frames, more than max_frames={max_frames}")
    return decode_source(open_images(path, files, fps=fps), max_frames=max_frames)


def _write_mp4(seq: PoseSequence, path: Path) -> None:
    if seq.width % 2 or seq.height % 2:
        raise PoseError(
            f"{path}: H.264 yuv420p needs an even size, got {seq.width}x{seq.height}; "
            "resample(seq, width=..., height=...) to even numbers first"
        )
    import imageio_ffmpeg  # here: engine imports this module where it is absent

    writer = imageio_ffmpeg.write_frames(
        str(path),
        (seq.width, seq.height),
        fps=seq.fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        macro_block_size=1,
        quality=None,
        output_params=["-crf", str(MP4_CRF)],
        ffmpeg_log_level="error",
    )
    try:
        writer.send(None)
        for frame in render_pose_maps(seq):
            writer.send(np.ascontiguousarray(frame))
    except (OSError, RuntimeError) as exc:
        raise PoseError(f"{path}: ffmpeg failed writing the video ({exc})") from exc
    finally:
        writer.close()


def _write_gif(seq: PoseSequence, path: Path) -> None:
    images = [Image.fromarray(frame) for frame in render_pose_maps(seq)]
    images[0].save(
        path,
        save_all=True,
        append_images=images[1:],
        duration=round(1000.0 / seq.fps),
        loop=0,
        comment=f"fps={seq.fps:g}".encode(),
    )


def _write_png_folder(seq: PoseSequence, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise PoseError(f"{path}: exists and is not a folder; give a folder path or a .mp4/.gif")
    path.mkdir(parents=True, exist_ok=True)
    old = sorted(p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if old:
        raise PoseError(
            f"{path}: already holds {len(old)} image files (e.g. {old[0]}); they would mix "
            "with the new frames; pick an empty folder or remove them"
        )
    for i, frame in enumerate(render_pose_maps(seq)):
        Image.fromarray(frame).save(path / f"frame_{i:06d}.png")


def write_pose_video(seq: PoseSequence, path: str | Path) -> Path:
    """Render ``seq`` as OpenPose pose maps and write them by the path's extension.

    ``.mp4``: H.264 yuv420p, CRF 10 (needs an even size); ``.gif``: Pillow, frame delay
    ``1000 / fps`` ms (whole centiseconds) plus an ``fps=`` comment; no extension: a folder of
    ``frame_000000.png`` ... (created; must not already hold images). Returns the written path.
    """
    path = Path(path)
    validate(seq, max_frames=max(1, seq.num_frames))
    ext = path.suffix.lower()
    if ext and ext not in (".mp4", ".gif"):
        raise PoseError(
            f"{path}: cannot write pose maps as '{ext}'; use .mp4, .gif, .json or a folder path"
        )
    if ext:
        path.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".mp4":
        _write_mp4(seq, path)
    elif ext == ".gif":
        _write_gif(seq, path)
    else:
        _write_png_folder(seq, path)
    return path
