"""Video and image output: a streaming H.264 writer, a probe, PNG and contact-sheet helpers.

Frames are encoded one at a time (PyAV's libx264, in process), so memory does not grow with the
number of frames; videos are read back through ffmpeg (the static build inside imageio-ffmpeg's
wheel).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image

from engine.files import replace_with, temp_sibling


class VideoWriter:
    """Streams (H, W, 3) uint8 RGB frames into an H.264 / yuv420p mp4 at a fixed fps.

    Encoded in this process by PyAV's libx264 (no ffmpeg process per video: starting one cost
    ≈0.2 s, ten times the whole encode of a 20-frame 64² video, and it was the tail of every
    render). The file is written under a temporary name and moved into place on :meth:`close`.
    """

    def __init__(self, path: Path, *, fps: float, width: int, height: int, crf: int = 18):
        if width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs even frame sizes, got {width}x{height}")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.path = Path(path)
        self.size = (width, height)
        self.frames = 0
        self._tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        import av  # here, not at import: engine.core imports this module on machines without it

        container = av.open(
            str(self._tmp), mode="w", format="mp4", options={"movflags": "+faststart"}
        )
        try:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # One encoder thread: finishers encode several videos side by side, and x264's own
            # threads cost more than they gain on short clips (64², 8 frames: 9 vs 14 ms); the
            # bytes then do not depend on the machine's core count either.
            stream.options = {"crf": str(crf), "threads": "1"}
        except BaseException:
            container.close()
            self._tmp.unlink(missing_ok=True)
            raise
        self._container: Any = container
        self._stream: Any = stream

    def write(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame."""
        if self._container is None:
            raise RuntimeError("write() after close()")
        if frame.shape != (self.size[1], self.size[0], 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"frame {self.frames}: expected ({self.size[1]}, {self.size[0]}, 3) uint8, "
                f"got {frame.shape} {frame.dtype}"
            )
        import av

        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        picture.pts = self.frames
        self._container.mux(self._stream.encode(picture))
        self.frames += 1

    def close(self) -> None:
        """Finish the file and move it into place (atomic: a reader never sees a partial mp4)."""
        if self._container is not None:
            try:
                self._container.mux(self._stream.encode(None))  # flush the encoder
            finally:
                self._container.close()
                self._container = None
            replace_with(self._tmp, self.path)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        elif self._container is not None:
            self._container.close()
            self._container = None
            self._tmp.unlink(missing_ok=True)


def probe_video(path: Path) -> dict[str, Any]:
    """Read a video back: {"frames", "fps", "width", "height", "codec", "pix_fmt"} (decodes it)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frames = sum(1 for _ in reader)
    width, height = meta["size"]
    return {
        "frames": frames,
        "fps": float(meta["fps"]),
        "width": int(width),
        "height": int(height),
        "codec": str(meta.get("codec", "")),
        "pix_fmt": str(meta.get("pix_fmt", "")),
    }


def read_video_frames(path: Path) -> Iterable[np.ndarray]:
    """Yield the frames of a video as (H, W, 3) uint8 RGB."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    for buf in reader:
        yield np.frombuffer(buf, np.uint8).reshape(height, width, 3)


def save_png(image: np.ndarray, path: Path) -> None:
    """Write (H, W, 3) or (H, W) uint8 atomically (write a temporary file, then rename)."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        replace_with(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_png(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).copy()


def contact_sheet(images: Sequence[np.ndarray], labels: Sequence[str] | None = None) -> np.ndarray:
    """Tile (H, W, 3) uint8 images in a near-square grid with 2 px gaps → (H', W', 3) uint8."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    h, w, _ = images[0].shape
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    gap = 2
    sheet = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        sheet[y : y + h, x : x + w] = img
        if labels is not None:
            _label(sheet, labels[i], x + 2, y + 2, scale=max(0.3, w / 512))
    return sheet


def _label(image: np.ndarray, text: str, x: int, y: int, scale: float) -> None:
    import cv2

    size, _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    org = (x, y + size[1])
    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 2, cv2.LINE_AA)
    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
