"""Pose inputs of API requests: type checked by content, written where the server decides.

An upload (or inline JSON) becomes ``ROOT/.uploads/<render id>/poses-<sha256[:16]>.<ext>``:
the folder derives from the id (``.uploads`` cannot be a render id, ids have no dots), the name
from the content, so a repeated request names the same file (idempotent submits compare specs)
and nothing a request sends names a server path. Error messages never show server paths.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cluster.serve.api import ApiError
from engine.files import atomic_write

EXAMPLES = {"dance": Path(__file__).resolve().parents[2] / "examples" / "dance" / "poses.json"}
"""Built-in pose sequences a request can name (``example``)."""


def sniff(data: bytes) -> str:
    """The file extension of a pose upload judged by its content, never its name.

    Raises ApiError 415 for anything but JSON, MP4/MOV, WebM/MKV, AVI or GIF.
    """
    head = data[:64].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] in (b"{", b"["):
        return ".json"
    if data[4:8] == b"ftyp":
        return ".mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return ".mkv"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return ".avi"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    raise ApiError(
        415,
        "unsupported_media_type",
        "the pose upload is neither JSON (poses.json / OpenPose) nor a video (MP4, WebM, AVI, "
        "GIF); convert it with `avatar poses convert`",
        "poses",
    )


def json_bytes(poses: Any) -> bytes:
    """Inline poses as canonical JSON bytes."""
    return json.dumps(poses, sort_keys=True, separators=(",", ":")).encode()


def check_json(data: bytes) -> None:
    """422 unless ``data`` is a JSON object or list."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(
            422, "invalid_poses", f"the pose upload is not valid JSON: {e}", "poses"
        ) from None
    if not isinstance(value, dict | list):
        raise ApiError(
            422, "invalid_poses", "poses JSON must be an object or a list of frames", "poses"
        )


def store_poses(root: Path, render_id: str, data: bytes) -> tuple[Path, bool]:
    """Write the pose input of ``render_id`` → (path, newly written)."""
    ext = sniff(data)
    if ext == ".json":
        check_json(data)
    folder = root / ".uploads" / render_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"poses-{hashlib.sha256(data).hexdigest()[:16]}{ext}"
    if path.is_file():
        return path, False
    atomic_write(path, data)
    return path, True


def public_message(message: str, root: Path) -> str:
    """An error message with server paths under ``root`` replaced by ``poses``."""
    text = message
    for prefix in (str(root / ".uploads"), str(root)):
        while prefix in text:
            start = text.index(prefix)
            end = start + len(prefix)
            while end < len(text) and text[end] not in " :,;'\")":
                end += 1
            text = text[:start] + "poses" + text[end:]
    return text.replace(str(EXAMPLES["dance"].parent), "example")
