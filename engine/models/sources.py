"""Where real weights come from: a diffusers folder, a single checkpoint file, or a hub id.

:func:`classify` says which one a ``model.*`` value names, without loading anything: an existing
file with a weights suffix is a single file (``.safetensors``, ``.ckpt``, ``.pth``, ``.pt``,
``.bin``), an existing folder is a folder, ``owner/name`` that is not a local path is a hub id,
and anything else is an error naming the path (a missing local folder is never taken for a hub
id). :func:`hub_folder` brings a hub id into a local folder (cache first), choosing per
component the ``variant`` (``*.fp16.safetensors``) and ``.safetensors`` over ``.bin`` the way
diffusers' ``from_pretrained`` does. :func:`content_digest` names weights by their bytes (hub
blobs by their sha256 file names, other files hashed once and remembered by size and mtime), so
caches keyed by it notice replaced weights. :func:`shipped_config` is a folder of
``configs/models/`` (public config values of SD-1.5, its inpainting UNet, the OpenPose
ControlNet and CLIP's tokenizer; no weights) that single files are loaded against offline.
:func:`read_tensors` lists a checkpoint's tensor names, shapes and dtypes from its header (or a
memory-mapped pickle) without reading the tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from engine.models.errors import WeightsNotFoundError

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
"""Suffixes of single-file checkpoints."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64"}
"""safetensors' dtype names → torch's."""


@dataclass(frozen=True)
class Source:
    """A classified ``model.*`` value."""

    kind: Literal["folder", "file", "hub"]
    location: str
    """Absolute path (folder, file) or the hub id."""


def looks_local(value: str) -> bool:
    """Whether ``value`` is written as a path rather than a hub id ``owner/name``."""
    return (
        value.startswith((".", "/", "~"))
        or value.count("/") != 1
        or Path(value).suffix in WEIGHT_SUFFIXES
        or "\\" in value
    )


def classify(value: str, field: str, *, section: str = "model") -> Source:
    """The kind of weights ``<section>.<field>=value`` names (nothing is read).

    Raises:
        WeightsNotFoundError: a path that does not exist (naming it and the field), or a file
            that is not a checkpoint.
    """
    path = Path(value).expanduser()
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise WeightsNotFoundError(
                f"{section}.{field}={value!r} is a file but not a checkpoint "
                f"({', '.join(WEIGHT_SUFFIXES)}); name the checkpoint file or its folder"
            )
        return Source("file", str(path.resolve()))
    if path.is_dir():
        return Source("folder", str(path.resolve()))
    if looks_local(value) or (path.parent.is_dir() and str(path.parent) not in (".", "")):
        raise WeightsNotFoundError(
            f"{section}.{field}={value!r}: {path.resolve()} does not exist (relative paths in a spec "
            "resolve against the spec's folder); fix the path, or name a hub id owner/name"
        )
    return Source("hub", value)


def shipped_config(name: str) -> Path:
    """``configs/models/<name>`` (a folder of public config files, no weights)."""
    folder = Path(str(resources.files("configs") / "models" / name))
    if not folder.is_dir():
        raise WeightsNotFoundError(f"no shipped model config {name!r} in {folder.parent}")
    return folder


def hub_patterns(files: list[str], variant: str | None) -> list[str]:
    """The files of a hub repo to fetch: configs, tokenizer files and, per folder, one weights
    format: the ``variant`` safetensors, else plain safetensors, else the variant / plain
    ``.bin`` (diffusers' preference order). Repos' single-file checkpoints at the top level and
    weights of other frameworks are left out.

    Args:
        files: the repo's file paths (``HfApi.list_repo_files``).
        variant: e.g. ``fp16`` (``unet/diffusion_pytorch_model.fp16.safetensors``), or None.
    """
    keep = [f for f in files if f.endswith((".json", ".txt", ".model")) and "/" in f]
    keep += [f for f in files if f in ("model_index.json", "config.json")]
    by_folder: dict[str, list[str]] = {}
    for f in files:
        if f.endswith((".safetensors", ".bin")) and "/" in f:
            by_folder.setdefault(f.rsplit("/", 1)[0], []).append(f)
    for f in files:  # a ControlNet repo keeps its weights at the top level
        if f.endswith((".safetensors", ".bin")) and "/" not in f and "config.json" in files:
            by_folder.setdefault("", []).append(f)
    for group in by_folder.values():
        keep += _preferred(group, variant)
    return sorted(set(keep))


def _preferred(group: list[str], variant: str | None) -> list[str]:
    def is_variant(f: str) -> bool:
        return variant is not None and f".{variant}." in f.rsplit("/", 1)[-1]

    def plain(f: str) -> bool:
        name = f.rsplit("/", 1)[-1]
        return name.count(".") == 1 or (name.count(".") == 2 and "-of-" in name)

    for ext in (".safetensors", ".bin"):
        for pick in (is_variant, plain):
            chosen = [f for f in group if f.endswith(ext) and pick(f)]
            if chosen and (pick is plain or variant is not None):
                return chosen
    return []


def hub_folder(
    repo: str,
    what: str,
    field: str,
    *,
    offline: bool,
    variant: str | None,
    section: str = "model",
    patterns: list[str] | None = None,
) -> Path:
    """A local snapshot of hub repo ``repo``: the cache, else a download where reachable (of
    ``patterns``, default :func:`hub_patterns`).

    Raises:
        WeightsNotFoundError: at once (no minutes of retries) when the repo is neither cached nor
            reachable, naming it and the field to change.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import constants as hf_constants

    fix = (
        f"Fetch it where the hub is reachable (`hf download {repo}`) and set {section}.{field} to "
        "that folder (or to a single checkpoint file), or use the random-weight preset 'tiny'."
    )
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not cached; huggingface_hub raises several types here
        pass
    if offline:
        raise WeightsNotFoundError(
            f"{what}: {repo!r} is not in the local hub cache (offline). {fix}"
        )
    if not _hub_reachable():
        raise WeightsNotFoundError(
            f"{what}: {repo!r} is not cached and {hf_constants.ENDPOINT} is unreachable. {fix}"
        )
    try:
        if patterns is None:
            patterns = hub_patterns(HfApi().list_repo_files(repo), variant)
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:
        raise WeightsNotFoundError(f"{what}: downloading {repo!r} failed ({e}). {fix}") from None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick TCP connect to the hub endpoint (huggingface_hub otherwise retries for minutes)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants as hf_constants

    host = urlparse(hf_constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _digest_cache() -> Path:
    root = os.environ.get("AVATAR_CACHE_DIR") or Path.home() / ".cache" / "dancing-avatar"
    return Path(root) / "weight-digests.json"


def file_digest(path: Path) -> str:
    """sha256 of a weights file: a hub blob's own name, else hashed once per (size, mtime)."""
    real = path.resolve()
    if real.parent.name == "blobs" and _HEX64.match(real.name):
        return real.name
    stat = real.stat()
    key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    cache = _digest_cache()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return str(known[key])
    h = hashlib.sha256()
    with real.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    known[key] = h.hexdigest()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known))
    os.replace(tmp, cache)
    return known[key]


def content_digest(location: Path) -> str:
    """sha256 over the weights (and config files) of a file or folder: equal digests, equal
    weights, wherever they lie."""
    if location.is_file():
        return file_digest(location)
    h = hashlib.sha256()
    for path in sorted(p for p in location.rglob("*") if p.is_file()):
        if path.suffix in WEIGHT_SUFFIXES or path.suffix in (".json", ".txt"):
            h.update(f"{path.relative_to(location)}:{file_digest(path)}\n".encode())
    return h.hexdigest()


def weights_id(value: str, field: str) -> str:
    """The first 16 hex digits of :func:`content_digest` of the weights ``value`` names (a local
    file or folder, or a cached hub id), else ``value`` itself (weights not on this machine)."""
    try:
        source = classify(value, field)
    except WeightsNotFoundError:
        return value
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            return content_digest(Path(snapshot_download(value, local_files_only=True)))[:16]
        except Exception:  # not cached here
            return value
    return content_digest(Path(source.location))[:16]


@dataclass
class Tensors:
    """Names → (shape, dtype) of a checkpoint, read without its data."""

    shapes: dict[str, tuple[tuple[int, ...], str]]
    size: int

    def shape(self, key: str) -> tuple[int, ...] | None:
        found = self.shapes.get(key)
        return None if found is None else found[0]

    def dtypes(self) -> str:
        return ",".join(sorted({d for _, d in self.shapes.values()})) or "none"


def read_tensors(path: Path) -> Tensors:
    """The tensor names, shapes and dtypes of a weights file (headers only)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        shapes = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                piece = f.get_slice(key)
                dtype = str(piece.get_dtype()).lower()
                shapes[key] = (tuple(piece.get_shape()), _DTYPES.get(dtype, dtype))
        return Tensors(shapes, path.stat().st_size)
    import torch

    state: Any = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    shapes = {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in state.items()
        if hasattr(v, "shape")
    }
    return Tensors(shapes, path.stat().st_size)
