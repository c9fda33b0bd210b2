"""Read and write rendered OpenPose pose maps: videos, GIFs and folders of frames.

Reading decodes every frame back to keypoints with :func:`~engine.pose.draw.decode_pose_map`;
writing renders every frame with :func:`~engine.pose.draw.render_pose_map`. Videos go through
imageio-ffmpeg (H.264 yuv420p at CRF 10 when writing, near-lossless for pose maps), GIFs through
Pillow, frame folders are PNG files named ``frame_000000.png`` ...
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from engine.pose.draw import decode_pose_map, render_pose_maps
from engine.pose.sequence import PoseError, PoseSequence, validate

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mov", ".mkv")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
MP4_CRF = 10
# GIF delays are whole centiseconds; these frame rates are preferred when snapping a delay back.
_COMMON_FPS = (8, 10, 12, 16, 24, 25, 30, 15, 20, 6, 5, 4, 2, 1)
_GIF_FPS_COMMENT = re.compile(rb"fps=([0-9.]+)")


def natural_key(name: str) -> list[object]:
    """Sort key that orders ``frame_2.png`` before ``frame_10.png``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


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


def read_pose_video(path: Path, *, max_frames: int = 512, fps: float = 8.0) -> PoseSequence:
    """Read a pose-map video (.mp4/.webm/.avi/...) with ffmpeg; fps and size come from the file.

    ``fps`` is used only when the file reports none. Returns keypoints ``(F, 18, 3)`` float32.
    """
    try:
        gen = imageio_ffmpeg.read_frames(str(path))
        meta = next(gen)
    except (OSError, RuntimeError, StopIteration) as exc:
        raise PoseError(
            f"{path}: ffmpeg cannot read it as a video ({exc}); check the file"
        ) from exc
    try:
        width, height = (int(v) for v in meta["size"])
        file_fps = float(meta.get("fps") or 0.0)

        def frames() -> Iterator[np.ndarray]:
            for buf in gen:
                yield np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3)

        kp = _decode_all(frames(), path, max_frames)
    except PoseError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        raise PoseError(f"{path}: decoding the video failed ({exc}); check the file") from exc
    finally:
        gen.close()
    use_fps = file_fps if file_fps > 0 else fps
    return PoseSequence(kp, fps=use_fps, width=width, height=height, source=str(path))


def _gif_fps(base_ms: int) -> float:
    """Frame rate for a GIF frame delay in ms, undoing the centisecond rounding of common rates."""
    if 1000 % base_ms == 0:
        return float(1000 // base_ms)
    for fps in _COMMON_FPS:
        exact_cs = 100.0 / fps
        if base_ms in (int(exact_cs) * 10, round(exact_cs) * 10):
            return float(fps)
    return 1000.0 / base_ms


def read_pose_gif(path: Path, *, max_frames: int = 512, fps: float = 8.0) -> PoseSequence:
    """Read an animated pose-map GIF.

    The frame rate is our ``fps=`` comment when present, else from the shortest frame delay
    (snapped to a common rate; ``fps`` if the GIF has no delays). Frames shown for several delays
    (Pillow merges identical frames) are repeated. Returns keypoints ``(F, 18, 3)`` float32.
    """
    frames: list[np.ndarray] = []
    delays: list[int] = []
    try:
        with Image.open(path) as im:
            comment = _GIF_FPS_COMMENT.search(im.info.get("comment", b"") or b"")
            for frame in ImageSequence.Iterator(im):
                if len(frames) >= max_frames:
                    raise PoseError(f"{path}: has more than max_frames={max_frames} frames")
                delays.append(int(frame.info.get("duration", 0) or 0))
                frames.append(np.asarray(frame.convert("RGB")))
    except (OSError, UnidentifiedImageError) as exc:
        raise PoseError(f"{path}: Pillow cannot read it as a GIF ({exc}); check the file") from exc
    positive = [d for d in delays if d > 0]
    base = min(positive) if positive else 0
    if comment:
        fps = float(comment.group(1))
    elif base:
        fps = _gif_fps(base)
    repeats = [max(1, round(d / base)) if base else 1 for d in delays]
    expanded = [f for f, r in zip(frames, repeats, strict=True) for _ in range(r)]
    kp = _decode_all(expanded, path, max_frames)
    height, width = frames[0].shape[:2]
    return PoseSequence(kp, fps=fps, width=width, height=height, source=str(path))


def read_pose_frames(
    path: Path, files: list[Path], *, max_frames: int = 512, fps: float = 8.0
) -> PoseSequence:
    """Read pose-map image files (already sorted in time order) from the folder ``path``.

    All frames must have the same size. Returns keypoints ``(F, 18, 3)`` float32 at ``fps``.
    """
    if len(files) > max_frames:
        raise PoseError(f"{path}: has {len(files)} frames, more than max_frames={max_frames}")
    size: tuple[int, int] | None = None
    images: list[np.ndarray] = []
    for file in files:
        try:
            with Image.open(file) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise PoseError(f"{file}: cannot read it as an image ({exc}); check the file") from exc
        if size is None:
            size = (rgb.shape[1], rgb.shape[0])
        elif (rgb.shape[1], rgb.shape[0]) != size:
            raise PoseError(
                f"{file}: is {rgb.shape[1]}x{rgb.shape[0]} but {files[0].name} is "
                f"{size[0]}x{size[1]}; all frames must have the same size"
            )
        images.append(rgb)
    kp = _decode_all(images, path, max_frames)
    assert size is not None
    return PoseSequence(kp, fps=fps, width=size[0], height=size[1], source=str(path))


def _write_mp4(seq: PoseSequence, path: Path) -> None:
    if seq.width % 2 or seq.height % 2:
        raise PoseError(
            f"{path}: H.264 yuv420p needs an even size, got {seq.width}x{seq.height}; "
            "resample(seq, width=..., height=...) to even numbers first"
        )
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
