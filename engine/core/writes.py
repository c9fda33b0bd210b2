"""The engine core's write path: finished frames become durable in the storage backend, and the
core counts them only then, in frame order.

A frame arrives from the executor in one of three forms (:class:`~engine.core.work.FrameOutcome`):
written by its worker already (a shared backend: only digests came back), encoded by its worker
(PNG + safetensors bytes), or as arrays (the in-process executor). A pool of writer threads
persists the last two, side by side; the frames in that pool are the *unwritten backlog* that
``cluster.max_unwritten_frames`` bounds. :class:`WritePath` is the core's side of it: a batch's
frames go to the writers, and once durable they count (store, progress events) in frame order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.core.executor import BatchDone
from engine.core.faults import classify, describe
from engine.core.live import LiveRender
from engine.core.recovery import EventSink, Recovery
from engine.core.scheduler import ChainScheduler, FrameRequest, Stage
from engine.core.store import RenderStore
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


class WritePath:
    """The core's write path: a finished batch's frames go to the :class:`FrameWriter`; frames
    whose files landed are recorded and announced in order, and a render whose last frame is
    durable is handed to ``finish``.

    Args:
        writer: The writer pool.
        scheduler: The core's scheduler (frames done, failures).
        store: The durable store (``frames_done``, ``eta_s``).
        recovery: Retries frames that failed on their worker.
        live: The core's live renders by id (read only).
        busy: Whether something other than the writers still uses a render's folder (its
            outputs are being encoded): an ended render's lock is released only when not.
        event: Emits a progress event for a render.
        finish: Encodes the outputs of a render whose frames are all durable.
        fail_now: Fails a render at once (``render id, reason, kind``).
    """

    def __init__(
        self,
        writer: FrameWriter,
        scheduler: ChainScheduler,
        store: RenderStore,
        recovery: Recovery,
        live: dict[str, LiveRender],
        busy: Callable[[str], bool],
        event: EventSink,
        finish: Callable[[LiveRender], None],
        fail_now: Callable[[str, str, str], None],
    ):
        self.writer, self.scheduler, self.store, self.recovery = writer, scheduler, store, recovery
        self._live, self._busy, self._event = live, busy, event
        self._finish, self._fail_now = finish, fail_now

    def accept(self, batch: list[FrameRequest], done: BatchDone) -> None:
        """A batch came back: keep each frame's latent, send it to the writers, mark it done in
        the scheduler (it counts once durable); a frame that failed is retried or fails."""
        for outcome in done.outcomes:
            live = self._live.get(outcome.render_id)
            if live is None or self.scheduler.stage(live.id) is not Stage.RENDERING:
                continue
            live.peak_rss_mb = max(live.peak_rss_mb, done.peak_rss_mb)
            if outcome.error is not None:
                request = FrameRequest(outcome.render_id, outcome.index)
                self.recovery.retry_or_fail(
                    live.id, outcome.error, outcome.kind or "infra", [request]
                )
                continue
            live.keep_latent(outcome)
            self.writer.submit(live, outcome)
            live.attempts = 0
            live.lost_since = None
            self.scheduler.frame_done(live.id, outcome.index, seconds=done.seconds)

    def take(self) -> None:
        """Frames whose files landed: record them, emit their events (in frame order), finish
        complete renders."""
        for render_id, index, error in self.writer.take():
            live = self._live.get(render_id)
            if live is None:  # ended meanwhile: release its folder once nothing writes there
                if not self.writer.writing(render_id) and not self._busy(render_id):
                    self.store.unlock(render_id)
                continue
            if error is not None:
                self._lost_frame(live, index, error)
                continue
            total = live.frames
            for frame in advance(live, index):
                fields = {"frames_done": frame + 1, "eta_s": live.eta_s}
                self.store.update(render_id, **fields)
                self._event(render_id, {"type": "frame", "frame": frame, **fields,
                                        "frames_total": total})  # fmt: skip
            if live.durable_upto == total and self.scheduler.stage(render_id) is Stage.DONE:
                self._finish(live)

    def _lost_frame(self, live: LiveRender, index: int, error: BaseException) -> None:
        """A frame's files could not be written (disk full, …): the render fails with why."""
        reason = f"saving frame {index}: {describe(error)}"
        live.error_kind = classify(error)
        if self.scheduler.stage(live.id) is Stage.DONE:
            self._fail_now(live.id, reason, live.error_kind)
        else:
            self.scheduler.fail(live.id, reason)
