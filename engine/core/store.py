"""The durable render store: one SQLite index (WAL) in a local folder + one folder per render in
the storage backend (the same local folder by default, or an object store: :mod:`engine.storage`).

    ROOT/renders.sqlite          id, spec, fingerprint, state, frames, attempts, error, … + events
    BACKEND/<id>/                the render's artefacts (frames, latents, video, manifest, …)
    ROOT/<id>/.lock              held (flock) by the one engine core working on that render

Ids are generated (random, unguessable) or validated (``[A-Za-z0-9_-]{1,64}``), and every path is
derived from the id, so no id can name a path outside the root. The index is written in the same
order as the artefacts (a frame's files first, then its row), so after a crash the index never
claims more than the folder holds; the core re-derives the resume point from the folder anyway.
"""

from __future__ import annotations

import builtins
import json
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from engine.config import ConfigError, RenderConfig
from engine.storage import LocalStorage, Storage, open_storage

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
State = Literal[
    "queued",
    "refining",
    "training",
    "background",
    "rendering",
    "encoding",
    "done",
    "failed",
    "cancelled",
]
"""A render's life cycle (also the HTTP API's ``state``)."""
STATES: tuple[str, ...] = get_args(State)
FINAL_STATES = frozenset({"done", "failed", "cancelled"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS renders (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    spec TEXT NOT NULL,
    fingerprint TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    frames_done INTEGER NOT NULL DEFAULT 0,
    frames_total INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    error_kind TEXT,
    eta_s REAL,
    priority INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS renders_owner ON renders(owner, seq);
CREATE TABLE IF NOT EXISTS events (
    render_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (render_id, seq)
);
"""

_COLUMNS = (
    "id",
    "owner",
    "spec",
    "fingerprint",
    "state",
    "frames_done",
    "frames_total",
    "attempts",
    "error",
    "error_kind",
    "eta_s",
    "priority",
    "created",
    "updated",
    "seq",
)


class ConflictError(ValueError):
    """A client-chosen id already names a render with a different spec."""


class QueueFullError(RuntimeError):
    """The core holds ``cluster.max_queued`` unfinished renders; try again later."""


class UnknownRenderError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RenderLockedError(RuntimeError):
    """Another engine core holds the render folder."""


def new_id() -> str:
    """A random, unguessable render id (16 url-safe characters, 96 bits)."""
    return secrets.token_urlsafe(12)


def check_id(render_id: str) -> str:
    """``render_id`` if it is a valid id, else :class:`ConfigError` naming it."""
    if not isinstance(render_id, str) or not ID_PATTERN.match(render_id):
        raise ConfigError(
            f"render id {render_id!r} is invalid: use 1-64 characters of A-Z, a-z, 0-9, _ and -"
        )
    return render_id


@dataclass(frozen=True)
class RenderRecord:
    """One row of the index."""

    id: str
    owner: str
    spec: dict[str, Any]
    """The render's resolved config (JSON)."""
    fingerprint: str
    state: str
    """One of :data:`STATES`."""
    frames_done: int
    frames_total: int
    attempts: int
    error: str | None
    error_kind: str | None
    """``input`` or ``infra`` for failed renders."""
    eta_s: float | None
    priority: int
    created: float
    updated: float
    seq: int
    """Creation order (cursor for listings)."""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def public(self) -> dict[str, Any]:
        """The record without the spec, as JSON-able data."""
        return {k: getattr(self, k) for k in _COLUMNS if k not in ("spec", "seq")}


class RenderStore:
    """SQLite index under ``root`` + per-render folders in a storage backend.

    Args:
        root: The index folder (created; local to the core), and the render folders' root when
            no ``storage`` is given.
        folder: Single-render mode: the one folder every render id maps to (``avatar render
            --out DIR``); the index then lives in ``folder/.renders.sqlite``.
        storage: Where the render folders live (``<storage>/<id>/``); default: ``root``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        folder: str | Path | None = None,
        storage: Storage | None = None,
    ):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._single = Path(folder).resolve() if folder is not None else None
        if self._single is not None and storage is not None:
            raise ValueError("single-render mode (folder=) writes to that folder; drop storage=")
        self.storage = storage or LocalStorage(self._single or self.root)
        db = (self._single / ".renders.sqlite") if self._single else self.root / "renders.sqlite"
        db.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(db, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._locks: dict[str, int] = {}

    # -- paths and locks ----------------------------------------------------------------------

    def files(self, render_id: str) -> Storage:
        """The render's artefact folder in the backend (derived from the validated id only)."""
        check_id(render_id)
        return self.storage if self._single is not None else self.storage.sub(render_id)

    @property
    def caches(self) -> Storage | None:
        """Where the content-addressed caches live (``cache/`` of the backend, see
        :mod:`engine.caches`); None in single-render mode (the folder is the render's own)."""
        return None if self._single is not None else self.storage.sub("cache")

    def folder(self, render_id: str) -> Path:
        """The render's artefact folder on this machine's disk.

        Raises:
            ValueError: the render folders live in a remote backend (use :meth:`files`).
        """
        path = self.files(render_id).local_path()
        if path is None:
            raise ValueError(
                f"render {render_id!r} lives in {self.files(render_id).uri}, not on a local disk"
            )
        return path

    def lock(self, render_id: str) -> None:
        """Hold the render folder for this core (released by :meth:`unlock` or process exit).
        The lock file lives in the local render folder, or under the index folder for a remote
        backend (one core per index)."""
        import fcntl
        import os

        if render_id in self._locks:
            return
        local = self.files(render_id).local_path()
        folder = local if local is not None else self.root / ".locks" / render_id
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RenderLockedError(
                f"render {render_id!r} ({folder}) is held by another engine core; stop it first"
            ) from None
        self._locks[render_id] = fd

    def unlock(self, render_id: str) -> None:
        import fcntl
        import os

        fd = self._locks.pop(render_id, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- rows ---------------------------------------------------------------------------------

    def create(
        self, render_id: str, spec: dict[str, Any], *, priority: int = 0, owner: str = ""
    ) -> RenderRecord:
        """Insert a QUEUED render; ``ValueError`` if the id exists."""
        check_id(render_id)
        now = time.time()
        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM renders").fetchone()[0]
            try:
                self._db.execute(
                    "INSERT INTO renders (id, owner, spec, state, priority, created, updated, seq)"
                    " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                    (render_id, owner, json.dumps(spec, sort_keys=True), priority, now, now, seq),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"render {render_id!r} exists") from None
        record = self.get(render_id)
        assert record is not None
        return record

    def get(self, render_id: str) -> RenderRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM renders WHERE id = ?", (render_id,)
            ).fetchone()
        return _record(row) if row else None

    def update(self, render_id: str, **fields: Any) -> None:
        """Set columns of one render (``updated`` is stamped)."""
        bad = set(fields) - set(_COLUMNS[3:14])
        if bad:
            raise ValueError(f"unknown render columns {sorted(bad)}")
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown state {fields['state']!r}; one of {STATES}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(
                f"UPDATE renders SET {sets}, updated = ? WHERE id = ?",
                (*fields.values(), time.time(), render_id),
            )

    def delete(self, render_id: str) -> None:
        """Forget a render's row and events (its folder is left as it is)."""
        with self._lock:
            self._db.execute("DELETE FROM renders WHERE id = ?", (render_id,))
            self._db.execute("DELETE FROM events WHERE render_id = ?", (render_id,))

    def list(
        self,
        *,
        owner: str | None = None,
        states: tuple[str, ...] | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> builtins.list[RenderRecord]:
        """Renders newest first; ``before`` is a ``seq`` cursor (exclusive)."""
        where: builtins.list[str] = []
        args: builtins.list[Any] = []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM renders {clause} ORDER BY seq DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [_record(r) for r in rows]

    def unfinished(self) -> builtins.list[RenderRecord]:
        """Renders not DONE / FAILED / CANCELLED, oldest first (what a new core resumes)."""
        finals = tuple(FINAL_STATES)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM renders WHERE state NOT IN (?, ?, ?) "
                "ORDER BY seq",
                finals,
            ).fetchall()
        return [_record(r) for r in rows]

    def count(self, states: tuple[str, ...]) -> int:
        with self._lock:
            return int(
                self._db.execute(
                    f"SELECT COUNT(*) FROM renders WHERE state IN ({', '.join('?' * len(states))})",
                    states,
                ).fetchone()[0]
            )

    # -- events -------------------------------------------------------------------------------

    def add_event(self, render_id: str, data: dict[str, Any]) -> int:
        """Append an event of one render; returns its sequence number (1, 2, …)."""
        with self._lock:
            seq = self._db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE render_id = ?", (render_id,)
            ).fetchone()[0]
            self._db.execute(
                "INSERT INTO events (render_id, seq, data) VALUES (?, ?, ?)",
                (render_id, seq, json.dumps({**data, "seq": seq})),
            )
        return int(seq)

    def events(self, render_id: str, after: int | None = None) -> builtins.list[dict[str, Any]]:
        """The render's events with ``seq > after`` (all by default), in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT data FROM events WHERE render_id = ? AND seq > ? ORDER BY seq",
                (render_id, after or 0),
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        for render_id in list(self._locks):
            self.unlock(render_id)
        with self._lock:
            self._db.close()


def open_store(root: str | Path, config: RenderConfig) -> RenderStore:
    """The store of an engine config: its index in the local folder ``root``, its render
    folders in ``config.storage`` (default: ``root`` too)."""
    return RenderStore(root, storage=open_storage(config.storage, root))


def _record(row: tuple[Any, ...]) -> RenderRecord:
    data = dict(zip(_COLUMNS, row, strict=True))
    data["spec"] = json.loads(data["spec"])
    return RenderRecord(**data)
