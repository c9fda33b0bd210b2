"""Owner namespaces, the server secret, and the bytes each owner occupies.

Render ids are per owner: the store keys a render by ``tag(owner) + id``, where the 12-character
tag is an HMAC of the owner name under the server secret. Two tokens can use the same id without
meeting, and no answer depends on whether another owner holds an id. Ids derived from an
``Idempotency-Key`` are an HMAC under the same secret, so nobody can compute another's ids.

The secret is 32 random bytes in ``ROOT/.secret`` (mode 0600), made on first start; deleting it
makes every existing render unreachable through the API (their rows and files stay).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

TAG_CHARS = 12
MAX_CLIENT_ID = 64 - TAG_CHARS
"""Longest id a client can choose (the store's ids are at most 64 characters)."""


def server_secret(root: Path) -> bytes:
    """The secret of the storage root ``root`` (created atomically on first use)."""
    path = root / ".secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        data = path.read_bytes()
        if len(data) != 32:
            raise RuntimeError(f"{path} holds {len(data)} bytes, not 32; restore it") from None
        return data
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
        fh.flush()
        os.fsync(fh.fileno())
    return secret


class OwnerIds:
    """Maps (owner, client id) to the store's id and back."""

    def __init__(self, secret: bytes):
        self._secret = secret
        self._tags: dict[str, str] = {}

    def _mac(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    def tag(self, owner: str) -> str:
        if owner not in self._tags:
            self._tags[owner] = "o" + self._mac(f"owner\0{owner}")[: TAG_CHARS - 1]
        return self._tags[owner]

    def internal(self, owner: str, client_id: str) -> str:
        """The store id of ``owner``'s render ``client_id``."""
        return self.tag(owner) + client_id

    @staticmethod
    def client(internal: str) -> str:
        """The id the owner knows for the store id ``internal``."""
        return internal[TAG_CHARS:]

    def idempotent(self, owner: str, key: str) -> str:
        """The client id of an ``Idempotency-Key`` (unpredictable without the secret)."""
        return "k" + self._mac(f"idem\0{owner}\0{key}")[:31]


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while counting
                total += os.lstat(os.path.join(folder, name)).st_size
    return total
