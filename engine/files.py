"""Atomic file writes: write a temporary sibling, flush and fsync it, then rename over the target.

A reader (or a process restarted after a crash) sees either the old file or the whole new one,
never a torn write. Every writer of persisted state in the engine goes through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (temp sibling → fsync → ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_json(path: str | Path, value: Any) -> Path:
    """``value`` as indented JSON, written atomically."""
    return atomic_write(path, json.dumps(value, indent=2))


def replace_with(tmp: str | Path, path: str | Path) -> Path:
    """Atomically move a finished temporary file (written by a library) over ``path``."""
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())
    os.replace(tmp, path)
    return Path(path)
