"""Weights named by a URI (``s3://bucket/sam_vit_h.pth``, ``gs://…``, any fsspec protocol,
``https://…``), fetched once per node into a local cache.

Every node of a cluster resolves the same URI itself, so no node needs the file beforehand. The
local copy lives at ``<cache root>/remote/<key>/<file name>``, ``key`` = sha256 of the URI and
the object's version (its ETag where the store gives one, else its size and modification time),
so a changed object is fetched again and an unchanged one never is. Processes on one node that
ask at once take a file lock (``fcntl.flock``): one downloads into a temporary sibling, checks
its size and renames it into place (atomic); the others find the finished file.

Credentials and endpoints come from the environment, as for the storage backend: ``AWS_*`` (and
``AWS_ENDPOINT_URL`` for an S3-compatible server such as MinIO), ``GOOGLE_APPLICATION_CREDENTIALS``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.models.errors import WeightsNotFoundError


def is_uri(value: str) -> bool:
    """Whether ``value`` names weights by URI (``scheme://…``, not a local path or hub id)."""
    return "://" in value and not value.startswith("file://")


def remote_cache_root() -> Path:
    """``$AVATAR_CACHE_DIR/remote``, else ``~/.cache/dancing-avatar/remote`` (this node's)."""
    default = os.environ.get("AVATAR_CACHE_DIR") or Path.home() / ".cache" / "dancing-avatar"
    return Path(default).expanduser() / "remote"


@dataclass(frozen=True)
class Fetched:
    """A URI's object as a local file."""

    path: Path
    size: int
    version: str
    """The object's ETag (``etag:…``), or ``size:…,mtime:…`` where the store has none."""
    downloaded: bool
    """False: the node's cache already held this version."""


def fetch(uri: str, field: str, cache: Path | None = None) -> Fetched:
    """The object at ``uri`` as a local file, downloaded only if this node lacks its version.

    Raises:
        WeightsNotFoundError: the object does not exist, is a folder, or cannot be read; the
            message names ``field``, the URI and the fix.
    """
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri, skip_instance_cache=True)  # env may change
        info = fs.info(path)
    except FileNotFoundError:
        raise WeightsNotFoundError(f"{field}: {uri} does not exist; fix the URI") from None
    except Exception as e:  # missing protocol package, credentials, network
        raise WeightsNotFoundError(
            f"{field}: cannot reach {uri} ({type(e).__name__}: {e}); check the URI, the "
            "credentials in the environment (AWS_*, AWS_ENDPOINT_URL, …) and the network"
        ) from None
    if info.get("type") == "directory":
        raise WeightsNotFoundError(f"{field}: {uri} is a folder; name one checkpoint file")
    size, version = int(info.get("size") or 0), _version(info)
    key = hashlib.sha256(f"{uri}\0{version}".encode()).hexdigest()[:32]
    folder = (cache or remote_cache_root()) / key
    local = folder / (Path(path).name or "weights")
    if _complete(local, size):
        return Fetched(local, size, version, downloaded=False)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process of this node may be fetching it
        if _complete(local, size):
            return Fetched(local, size, version, downloaded=False)
        part = folder / f".{local.name}.{os.getpid()}.part"
        try:
            fs.get_file(path, str(part))
            got = part.stat().st_size
            if got != size:
                raise WeightsNotFoundError(
                    f"{field}: fetched {got} bytes of {uri}, expected {size}; fetch again"
                )
            os.replace(part, local)
        except WeightsNotFoundError:
            raise
        except Exception as e:
            raise WeightsNotFoundError(
                f"{field}: cannot download {uri} ({type(e).__name__}: {e})"
            ) from None
        finally:
            part.unlink(missing_ok=True)
    return Fetched(local, size, version, downloaded=True)


def local_weights(value: str, field: str) -> str:
    """``value`` itself, or for a URI its local copy on this node (fetched if needed)."""
    return str(fetch(value, field).path) if is_uri(value) else value


def _version(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or ""
    return f"size:{info.get('size')},mtime:{mtime}"


def _complete(local: Path, size: int) -> bool:
    return local.is_file() and local.stat().st_size == size
