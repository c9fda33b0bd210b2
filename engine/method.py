"""Helpers of the paper's stages before the frame chain (refine → appearance LoRA → plate).

The stages themselves run as executor work (:mod:`engine.core.work`); refinement always runs (the
offline ``template`` backend by default) because the later stages consume its fine-grained
prompts. Here: the cache root, the render's pose sequence, prompt refinement with its errors,
and a supplied plate image.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.caches import SharedCache, poses_key
from engine.config import ConfigError, RenderConfig
from engine.pose import PoseSequence, load_poses, resample, validate
from engine.pose.isolated import is_visual, load_poses_isolated
from engine.refine import RefinedPrompt, RefineError, refine

log = logging.getLogger(__name__)


def cache_root(config: RenderConfig) -> Path:
    """Root of the caches: ``cache_dir``, else ``$AVATAR_CACHE_DIR``, else ``~/.cache/dancing-avatar``."""
    default = os.environ.get("AVATAR_CACHE_DIR") or Path.home() / ".cache" / "dancing-avatar"
    return Path(config.cache_dir or default).expanduser()


def refine_prompt(config: RenderConfig, node_cache: bool = True) -> RefinedPrompt:
    """The spec's prompt refined by the configured backend, cached in ``refine.cache_dir`` if
    set, else (``node_cache``) under this node's cache root. The engine core's renders pass
    False: it caches refinements in the storage backend (:mod:`engine.caches`)."""
    cache = config.refine.cache_dir or (cache_root(config) / "refine" if node_cache else None)
    try:
        return refine(
            config.prompt,
            config=config.refine,
            cache_dir=cache,
            identifier=config.appearance.identifier,
        )
    except RefineError as e:
        raise ConfigError(f"prompt refinement ({config.refine.backend}) failed: {e}") from None


def load_plate(path: Path, width: int, height: int) -> np.ndarray:
    """A plate image as (height, width, 3) uint8 RGB (resized if its size differs)."""
    try:
        with Image.open(path) as file:
            img = file.convert("RGB")
    except OSError as e:
        raise ConfigError(f"cannot read plate {path}: {e}") from None
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(img).copy()


def prepare_poses(
    config: RenderConfig,
    cancelled: Callable[[], bool] | None = None,
    cache: SharedCache | None = None,
) -> PoseSequence:
    """Load, resample to the render's fps and size, and validate the spec's pose sequence.

    A visual input is decoded in a bounded child process (``limits.decode_*``), stopped early
    when ``cancelled()`` turns True. With a ``cache`` (the storage backend's, see
    :mod:`engine.caches`) the poses read from a visual input are cached there, not under the
    node's cache root; ``info["shared_cache"]`` records the key and whether it was a hit."""
    if config.poses is None:
        raise ConfigError("the render spec has no 'poses': add poses: path/to/poses.json")
    if cache is not None and is_visual(config.poses):
        seq = _cached_poses(config, cancelled, cache)
    else:
        seq = _read_poses(config, cancelled, cache_root(config))
    seq = resample(seq, fps=config.fps or seq.fps, width=config.width, height=config.height)
    validate(seq, max_frames=config.limits.max_frames)
    return seq


def _cached_poses(
    config: RenderConfig, cancelled: Callable[[], bool] | None, cache: SharedCache
) -> PoseSequence:
    """The poses of a visual input from the shared cache, else read (and stored there)."""
    assert config.poses is not None
    key = poses_key(config, Path(config.poses))
    seq = cache.poses(key)
    record: dict[str, Any] = {"key": key, "hit": seq is not None}
    if seq is None:  # read once; the extraction's own per-node cache goes to a scratch folder
        with tempfile.TemporaryDirectory(prefix="avatar-poses-") as scratch:
            seq = _read_poses(config, cancelled, Path(scratch))
        error = cache.put_poses(key, seq)
        record.update(stored=error is None, **({"error": error} if error else {}))
    info = {**(seq.info or {}), "shared_cache": record}
    return PoseSequence(seq.keypoints, seq.fps, seq.width, seq.height, str(config.poses), info)


def _read_poses(
    config: RenderConfig, cancelled: Callable[[], bool] | None, cache_dir: Path
) -> PoseSequence:
    """The spec's poses as read from its input (RGB extraction cached under ``cache_dir``)."""
    assert config.poses is not None
    lim = config.limits
    if lim.decode_isolated and is_visual(config.poses):
        return load_poses_isolated(
            Path(config.poses),
            memory_mb=lim.decode_memory_mb,
            timeout_s=lim.decode_timeout_s,
            cancelled=cancelled,
            max_frames=lim.max_frames,
            kind=config.pose_kind,
            extraction=config.pose_extraction.model_dump(mode="json"),
            cache_dir=str(cache_dir),
        )
    return load_poses(
        config.poses,
        max_frames=lim.max_frames,
        kind=config.pose_kind,
        extraction=config.pose_extraction,
        cache_dir=cache_dir,
    )
