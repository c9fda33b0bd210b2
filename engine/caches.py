"""Content-addressed caches in the storage backend, shared by every node and process of a cluster.

The engine core reads and writes them (it owns the backend), so a refinement or a pose
extraction made for one render is reused by any later render with the same inputs, whichever
node, process or working directory made it::

    <storage root>/cache/refine/<key>.json    refined prompts (key: engine.refine.cache_key)
    <storage root>/cache/poses/<key>.npz      poses read from a visual input (video, GIF, images)
    <storage root>/cache/adapters/<key>/      appearance LoRAs (engine.core.work.appearance_stage)

An entry is written with one atomic put (a temporary file renamed into place, or one object
PUT). An entry that cannot be read back whole (truncated, not JSON/npz, wrong fields) is a miss
that is logged and recomputed, and the fresh result replaces it: an entry is never trusted
because it exists. A cache that cannot be written is logged and recorded in the manifest, never
an error of the render: the cache is an optimisation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from engine.config import RenderConfig
from engine.pose import PoseSequence
from engine.storage import Storage

log = logging.getLogger(__name__)

POSES_VERSION = 1
"""Bump when the keypoints read from a visual input change meaning; part of every pose key."""


def refine_key(config: RenderConfig) -> str:
    """The refine cache key of a render's prompt (as :func:`engine.method.refine_prompt` asks)."""
    from engine.refine import RefineRequest, cache_key

    request = RefineRequest(coarse=config.prompt, identifier=config.appearance.identifier)
    return cache_key(request, config.refine.backend, config.refine.model)


def poses_key(config: RenderConfig, path: Path) -> str:
    """sha256 naming the poses read from the visual input ``path`` (a file or a folder of
    images): its bytes (and file names) and every setting of how it is read."""
    from engine.pose.extract import ESTIMATOR_ID

    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    how = [POSES_VERSION, ESTIMATOR_ID, config.pose_kind, config.limits.max_frames,
           config.pose_extraction.model_dump(mode="json"), digest.hexdigest()]  # fmt: skip
    return hashlib.sha256(json.dumps(how, sort_keys=True).encode()).hexdigest()


class SharedCache:
    """Content-addressed cache entries under a folder of a storage backend.

    Args:
        storage: The cache folder (``cache/`` of the engine's backend, :attr:`RenderStore.caches`;
            a node's own cache root for a single-render run).
    """

    def __init__(self, storage: Storage):
        self.storage = storage

    # -- refined prompts ----------------------------------------------------------------------

    def refined(self, key: str) -> dict[str, Any] | None:
        """The refined prompt (JSON) stored under ``key``, or None (missing or unreadable)."""
        from engine.refine import RefinedPrompt

        name = f"refine/{key}.json"
        data = self._read(name)
        if data is None:
            return None
        try:
            return RefinedPrompt.model_validate_json(data).model_dump(mode="json")
        except ValidationError as e:
            log.warning("refine cache entry %s is corrupt (%s); refining again", name, _first(e))
            return None

    def put_refined(self, key: str, refined: dict[str, Any]) -> str | None:
        """Store a refined prompt under ``key``; the error text if it could not be written."""
        return self._write(f"refine/{key}.json", json.dumps(refined, indent=2).encode())

    # -- poses --------------------------------------------------------------------------------

    def poses(self, key: str) -> PoseSequence | None:
        """The pose sequence stored under ``key``, or None (missing or unreadable)."""
        name = f"poses/{key}.npz"
        data = self._read(name)
        if data is None:
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                meta = json.loads(npz["meta"].tobytes().decode())
                return PoseSequence(
                    npz["keypoints"], float(meta["fps"]), int(meta["width"]),
                    int(meta["height"]), source=str(meta["source"]), info=meta["info"],
                )  # fmt: skip
        except Exception as e:  # any damage: truncated zip, missing array, bad JSON, bad shape
            log.warning("pose cache entry %s is corrupt (%s); reading the input again", name, e)
            return None

    def put_poses(self, key: str, seq: PoseSequence) -> str | None:
        """Store a pose sequence under ``key``; the error text if it could not be written."""
        meta = {"fps": seq.fps, "width": seq.width, "height": seq.height,
                "source": seq.source, "info": seq.info}  # fmt: skip
        buffer = io.BytesIO()
        np.savez(
            buffer,
            keypoints=np.asarray(seq.keypoints, np.float32),
            meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
        )
        return self._write(f"poses/{key}.npz", buffer.getvalue())

    # -- primitives ---------------------------------------------------------------------------

    def _read(self, name: str) -> bytes | None:
        try:
            return self.storage.get(name)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read cache entry %s (%s); computing it again", name, e)
            return None

    def _write(self, name: str, data: bytes) -> str | None:
        try:
            self.storage.put(name, data)
            return None
        except OSError as e:
            log.warning("cannot write cache entry %s in %s (%s)", name, self.storage.uri, e)
            return f"{type(e).__name__}: {e}"


def _first(e: ValidationError) -> str:
    errors = e.errors()
    return f"{errors[0]['loc']}: {errors[0]['msg']}" if errors else str(e)
