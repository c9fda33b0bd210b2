"""The engine core's dispatch: prepare stages and batches of ready frames handed to the executor.

Each :meth:`Dispatcher.dispatch` first lets the executor resize its elastic pools to the queue
(``Executor.resize``; it may also widen the prepare window), then starts the prepare stages the scheduler admits, then fills the
executor's free slots with batches of frames of many renders, unless

* the unwritten backlog is full (``cluster.max_unwritten_frames``: the writers catch up first,
  so the core's memory stays bounded), or
* the batch window holds a part-full batch back while renders are still being loaded or
  prepared (``cluster.batch_wait_s``), so they join the running renders' batches in step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from engine.config import ClusterConfig
from engine.core.executor import Executor
from engine.core.live import LiveRender
from engine.core.scheduler import ChainScheduler, FrameRequest, Stage
from engine.core.sizing import queue_backlog


class Dispatcher:
    """Hands the scheduler's work to the executor and keeps the batches in flight.

    Args:
        scheduler: The core's scheduler.
        executor: Runs prepare stages and batches.
        cluster: ``max_batch``, ``batch_wait_s``, ``max_unwritten_frames``.
        live: The core's live renders by id (read only).
        loading: Renders being loaded (read only; they count as preparing for the window).
        unwritten: The number of finished frames not durable yet.
        stats: The core's stats (``batch_sizes``, ``batches``, ``held_for_writes``).
    """

    def __init__(
        self,
        scheduler: ChainScheduler,
        executor: Executor,
        cluster: ClusterConfig,
        live: dict[str, LiveRender],
        loading: set[str],
        unwritten: Callable[[], int],
        stats: dict[str, Any],
    ):
        self.scheduler, self.executor, self.cluster = scheduler, executor, cluster
        self._live, self._loading, self._unwritten, self.stats = live, loading, unwritten, stats
        self.inflight: dict[int, list[FrameRequest]] = {}
        """Batches handed to the executor and not finished, by batch id."""
        self.waiting_since: float | None = None
        """When the batch window started holding a part-full batch (None: not holding)."""
        self._serial = 0

    def dispatch(self) -> None:
        """Resize elastic pools, start admitted prepare stages, hand out batches to free slots."""
        limit = self.executor.resize(partial(queue_backlog, self.scheduler))
        self.scheduler.max_preparing = limit or self.scheduler.max_preparing
        for render_id in self.scheduler.next_prepares():
            self.executor.prepare(self._live[render_id].prepare_job())
        while self.executor.free_slots() > 0:
            if self._unwritten() >= self.cluster.max_unwritten_frames:
                self.stats["held_for_writes"] += 1  # the writers catch up first (bounded memory)
                return
            batch = self.scheduler.next_batch()
            if not batch:
                return
            if self._hold(batch):
                self.scheduler.requeue(batch)
                return
            self.waiting_since = None
            self._serial += 1
            self.inflight[self._serial] = batch
            self.stats["batch_sizes"].append(len(batch))
            self.stats["batches"].append([(r.render_id, r.index) for r in batch])
            work = [self._live[r.render_id].work(r.index) for r in batch]
            self.executor.execute(self._serial, work)

    def finished(self, batch_id: int) -> list[FrameRequest]:
        """The frames of a batch that came back (no longer in flight)."""
        return self.inflight.pop(batch_id, [])

    def _hold(self, batch: list[FrameRequest]) -> bool:
        """Wait window: hold back a part-full batch while renders are still being loaded or
        prepared (they would otherwise join one frame later, unbatched, and stay out of step
        with the full batches), at most ``cluster.batch_wait_s``."""
        c = self.cluster
        if len(batch) >= c.max_batch or c.batch_wait_s <= 0:
            return False
        preparing = bool(self._loading) or any(
            self.scheduler.stage(r) is Stage.PREPARING for r in self.scheduler.active()
        )
        if not preparing:
            return False
        now = time.monotonic()
        if self.waiting_since is None:
            self.waiting_since = now
        return now - self.waiting_since < c.batch_wait_s
