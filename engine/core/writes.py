"""The engine core's write path: finished frames become durable in the storage backend, and the
core counts them only then, in frame order.

A frame arrives from the executor in one of three forms (:class:`~engine.core.work.FrameOutcome`):
written by its worker already (a shared backend: only digests came back), encoded by its worker
(PNG + safetensors bytes), or as arrays (the in-process executor). A pool of writer threads
persists the last two, side by side; the frames in that pool are the *unwritten backlog* that
``cluster.max_unwritten_frames`` bounds.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.core.live import LiveRender
from engine.core.work import FrameOutcome

Written = tuple[str, int, BaseException | None]
"""(render id, frame index, the error that kept it from being written, or None)."""


class FrameWriter:
    """A pool of writer threads and the count of frames not yet durable, per render.

    Args:
        threads: Writer threads (``cluster.writers``).
        doorbell: Rung when a write finished (wakes the core's step).
        stats: The core's stats (``max_unwritten``, ``written_by_workers`` are kept here).
    """

    def __init__(self, threads: int, doorbell: threading.Event, stats: dict[str, Any]):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="write")
        self._done: queue.Queue[Written] = queue.Queue()
        self._durable: queue.Queue[Written] = queue.Queue()  # written by their workers
        self._pending: dict[str, int] = {}
        self._doorbell = doorbell
        self.stats = stats

    @property
    def unwritten(self) -> int:
        """Finished frames whose files are not durable yet (queued for or in the writers)."""
        return sum(self._pending.values())

    def writing(self, render_id: str | None = None) -> bool:
        """Frames of ``render_id`` are still being written; with None: frames of any render
        are being written or wait to be counted."""
        if render_id is None:
            return bool(self._pending) or not self._durable.empty()
        return render_id in self._pending

    def submit(self, live: LiveRender, outcome: FrameOutcome) -> None:
        """Persist a frame on a writer thread (a frame its worker wrote is durable already)."""
        if outcome.written is not None:  # durable already: nothing held here
            self.stats["written_by_workers"] += 1
            self._durable.put((live.id, outcome.index, None))
            return
        self._pending[live.id] = self._pending.get(live.id, 0) + 1
        self.stats["max_unwritten"] = max(self.stats["max_unwritten"], self.unwritten)

        def write() -> None:
            try:
                self._done.put((live.id, live.persist(outcome), None))
            except BaseException as e:
                self._done.put((live.id, outcome.index, e))
            self._doorbell.set()

        self._pool.submit(write)

    def take(self) -> Iterator[Written]:
        """The frames whose writes finished since the last call (their count released)."""
        while True:
            try:
                yield self._durable.get_nowait()
                continue
            except queue.Empty:
                pass
            try:
                render_id, index, error = self._done.get_nowait()
            except queue.Empty:
                return
            self._pending[render_id] -= 1
            if not self._pending[render_id]:
                del self._pending[render_id]
            yield render_id, index, error

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def advance(live: LiveRender, index: int) -> list[int]:
    """Record frame ``index`` of ``live`` as durable → the frames that now count (writers run
    in parallel: a frame counts once every frame before it is durable too), in order."""
    live.durable.add(index)
    counted = []
    while live.durable_upto in live.durable:
        live.durable.discard(live.durable_upto)
        counted.append(live.durable_upto)
        live.durable_upto += 1
    return counted
