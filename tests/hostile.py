"""A hostile-upload corpus, built at test time: ``python tests/hostile.py OUT_DIR``.

Run as a child process so building it (Pillow and ffmpeg allocate the frames they encode) never
shows in the memory the tests measure. Writes ``OUT_DIR/<name>`` files and ``OUT_DIR/index.json``
mapping each name to what the service must answer: ``refuse`` (4xx at once, from the header) or
``accept`` (202 at once; decoded later in the bounded child, the render then fails or finishes).

Decode bombs: GIFs declaring 10000x10000 and 65535x65535 frames in a few hundred bytes (crafted
headers), honest GIFs and videos (mp4, webm, avi) of large blank frames (small files, big
decodes), an APNG bomb, and an image folder's worth of PNG bombs (engine-side readers).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
from PIL import Image


def crafted_gif(width: int, height: int, frames: int) -> bytes:
    """A GIF whose screen and image descriptors declare ``width`` x ``height`` but whose pixel
    data is one clear code and an end code (a decoder still allocates the declared frames)."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0))
    out += b"\x00\x00\x00\xff\xff\xff"  # a 2-colour global table
    for _ in range(frames):
        out += b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # graphic control: 100 ms
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
        out += b"\x02\x02\x4c\x01\x00"  # min code size 2; clear + end codes
    return bytes(out + b"\x3b")


def honest_gif(path: Path, side: int, frames: int) -> None:
    """A real GIF of ``frames`` near-blank ``side``² frames (each differs by one pixel)."""
    images = []
    for i in range(frames):
        im = Image.new("P", (side, side), 0)
        im.putpalette([0, 0, 0, 255, 255, 255])
        im.putpixel((i % side, 0), 1)
        images.append(im)
    images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0)


def video(path: Path, side: int, frames: int, codec: list[str]) -> None:
    """``frames`` black ``side``² frames encoded by ffmpeg with ``codec`` options."""
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    src = f"color=black:s={side}x{side}:r=8:d={frames / 8}"
    cmd = [ffmpeg, "-loglevel", "error", "-y", "-f", "lavfi", "-i", src, *codec, str(path)]
    subprocess.run(cmd, check=True, timeout=300)


def apng_bomb(path: Path) -> None:
    """A PNG whose IHDR declares 30000x30000 (a handful of bytes of data)."""
    im = Image.new("1", (30000, 30000), 0)
    im.save(path, optimize=True)


def build(out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, str] = {}
    (out / "gif-10000.gif").write_bytes(crafted_gif(10000, 10000, 4))
    (out / "gif-65535.gif").write_bytes(crafted_gif(65535, 65535, 1))
    (out / "gif-frames.gif").write_bytes(crafted_gif(64, 64, 5000))
    (out / "gif-megapixels.gif").write_bytes(crafted_gif(2048, 2048, 100))  # 419 Mpx in all
    index.update({"gif-10000.gif": "refuse", "gif-65535.gif": "refuse"})
    index["gif-frames.gif"] = index["gif-megapixels.gif"] = "refuse"
    honest_gif(out / "gif-2048x12.gif", 2048, 12)
    index["gif-2048x12.gif"] = "accept"
    x264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    video(out / "mp4-4096.mp4", 4096, 4, x264)
    video(out / "mp4-2048x8.mp4", 2048, 8, x264)
    index.update({"mp4-4096.mp4": "refuse", "mp4-2048x8.mp4": "accept"})
    vp8 = ["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "100k"]
    video(out / "webm-4096.webm", 4096, 2, vp8)
    video(out / "avi-4096.avi", 4096, 2, ["-c:v", "mjpeg", "-q:v", "31"])
    index.update({"webm-4096.webm": "refuse", "avi-4096.avi": "refuse"})
    apng_bomb(out / "apng-30000.png")
    index["apng-30000.png"] = "refuse"
    folder = out / "png-folder"
    folder.mkdir(exist_ok=True)
    for i in range(3):
        (folder / f"frame_{i}.png").write_bytes((out / "apng-30000.png").read_bytes())
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index


if __name__ == "__main__":
    build(Path(sys.argv[1]))
