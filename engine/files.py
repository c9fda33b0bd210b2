"""Atomic file writes: write a temporary sibling, flush and fsync it, then rename over the target.

A reader (or a process restarted after a crash) sees either the old file or the whole new one,
never a torn write. Every writer of persisted state in the engine goes through here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (temp sibling → fsync → ``os.replace``)."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def atomic_json(path: str | Path, value: Any) -> Path:
    """``value`` as indented JSON, written atomically."""
    return atomic_write(path, json.dumps(value, indent=2))


def temp_sibling(path: str | Path) -> Path:
    """A fresh temporary path beside ``path`` for a library that writes files itself (then
    :func:`replace_with`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    return Path(tmp)


def replace_with(tmp: str | Path, path: str | Path) -> Path:
    """Atomically move a finished temporary file (written by a library) over ``path``."""
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())
    os.replace(tmp, path)
    return Path(path)
