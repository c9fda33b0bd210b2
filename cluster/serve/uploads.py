"""Pose inputs of API requests: type checked by content, refused by declared size before any
decoding, written where the server decides.

An upload (or inline JSON) becomes ``ROOT/.uploads/<render id>/poses-<sha256[:16]>.<ext>``:
the folder derives from the id (``.uploads`` cannot be a render id, ids have no dots), the name
from the content, so a repeated request names the same file (idempotent submits compare specs)
and nothing a request sends names a server path. Error messages never show server paths.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.serve.api import ApiError, RenderRequest
from cluster.serve.config import LimitConfig
from cluster.serve.inspect import Declared, check_declared, declared
from engine.files import atomic_write

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays/objects a request or pose JSON may have (poses need 4)."""

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


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                children = item.values() if isinstance(item, dict) else item
                stack.extend((c, depth + 1) for c in children)
    return deepest


def parse_json(raw: bytes, field: str, status: int = 422, code: str = "invalid_poses") -> Any:
    """``raw`` parsed as JSON, else ApiError naming ``field``: not JSON, nested deeper than
    :data:`MAX_JSON_DEPTH`, or a number Python will not convert (over 4300 digits)."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(status, code, f"{field} is not valid JSON: {e}", field) from None
    except RecursionError:
        value = None
        depth = MAX_JSON_DEPTH + 1
    except ValueError:  # int('9' * 5000)
        raise ApiError(
            status, code, f"{field} holds a number with more than 4300 digits", field
        ) from None
    else:
        depth = json_depth(value)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(
            status, code, f"{field} is nested deeper than {MAX_JSON_DEPTH} levels", field
        )
    return value


@dataclass(frozen=True)
class PoseInput:
    """A request's pose input: its bytes (canonical for JSON), type and declared size."""

    data: bytes
    ext: str
    declared: Declared | None
    """Frame size and count from the headers (None for JSON)."""

    def frames_estimate(self, max_frames: int) -> int:
        """Frames a quota charges before decoding: the declared count, capped at max_frames."""
        known = self.declared.frames if self.declared is not None else None
        return min(max_frames, known) if known else max_frames


def pose_input(data: bytes, limits: LimitConfig) -> PoseInput:
    """Check an upload (or inline poses' bytes) by content: JSON is parsed and made canonical
    (the same poses inline or uploaded are one request), a video's declaration is checked
    against ``limits.max_upload_*`` (422 naming the limit) before anything decodes it."""
    ext = sniff(data)
    if ext == ".json":
        value = parse_json(data, "poses")
        if not isinstance(value, dict | list):
            raise ApiError(
                422, "invalid_poses", "poses JSON must be an object or a list of frames", "poses"
            )
        return PoseInput(json_bytes(value), ext, None)
    found = declared(data, ext)
    check_declared(
        found, limits.max_upload_pixels, limits.max_upload_frames, limits.max_upload_megapixels
    )
    return PoseInput(data, ext, found)


def request_poses(req: RenderRequest, upload: bytes | None, limits: LimitConfig) -> PoseInput:
    """The pose input of a request: exactly one of inline poses, an example or an upload (422
    naming ``body.poses`` otherwise), checked by :func:`pose_input`."""
    given = [n for n, v in (("poses", req.poses), ("example", req.example), ("upload", upload))
             if v is not None]  # fmt: skip
    if len(given) != 1:
        raise ApiError(
            422, "poses",
            f"give exactly one of inline poses, an example or a pose upload (got {given})",
            "body.poses",
        )  # fmt: skip
    if req.example is not None:
        if req.example not in EXAMPLES:
            raise ApiError(
                422, "unknown_example",
                f"example {req.example!r} does not exist; choose one of {sorted(EXAMPLES)}",
                "body.example",
            )  # fmt: skip
        data = EXAMPLES[req.example].read_bytes()
    elif upload is not None:
        if not upload:
            raise ApiError(422, "poses", "the pose upload is empty", "poses")
        data = upload
    else:
        data = json_bytes(req.poses)
    return pose_input(data, limits)


def store_poses(root: Path, render_id: str, poses: PoseInput) -> tuple[Path, bool]:
    """Write the pose input of ``render_id`` → (path, newly written)."""
    folder = root / ".uploads" / render_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"poses-{hashlib.sha256(poses.data).hexdigest()[:16]}{poses.ext}"
    if path.is_file():
        return path, False
    atomic_write(path, poses.data)
    return path, True


def public_message(message: str, root: Path) -> str:
    """An error message fit for a client: server paths under ``root`` become ``poses``, any other
    absolute path ``<file>``, and only its first line is kept (no tracebacks, no banners)."""
    text = (message.strip().splitlines() or [""])[0]
    for prefix in (str(root / ".uploads"), str(root)):
        while prefix in text:
            start = text.index(prefix)
            end = start + len(prefix)
            while end < len(text) and text[end] not in " :,;'\")":
                end += 1
            text = text[:start] + "poses" + text[end:]
    text = text.replace(str(EXAMPLES["dance"].parent), "example")
    return _ABSOLUTE.sub("<file>", text)[:1000]


_ABSOLUTE = re.compile(r"(?<![\w.<])/(?:[\w.@+-]+/)+[\w.@+-]*")
