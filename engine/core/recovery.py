"""What the engine core does when work fails (see :mod:`engine.core.faults` for the classes).

An input fault fails its render at once; an infrastructure fault is retried up to
``cluster.max_attempts``; work lost to a worker that is gone or restarting (node lost, actor
restarting) is requeued without spending an attempt while the render has waited less than
``cluster.restart_wait_s`` since its last finished frame — the executor restarts or replaces the
worker meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from engine.config import ClusterConfig
from engine.core.executor import BatchFailed
from engine.core.live import LiveRender
from engine.core.scheduler import ChainScheduler, FrameRequest
from engine.core.store import RenderStore

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, Any]], None]


class Recovery:
    """The core's retry policy over its scheduler, store and live renders.

    Args:
        scheduler: The core's scheduler (requeues, failures).
        store: The durable store (``attempts`` is recorded there).
        cluster: ``max_attempts`` and ``restart_wait_s``.
        live: The core's live renders by id (read only).
        event: Emits a progress event for a render.
        stats: The core's stats (``retries``, ``restarts_waited``).
    """

    def __init__(
        self,
        scheduler: ChainScheduler,
        store: RenderStore,
        cluster: ClusterConfig,
        live: dict[str, LiveRender],
        event: EventSink,
        stats: dict[str, Any],
    ):
        self.scheduler, self.store, self.cluster = scheduler, store, cluster
        self._live, self._event, self.stats = live, event, stats

    def batch_failed(self, batch: list[FrameRequest], failed: BatchFailed) -> None:
        """A whole batch failed: each of its frames is requeued, retried or failed."""
        log.warning("batch of %d frames failed: %s", len(batch), failed.error)
        self.stats["retries"] += 1
        for request in batch:
            live = self._live.get(request.render_id)
            if live is None:
                continue
            if failed.worker_lost and self.wait_for_worker(live, failed.error):
                if request in self.scheduler.in_flight():
                    self.scheduler.requeue([request])
                continue
            self.retry_or_fail(request.render_id, failed.error, failed.kind, [request])

    def wait_for_worker(self, live: LiveRender, error: str) -> bool:
        """True while ``live`` may wait for a lost worker without spending an attempt."""
        if self.scheduler.stage(live.id).final:
            return False
        now = time.monotonic()
        live.lost_since = live.lost_since or now
        if now - live.lost_since > self.cluster.restart_wait_s:
            return False
        self.stats["restarts_waited"] += 1
        self._event(live.id, {"type": "retry", "error": error, "attempt": live.attempts,
                              "worker_lost": True})  # fmt: skip
        return True

    def retry_or_fail(
        self,
        render_id: str,
        error: str,
        kind: str,
        requests: list[FrameRequest] | None = None,
        *,
        prepare: bool = False,
    ) -> None:
        """An infra fault is retried up to ``cluster.max_attempts``; an input fault fails now."""
        live = self._live[render_id]
        if self.scheduler.stage(render_id).final:
            return
        live.attempts += 1
        self.store.update(render_id, attempts=live.attempts)
        limit = self.cluster.max_attempts
        if kind == "infra" and live.attempts < limit:
            log.warning("render %s: %s (attempt %d of %d, retrying)", render_id, error,
                        live.attempts, limit)  # fmt: skip
            self._event(render_id, {"type": "retry", "error": error, "attempt": live.attempts})
            if prepare:
                self.scheduler.requeue_prepare(render_id)
            else:
                self.scheduler.requeue(
                    [r for r in requests or [] if r in self.scheduler.in_flight()]
                )
            return
        if kind == "infra":
            error = f"{error} (failed {live.attempts} attempts)"
        live.error_kind = kind
        self.scheduler.fail(render_id, error)
