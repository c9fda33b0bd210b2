"""Bearer tokens (stored hashed, compared in constant time) and per-token quotas (renders at
once, frames per day, bytes stored) and retention.

The token table keeps only SHA-256 digests; a presented token is hashed and compared with every
digest (``hmac.compare_digest``, no early exit), so timing tells nothing about which prefix
matched. Tokens are never logged. Quotas (unfinished renders, frames per rolling day) are kept
by the engine deployment in ``ROOT/serve.sqlite`` so they survive restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import threading
import time
from pathlib import Path

from cluster.serve.config import ServeArgs, TokenConfig, env_tokens
from engine.config import ConfigError

ANONYMOUS = "anonymous"
DAY_S = 86_400.0


def token_digest(token: str) -> str:
    """Hex SHA-256 of a token (what a config's ``sha256`` holds)."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenTable:
    """Owner names by token digest."""

    def __init__(self, args: ServeArgs):
        self.required = args.auth
        self._entries: list[tuple[bytes, str]] = []
        for i, token in enumerate(env_tokens(args)):
            digest = token.sha256 or (token_digest(token.token) if token.token else None)
            if digest is None or len(digest) != 64:
                raise ConfigError(
                    f"serve args: tokens[{i}] ({token.name}): give sha256 (64 hex digits) or token"
                )
            self._entries.append((bytes.fromhex(digest), token.name))
        secret = os.environ.get(args.metrics_env, "").strip()
        digest = args.metrics_sha256 or (token_digest(secret) if secret else None)
        self._metrics = bytes.fromhex(digest) if digest else None
        if self.required and not self._entries:
            raise ConfigError(
                f"serve args: auth is on but no token is configured; add tokens or set "
                f"${args.tokens_env}=name:token (or auth: false for local use)"
            )

    @property
    def metrics_required(self) -> bool:
        """Whether ``GET /metrics`` needs the metrics token."""
        return self._metrics is not None

    def metrics_allowed(self, token: str | None) -> bool:
        """Whether ``GET /metrics`` may answer: no metrics token configured, or this one."""
        if self._metrics is None:
            return True
        presented = hashlib.sha256((token or "").strip().encode()).digest()
        return bool(token) and hmac.compare_digest(presented, self._metrics)

    def owner(self, authorization: str | None) -> str | None:
        """The owner of a ``Bearer <token>`` header, or None (missing, malformed or unknown)."""
        if not self.required:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for digest, name in self._entries:  # every entry, no early exit
            if hmac.compare_digest(presented, digest):
                found = name
        return found


class QuotaExceeded(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QuotaLedger:
    """Frames submitted per owner (rolling 24 h), durable in ``ROOT/serve.sqlite``."""

    def __init__(self, root: Path, args: ServeArgs):
        self.defaults = args.quotas
        self.retention = args.storage.retention_days
        self.limits: dict[str, TokenConfig] = {t.name: t for t in args.tokens}
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            root / "serve.sqlite", check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS usage (render_id TEXT PRIMARY KEY, owner TEXT NOT NULL, "
            "frames INTEGER NOT NULL, time REAL NOT NULL)"
        )

    def max_concurrent(self, owner: str) -> int:
        token = self.limits.get(owner)
        if token is not None and token.max_concurrent is not None:
            return token.max_concurrent
        return self.defaults.max_concurrent

    def frames_per_day(self, owner: str) -> int:
        token = self.limits.get(owner)
        if token is not None and token.frames_per_day is not None:
            return token.frames_per_day
        return self.defaults.frames_per_day

    def max_storage_bytes(self, owner: str) -> int:
        token = self.limits.get(owner)
        if token is not None and token.max_storage_bytes is not None:
            return token.max_storage_bytes
        return self.defaults.max_storage_bytes

    def retention_days(self, owner: str) -> float | None:
        """Days finished renders of ``owner`` are kept (None: until deleted)."""
        token = self.limits.get(owner)
        if token is not None and token.retention_days is not None:
            return token.retention_days
        return self.retention

    def check_storage(self, owner: str, used: int) -> None:
        """:class:`QuotaExceeded` when ``owner``'s renders and uploads occupy their quota."""
        limit = self.max_storage_bytes(owner)
        if used >= limit:
            raise QuotaExceeded(
                f"this token's renders and uploads occupy {used} bytes (storage quota {limit}); "
                "DELETE renders you no longer need",
                int(DAY_S),
            )

    def check(self, owner: str, unfinished: int, frames: int, retry_after_s: int) -> None:
        """Raise :class:`QuotaExceeded` if ``owner`` may not submit ``frames`` more now."""
        limit = self.max_concurrent(owner)
        if unfinished >= limit:
            raise QuotaExceeded(
                f"{unfinished} renders of this token are queued or running (quota {limit}); "
                "wait for one to finish or cancel one",
                retry_after_s,
            )
        daily = self.frames_per_day(owner)
        now = time.time()
        with self._lock:
            rows = self._db.execute(
                "SELECT frames, time FROM usage WHERE owner = ? AND time > ? ORDER BY time",
                (owner, now - DAY_S),
            ).fetchall()
        used = sum(r[0] for r in rows)
        if used + frames <= daily:
            return
        if frames > daily:
            raise QuotaExceeded(
                f"{frames} frames exceed this token's daily quota of {daily} frames; "
                "submit a shorter pose sequence",
                int(DAY_S),
            )
        wait, freed = 0.0, 0
        for count, at in rows:  # when enough of the window has expired
            freed += count
            wait = at + DAY_S - now
            if used - freed + frames <= daily:
                break
        raise QuotaExceeded(
            f"{used} of this token's {daily} frames per day are used; {frames} more do not fit",
            max(1, int(wait) + 1),
        )

    def record(self, owner: str, render_id: str, frames: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO usage (render_id, owner, frames, time) VALUES (?, ?, ?, ?)",
                (render_id, owner, frames, time.time()),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
