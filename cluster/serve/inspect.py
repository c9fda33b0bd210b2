"""What a visual pose upload declares about itself, read from its headers without decoding.

A decoder allocates what a file's header declares (width x height per frame, frame count), not
what its byte size suggests, so the service refuses an upload by its declaration before anything
decodes it: ``limits.max_upload_pixels`` per frame and ``limits.max_upload_frames`` frames (422
naming the cap), and ``limits.max_upload_megapixels`` in all. Parsers here read container structure only (pure Python, bounded by the body
size): GIF (logical screen + every image descriptor), MP4/MOV (``stsd`` visual sample entries and
``stsz`` sample counts), Matroska/WebM (``PixelWidth``/``PixelHeight``), AVI (``avih``).

A header can lie about what the codec stream holds (an H.264 SPS larger than the ``stsd``
entry); that is why uploads are then decoded in a bounded child process
(:mod:`engine.pose.isolated`), whose frame-size check reads what the decoder reports.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cluster.serve.api import ApiError


@dataclass(frozen=True)
class Declared:
    """A visual upload's declared frame size and frame count (None: the container has none)."""

    width: int
    height: int
    frames: int | None


def declared(data: bytes, ext: str) -> Declared:
    """The declaration of an upload of type ``ext`` (``.gif``, ``.mp4``, ``.mkv``, ``.avi``).

    Raises ApiError 422 (field ``poses``) when the header declares no frame size.
    """
    parsers = {".gif": _gif, ".mp4": _mp4, ".mkv": _mkv, ".avi": _avi}
    try:
        found = parsers[ext](data)
    except (struct.error, IndexError, ValueError):
        found = None
    if found is None or found.width < 1 or found.height < 1:
        raise ApiError(
            422, "invalid_poses",
            f"the pose upload ({ext[1:]}) declares no frame size in its header; re-encode it",
            "poses",
        )  # fmt: skip
    return found


def check_declared(
    found: Declared, max_pixels: int, max_frames: int, max_megapixels: int = 1 << 30
) -> None:
    """ApiError 422 naming the cap when ``found`` exceeds ``max_pixels`` per frame,
    ``max_frames`` frames or ``max_megapixels`` million pixels in all."""
    pixels = found.width * found.height
    if pixels > max_pixels:
        raise ApiError(
            422, "upload_too_large",
            f"the pose upload declares {found.width}x{found.height} frames ({pixels} pixels); "
            f"this server decodes at most {max_pixels} pixels per frame "
            "(limits.max_upload_pixels): scale it down",
            "poses",
        )  # fmt: skip
    if found.frames is not None and found.frames > max_frames:
        raise ApiError(
            422, "upload_too_large",
            f"the pose upload declares {found.frames} frames; this server decodes at most "
            f"{max_frames} (limits.max_upload_frames): trim it",
            "poses",
        )  # fmt: skip
    total = pixels * (found.frames or 0)
    if total > max_megapixels * 1_000_000:
        raise ApiError(
            422, "upload_too_large",
            f"the pose upload declares {found.frames} frames of {found.width}x{found.height}, "
            f"{total / 1e6:.0f} million pixels; this server decodes at most {max_megapixels} "
            "million per upload (limits.max_upload_megapixels): shorten or shrink it",
            "poses",
        )  # fmt: skip


def _gif(data: bytes) -> Declared | None:
    width, height, packed = struct.unpack_from("<HHB", data, 6)
    pos = 13 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)
    frames = 0
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then data sub-blocks
            pos = _skip_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # image descriptor
            left, top, w, h, flags = struct.unpack_from("<HHHHB", data, pos + 1)
            width, height = max(width, left + w), max(height, top + h)
            frames += 1
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            pos = _skip_sub_blocks(data, pos + 1)  # after the LZW minimum code size
        else:
            break  # garbage: Pillow stops reading here as well
    return Declared(width, height, frames)


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    while pos < len(data) and data[pos] != 0:
        pos += data[pos] + 1
    return pos + 1


def _boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """ISO BMFF boxes in ``data[start:end]`` → (type, payload start, box end)."""
    out, pos = [], start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < header:
            break
        out.append((kind, pos + header, min(pos + size, end)))
        pos += size
    return out


def _mp4(data: bytes) -> Declared | None:
    width = height = 0
    frames: int | None = None
    stack = [(0, len(data))]
    containers = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}
    while stack:
        start, end = stack.pop()
        for kind, payload, box_end in _boxes(data, start, end):
            if kind in containers:
                stack.append((payload, box_end))
            elif kind == b"stsd":  # version/flags, entry count, then sample entries
                for _, entry, _ in _boxes(data, payload + 8, box_end):
                    w, h = struct.unpack_from(">HH", data, entry + 24)
                    width, height = max(width, w), max(height, h)
            elif kind == b"stsz":
                count = struct.unpack_from(">I", data, payload + 8)[0]
                frames = max(frames or 0, count)
    return Declared(width, height, frames) if width else None


def _ebml_id(data: bytes, pos: int) -> tuple[int, int]:
    first = data[pos]
    length = 1 if first & 0x80 else 2 if first & 0x40 else 3 if first & 0x20 else 4
    return int.from_bytes(data[pos : pos + length], "big"), pos + length


def _ebml_size(data: bytes, pos: int) -> tuple[int | None, int]:
    first = data[pos]
    length = next((i + 1 for i in range(8) if first & (0x80 >> i)), 0)
    if length == 0:
        raise ValueError("bad EBML size")
    value = first & (0xFF >> length)
    for b in data[pos + 1 : pos + length]:
        value = (value << 8) | b
    unknown = value == (1 << (7 * length)) - 1
    return (None if unknown else value), pos + length


def _mkv(data: bytes) -> Declared | None:
    masters = {0x18538067, 0x1654AE6B, 0xAE, 0xE0}  # Segment, Tracks, TrackEntry, Video
    width = height = 0
    stack = [(0, len(data))]
    while stack:
        pos, end = stack.pop()
        while pos < end:
            element, pos = _ebml_id(data, pos)
            size, pos = _ebml_size(data, pos)
            stop = end if size is None else min(pos + size, end)
            if element in masters:
                stack.append((pos, stop))
            elif element in (0xB0, 0xBA):  # PixelWidth, PixelHeight
                value = int.from_bytes(data[pos:stop], "big")
                width, height = (max(width, value), height) if element == 0xB0 else (
                    width, max(height, value))  # fmt: skip
            elif element == 0x1F43B675:  # Cluster: frames follow, the headers are done
                break
            pos = stop
    return Declared(width, height, None) if width else None


def _avi(data: bytes) -> Declared | None:
    at = data.find(b"avih", 12, 4096)
    if at < 0:
        return None
    frames, width, height = struct.unpack_from("<I12xII", data, at + 8 + 16)
    return Declared(width, height, frames)
