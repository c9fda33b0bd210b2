"""Read the frames of a video, an animated GIF, an image or a folder of images, as RGB arrays.

One reader for both uses of a visual pose input: decoding a rendered skeleton back to keypoints
(:mod:`engine.pose.video`) and estimating poses on a driving RGB video (:mod:`engine.pose.extract`).
Videos go through imageio-ffmpeg and are streamed (a long 1080p video is never held in memory);
GIFs through Pillow; folders are read in natural order (``frame_2`` before ``frame_10``).

Every reader checks the frame size a file declares before decoding a pixel: more than
:data:`MAX_PIXELS` per frame raises :class:`PoseError` naming the size and the cap, and a GIF's
decoded frames are held only up to :data:`MAX_DECODED_BYTES`. Pillow's own decompression-bomb
limit is set here deliberately to the same cap (``Image.MAX_IMAGE_PIXELS``; Pillow refuses past
twice it) as a backstop. These bound a decode's memory; for untrusted files decode in a bounded
child process as well (:mod:`engine.pose.isolated`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from engine.pose.sequence import PoseError

log = logging.getLogger(__name__)
MAX_PIXELS = 4096 * 4096
"""Largest frame (width x height) any reader decodes; a 4096x4096 RGB frame is 48 MiB."""
MAX_DECODED_BYTES = 1 << 30
"""Most bytes of decoded RGB frames a GIF reader holds at once."""
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow warns past it and raises past twice it
VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mov", ".mkv")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
# GIF delays are whole centiseconds; these frame rates are preferred when snapping a delay back.
_COMMON_FPS = (8, 10, 12, 16, 24, 25, 30, 15, 20, 6, 5, 4, 2, 1)
_GIF_FPS_COMMENT = re.compile(rb"fps=([0-9.]+)")


def natural_key(name: str) -> list[object]:
    """Sort key that orders ``frame_2.png`` before ``frame_10.png``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


@dataclass
class FrameSource:
    """An opened visual input: its size, frame rate and a one-pass iterator over its frames.

    Attributes:
        path: the file or folder, named in errors.
        fps: frames per second (the file's, else the caller's default).
        width, height: frame size in pixels.
        frames: yields ``(height, width, 3)`` uint8 RGB arrays in time order, once.
        files: the image files of a folder input (time order), else ``[path]``.
    """

    path: Path
    fps: float
    width: int
    height: int
    frames: Iterator[np.ndarray]
    files: list[Path] = field(default_factory=list)

    def close(self) -> None:
        """Stop reading (ends an ffmpeg process early)."""
        close = getattr(self.frames, "close", None)
        if close is not None:
            close()

    def content_hash(self) -> str:
        """sha256 over the bytes of the input file(s) (and folder file names), for caches."""
        digest = hashlib.sha256()
        for file in self.files or [self.path]:
            if self.path.is_dir():
                digest.update(file.name.encode() + b"\0")
            with file.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        return digest.hexdigest()


def limit_frames(frames: Iterator[np.ndarray], path: Path, max_frames: int) -> Iterator[np.ndarray]:
    """Pass ``frames`` through, raising :class:`PoseError` past ``max_frames`` or when empty."""
    count = 0
    try:
        for frame in frames:
            if count >= max_frames:
                raise PoseError(
                    f"{path}: has more than max_frames={max_frames} frames; trim it or raise "
                    "max_frames"
                )
            count += 1
            yield frame
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()
    if count == 0:
        raise PoseError(f"{path}: holds no frames; give a video with at least one frame")


def check_size(path: Path, width: int, height: int) -> None:
    """:class:`PoseError` unless a ``width`` x ``height`` frame is within :data:`MAX_PIXELS`."""
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise PoseError(
            f"{path}: declares {width}x{height} frames; pose inputs may have at most "
            f"{MAX_PIXELS} pixels per frame (4096x4096): scale it down"
        )


def _ffmpeg_reason(exc: BaseException) -> str:
    """ffmpeg's last error line, without its version/build banner or file paths (logged whole)."""
    log.info("ffmpeg: %s", exc)
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        low = line.lower()
        if not any(w in low for w in ("version", "configuration", "built with", "lib")):
            return re.sub(r"(?<![\w.])/[\w.@+/-]+", "<file>", line)[:200]
    return "unreadable"


def open_video(path: Path, *, fps: float = 8.0) -> FrameSource:
    """Open a video (.mp4/.webm/...) with ffmpeg; ``fps`` is used only when the file has none.

    The frame size from the header is checked (:func:`check_size`) before a frame is decoded.
    """
    import imageio_ffmpeg  # here: engine imports this module where it is absent

    try:
        gen = imageio_ffmpeg.read_frames(str(path))
        meta = next(gen)
        width, height = (int(v) for v in meta["size"])
    except (OSError, RuntimeError, StopIteration, KeyError, ValueError) as exc:
        raise PoseError(
            f"{path}: ffmpeg cannot read it as a video ({_ffmpeg_reason(exc)}); check the file"
        ) from None
    try:
        check_size(path, width, height)
    except PoseError:
        gen.close()
        raise
    file_fps = float(meta.get("fps") or 0.0)

    def frames() -> Iterator[np.ndarray]:
        try:
            for buf in gen:
                yield np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3)
        except (OSError, RuntimeError, ValueError) as exc:
            raise PoseError(
                f"{path}: decoding the video failed ({_ffmpeg_reason(exc)}); check the file"
            ) from None
        finally:
            gen.close()

    use_fps = file_fps if file_fps > 0 else fps
    return FrameSource(path, use_fps, width, height, frames(), [path])


def _gif_fps(base_ms: int) -> float:
    """Frame rate for a GIF frame delay in ms, undoing the centisecond rounding of common rates."""
    if 1000 % base_ms == 0:
        return float(1000 // base_ms)
    for fps in _COMMON_FPS:
        exact_cs = 100.0 / fps
        if base_ms in (int(exact_cs) * 10, round(exact_cs) * 10):
            return float(fps)
    return 1000.0 / base_ms


def open_gif(path: Path, *, max_frames: int = 512, fps: float = 8.0) -> FrameSource:
    """Open an animated GIF (read whole: GIFs are small).

    The frame rate is our ``fps=`` comment when present, else from the shortest frame delay
    (snapped to a common rate; ``fps`` if the GIF has no delays). Frames shown for several delays
    (Pillow merges identical frames) are repeated.
    """
    frames: list[np.ndarray] = []
    delays: list[int] = []
    try:
        with Image.open(path) as im:
            check_size(path, *im.size)
            budget = MAX_DECODED_BYTES // (im.size[0] * im.size[1] * 3)
            comment = _GIF_FPS_COMMENT.search(im.info.get("comment", b"") or b"")
            for frame in ImageSequence.Iterator(im):
                if len(frames) >= max_frames:
                    raise PoseError(f"{path}: has more than max_frames={max_frames} frames")
                if len(frames) >= budget:
                    raise PoseError(
                        f"{path}: {im.size[0]}x{im.size[1]} x more than {budget} frames exceed "
                        f"{MAX_DECODED_BYTES >> 20} MiB of decoded frames; shorten or shrink it"
                    )
                delays.append(int(frame.info.get("duration", 0) or 0))
                frames.append(np.asarray(frame.convert("RGB")))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise PoseError(f"{path}: Pillow cannot read it as a GIF ({exc}); check the file") from None
    if not frames:
        raise PoseError(f"{path}: holds no frames; give a GIF with at least one frame")
    positive = [d for d in delays if d > 0]
    base = min(positive) if positive else 0
    if comment:
        fps = float(comment.group(1))
    elif base:
        fps = _gif_fps(base)
    repeats = [max(1, round(d / base)) if base else 1 for d in delays]
    expanded = [f for f, r in zip(frames, repeats, strict=True) for _ in range(r)]
    height, width = frames[0].shape[:2]
    return FrameSource(path, fps, width, height, iter(expanded), [path])


def _read_image(file: Path) -> np.ndarray:
    """One image as ``(H, W, 3)`` uint8 RGB; its declared size is checked before decoding."""
    try:
        with Image.open(file) as im:
            check_size(file, *im.size)
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise PoseError(f"{file}: cannot read it as an image ({exc}); check the file") from None


def open_images(path: Path, files: list[Path], *, fps: float = 8.0) -> FrameSource:
    """Open image files (already sorted in time order) of the folder ``path``; read lazily.

    All frames must have the same size (checked as they are read; the error names the file).
    """
    if not files:
        raise PoseError(f"{path}: holds no .png/.jpg frames; point at the folder with the frames")
    first = _read_image(files[0])
    height, width = first.shape[:2]

    def frames() -> Iterator[np.ndarray]:
        yield first
        for file in files[1:]:
            rgb = _read_image(file)
            if rgb.shape[:2] != (height, width):
                raise PoseError(
                    f"{file}: is {rgb.shape[1]}x{rgb.shape[0]} but {files[0].name} is "
                    f"{width}x{height}; all frames must have the same size"
                )
            yield rgb

    return FrameSource(path, fps, width, height, frames(), list(files))


def open_frames(path: Path, *, max_frames: int = 512, fps: float = 8.0) -> FrameSource:
    """Open any visual input: a video, a GIF, one image, or a folder of images.

    Args:
        path: the input; a folder is read as its ``.png/.jpg`` files in natural order.
        max_frames: reading more frames than this raises :class:`PoseError`.
        fps: frame rate for inputs that carry none (images, videos without a rate).

    Returns:
        A :class:`FrameSource` whose iterator enforces ``max_frames`` and non-emptiness.
    """
    ext = path.suffix.lower()
    if path.is_dir():
        files = sorted(
            (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS),
            key=lambda p: natural_key(p.name),
        )
        if len(files) > max_frames:
            raise PoseError(f"{path}: has {len(files)} frames, more than max_frames={max_frames}")
        source = open_images(path, files, fps=fps)
    elif ext in VIDEO_EXTS:
        source = open_video(path, fps=fps)
    elif ext == ".gif":
        source = open_gif(path, max_frames=max_frames, fps=fps)
    elif ext in IMAGE_EXTS:
        source = open_images(path, [path], fps=fps)
    else:
        known = ", ".join((*VIDEO_EXTS, ".gif", *IMAGE_EXTS))
        raise PoseError(f"{path}: not a video or image ('{ext}'); give one of {known} or a folder")
    source.frames = limit_frames(source.frames, path, max_frames)
    return source
