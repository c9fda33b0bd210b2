"""A render's input files travel with it: copied into its folder in the storage backend when it
is submitted (``inputs/poses/…``, ``inputs/plate/…``, ``inputs/masks/…``), and read from there by
the core from then on — so the submitter's files may be deleted right after submission, and a
core on another machine resumes the render from the backend alone. Workers never read an input
path: the core sends them the poses, the plate and the masks as arrays (object store).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.config import RenderConfig
from engine.storage import Storage

log = logging.getLogger(__name__)

FIELDS = ("poses", "plate", "masks")
"""The spec fields that name input files or folders."""


def _used(config: RenderConfig, field: str) -> bool:
    return field == "poses" or config.alignment.background  # plate, masks: with a plate only


def snapshot_inputs(out: Storage, config: RenderConfig) -> list[str]:
    """Copy the spec's input files into ``out/inputs/<field>/<name>`` (replacing an older copy);
    returns the fields copied. A missing path is left for the loader to report."""
    copied = []
    for field in FIELDS:
        value = getattr(config, field)
        if value is None or not _used(config, field):
            continue
        path = Path(value)
        if not path.exists():
            continue
        out.delete(f"inputs/{field}")
        if path.is_dir():
            out.put_dir(path, f"inputs/{field}/{path.name}")
        else:
            out.put(f"inputs/{field}/{path.name}", path.read_bytes())
        copied.append(field)
    return copied


@contextmanager
def local_inputs(out: Storage, config: RenderConfig) -> Iterator[RenderConfig]:
    """``config`` with its input paths pointing at the render folder's copy (in place on a local
    backend, else a temporary download removed afterwards). A render submitted before inputs
    were copied keeps its original paths (logged)."""
    keys = out.keys("inputs")
    names: dict[str, str] = {}
    for key in keys:
        parts = key.split("/")
        if len(parts) >= 3:
            names[parts[1]] = parts[2]
    missing = [f for f in FIELDS if getattr(config, f) is not None and _used(config, f)
               and f not in names]  # fmt: skip
    if missing:
        log.info("render folder %s has no copy of %s: reading the spec's paths", out.uri, missing)
    if not names:
        yield config
        return
    with tempfile.TemporaryDirectory(prefix="avatar-inputs-") as tmp:
        local = out.local_path()
        base = local / "inputs" if local is not None else out.get_dir("inputs", Path(tmp))
        yield config.model_copy(update={f: base / f / name for f, name in names.items()})
