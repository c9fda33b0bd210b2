"""Storage backends: where a render's artefacts live (frames, latents, video, manifest, …).

One small interface over a local folder (the default: nothing to start) and any fsspec
protocol (``s3://bucket/prefix`` with ``storage.endpoint_url`` for any S3-compatible server such
as MinIO, ``gs://…``, ``memory://`` …). Keys are ``/``-separated paths relative to the backend's
root; :meth:`Storage.sub` scopes a backend to one render's prefix.

Every write is atomic for its readers: a local folder writes a temporary sibling, fsyncs it and
renames it over the key (:mod:`engine.files`); an object store writes each object with one PUT,
which S3 and GCS make visible whole or not at all. Writers order their objects so that the one
that marks something complete (a frame's latent, a render's manifest) is written last.

The SQLite index of the engine core is not stored here: it stays in a local folder of the core.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any

from engine.config import ConfigError, StorageConfig
from engine.files import atomic_write


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def check_key(key: str) -> str:
    """``key`` if it is a relative ``/``-separated path without ``..`` or empty parts."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"storage key {key!r} is invalid: use a relative path such as frames/x.png"
        )
    return key


class Storage(ABC):
    """A tree of byte objects under a root (a folder or a bucket prefix).

    Args:
        prefix: Scope of this view inside the backend's root ("" = the root itself).
    """

    shared: bool = False
    """Every node of a cluster reaches the same objects (object stores; a folder only when it
    is declared shared): workers may write their outputs here themselves."""

    def __init__(self, prefix: str = ""):
        self.prefix = _join(prefix)

    # -- primitives on full keys (relative to the backend root) -------------------------------

    @abstractmethod
    def _put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _get(self, key: str) -> bytes: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _size(self, key: str) -> int: ...

    @abstractmethod
    def _keys(self, prefix: str) -> list[str]:
        """Every object key under ``prefix`` (full keys, recursive)."""

    @abstractmethod
    def _open(self, key: str) -> IO[bytes]: ...

    @abstractmethod
    def _delete(self, prefix: str) -> None: ...

    @abstractmethod
    def _clone(self, prefix: str) -> Storage: ...

    @property
    @abstractmethod
    def uri(self) -> str:
        """Where this view lives (a folder path or ``scheme://bucket/prefix``)."""

    def local_path(self) -> Path | None:
        """The local folder of this view, or None for a remote backend."""
        return None

    # -- the interface (keys relative to this view) -------------------------------------------

    def _full(self, key: str) -> str:
        return _join(self.prefix, check_key(key))

    def sub(self, prefix: str) -> Storage:
        """The same backend scoped to ``prefix`` under this view."""
        return self._clone(_join(self.prefix, check_key(prefix)))

    def root_view(self) -> Storage:
        """The same backend, unscoped (its root)."""
        return self._clone("")

    def put(self, key: str, data: bytes) -> str:
        """Write ``data`` atomically under ``key``; returns its sha256 (hex)."""
        self._put(self._full(key), data)
        return hashlib.sha256(data).hexdigest()

    def get(self, key: str) -> bytes:
        """The bytes of ``key``; ``FileNotFoundError`` naming it if it is absent."""
        return self._get(self._full(key))

    def exists(self, key: str) -> bool:
        return self._exists(self._full(key))

    def size(self, key: str) -> int:
        return self._size(self._full(key))

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` of this view, relative to the view, sorted."""
        full = _join(self.prefix, check_key(prefix)) if prefix else self.prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[cut:] for k in self._keys(full))

    def open(self, key: str) -> IO[bytes]:
        """A seekable binary reader of ``key`` (streams from an object store)."""
        return self._open(self._full(key))

    def delete(self, prefix: str) -> None:
        """Remove ``prefix`` (a key or everything under it); absent keys are ignored."""
        self._delete(self._full(prefix))

    def put_dir(self, folder: Path, prefix: str) -> None:
        """Upload every file under a local ``folder`` to ``prefix`` (one write per file)."""
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                self.put(_join(prefix, path.relative_to(folder).as_posix()), path.read_bytes())

    def get_dir(self, prefix: str, folder: Path) -> Path:
        """Download every key under ``prefix`` into a local ``folder``; returns it."""
        for key in self.keys(prefix):
            path = Path(folder) / key[len(prefix) :].lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.get(key))
        return Path(folder)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalStorage(Storage):
    """A local folder (temp + fsync + rename per write).

    Args:
        root: The folder (created on first write).
        shared: The folder is mounted at this path on every node (NFS, …).
    """

    def __init__(self, root: str | Path, prefix: str = "", *, shared: bool = False):
        super().__init__(prefix)
        self.root = Path(root).expanduser().resolve()
        self.shared = shared

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)

    def _get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def _keys(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return [
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")  # temporaries and locks
        ]

    def _open(self, key: str) -> IO[bytes]:
        return open(self._path(key), "rb")

    def _delete(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def _clone(self, prefix: str) -> Storage:
        return LocalStorage(self.root, prefix, shared=self.shared)

    @property
    def uri(self) -> str:
        return str(self._path(self.prefix))

    def local_path(self) -> Path:
        return self._path(self.prefix)


class FsspecStorage(Storage):
    """Any fsspec filesystem (``s3://``, ``gs://``, ``memory://``, …): one PUT per object.

    Args:
        uri: ``protocol://bucket/prefix``.
        options: Keyword arguments of the fsspec filesystem (credentials, ``endpoint_url``).
    """

    shared = True

    def __init__(self, uri: str, options: dict[str, Any] | None = None, prefix: str = ""):
        import fsspec

        super().__init__(prefix)
        self._uri = uri.rstrip("/")
        self.options = dict(options or {})
        protocol, _, self.base = self._uri.partition("://")
        try:
            self.fs = fsspec.filesystem(protocol, **self.options)
        except (ImportError, ValueError) as e:
            raise ConfigError(
                f"storage {uri!r}: {e}; install the backend's fsspec package "
                "(s3fs for s3://, gcsfs for gs://)"
            ) from None

    def _path(self, key: str) -> str:
        return _join(self.base, key) if self.base else key

    def _put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)

    def _get(self, key: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(self._path(key)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self._uri}/{key} does not exist") from None

    def _exists(self, key: str) -> bool:
        self.fs.invalidate_cache(self._path(key))
        return bool(self.fs.isfile(self._path(key)))

    def _size(self, key: str) -> int:
        return int(self.fs.size(self._path(key)))

    def _keys(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        self.fs.invalidate_cache(path)  # another process may have written since
        cut = len(self.base) + 1 if self.base else 0
        return [p[cut:] if not p.startswith("/") else p[cut + 1 :] for p in self.fs.find(path)]

    def _open(self, key: str) -> IO[bytes]:
        return self.fs.open(self._path(key), "rb")  # type: ignore[no-any-return]

    def _delete(self, prefix: str) -> None:
        path = self._path(prefix)
        self.fs.invalidate_cache(path)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def _clone(self, prefix: str) -> Storage:
        clone = FsspecStorage.__new__(FsspecStorage)
        Storage.__init__(clone, prefix)
        clone._uri, clone.options, clone.base, clone.fs = (
            self._uri,
            self.options,
            self.base,
            self.fs,
        )
        return clone

    @property
    def uri(self) -> str:
        return _join(self._uri, self.prefix) if self.prefix else self._uri

    def __reduce__(self) -> tuple[Any, ...]:  # travels to Ray workers as its settings
        return (FsspecStorage, (self._uri, self.options, self.prefix))


def open_storage(config: StorageConfig, default_root: str | Path | None = None) -> Storage:
    """The backend named by ``storage.uri`` (a folder or ``protocol://…``), else a local folder
    at ``default_root``.

    Raises:
        ConfigError: neither is given, or the protocol's fsspec package is missing.
    """
    uri = config.uri or (str(default_root) if default_root is not None else None)
    if uri is None:
        raise ConfigError("no storage: set storage.uri (a folder or s3://bucket/prefix)")
    if "://" not in uri or uri.startswith("file://"):
        return LocalStorage(uri.removeprefix("file://"), shared=config.shared)
    options: dict[str, Any] = dict(config.options)
    if config.endpoint_url:
        if not uri.startswith(("s3://", "s3a://")):
            raise ConfigError(
                f"storage.endpoint_url is for s3:// URIs; {uri!r} takes its endpoint in "
                "storage.options"
            )
        options["endpoint_url"] = config.endpoint_url
    return FsspecStorage(uri, options)


def env_credentials() -> dict[str, str]:
    """The storage credentials of this process's environment (AWS_*, GOOGLE_APPLICATION_*) that
    a Ray ``runtime_env`` passes to the workers that write to the backend."""
    names = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS")
    return {k: v for k, v in os.environ.items() if k.startswith(names)}
