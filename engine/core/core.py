"""The engine core: one render loop behind every front end (CLI, batch job, Serve, benchmarks).

vLLM v1's split: the core owns a :class:`ChainScheduler` (pure logic), an :class:`Executor`
(in-process or Ray) and a :class:`RenderStore` (SQLite + folders). One :meth:`EngineCore.step`
is schedule → execute → update:

1. schedule: admit loaded renders; start prepare stages; hand ready frames of many renders to
   the executor as batches;
2. execute: wait for what finished (:meth:`Executor.poll`);
3. update: persist frames and latents, advance the scheduler, record state and progress events,
   and hand finished renders to the finisher (video, contact sheet, manifest, metrics).

Submissions and cancellations come from any thread while another thread steps (continuous
admission: a new render joins the next batches of the running ones). Input faults fail their
render at once; infrastructure faults are retried up to ``cluster.max_attempts``; nothing ends
the core or another render (see :mod:`engine.core.faults`). A new core on the same storage root
resumes every unfinished render from its last persisted frame.
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from engine.config import RenderConfig
from engine.core.dispatch import Dispatcher
from engine.core.executor import (
    BatchDone,
    BatchFailed,
    Executor,
    Outcome,
    PrepareFailed,
    StageStarted,
)
from engine.core.faults import classify, describe
from engine.core.handover import RenderFinisher, RenderLoader
from engine.core.inputs import snapshot_inputs
from engine.core.live import LiveRender, save_prepared
from engine.core.outputs import remove_render
from engine.core.recovery import Recovery
from engine.core.scheduler import ChainScheduler, Progress, Stage
from engine.core.sizing import initial_max_preparing
from engine.core.store import (
    FINAL_STATES,
    STATES,
    ConflictError,
    QueueFullError,
    RenderRecord,
    RenderStore,
    UnknownRenderError,
    check_id,
    new_id,
)
from engine.core.writes import FrameWriter, WritePath

log = logging.getLogger(__name__)

__all__ = ["ConflictError", "EngineCore", "QueueFullError", "UnknownRenderError"]

_STATE = {
    Stage.QUEUED: "queued",
    Stage.PREPARING: "refining",
    Stage.RENDERING: "rendering",
    Stage.DONE: "encoding",
    Stage.FAILED: "failed",
    Stage.CANCELLED: "cancelled",
}


class EngineCore:
    """Owns a scheduler, an executor and a store; thread-safe.

    Args:
        config: Engine settings shared by every render (``model`` and ``cluster`` sections).
        store: The durable store (its unfinished renders are resumed now).
        executor: Runs prepare stages and frame batches.
        on_event: Called (on the stepping thread) with every progress event dict.
        resume: Resume the store's unfinished renders.
    """

    def __init__(
        self,
        config: RenderConfig,
        store: RenderStore,
        executor: Executor,
        *,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        resume: bool = True,
    ):
        c = config.cluster
        self.config = config
        self.store = store
        self.executor = executor
        self.on_event = on_event
        self.scheduler = ChainScheduler(
            max_batch=c.max_batch, max_preparing=initial_max_preparing(c)
        )
        self._lock = threading.RLock()
        self._live: dict[str, LiveRender] = {}
        counters = ("retries", "restarts_waited", "max_unwritten", "held_for_writes",
                    "written_by_workers")  # fmt: skip
        self.stats: dict[str, Any] = {"batch_sizes": [], "batches": []}
        self.stats.update(dict.fromkeys(counters, 0))
        self._closed = False
        # Rung by the writer, finishers and loader (and the executor's background work) when
        # they hand something over, so an idle step wakes for it instead of sleeping 50 ms.
        self._doorbell = threading.Event()
        executor.doorbell = self._doorbell
        # Frames are written by writer threads (or by the Samplers on a shared backend) and count
        # only once durable; at most cluster.max_unwritten_frames wait for it (bounded memory).
        self._writer = FrameWriter(c.writers, self._doorbell, self.stats)
        self._loader = RenderLoader(store, config.model, self._doorbell, c.loaders)
        self._finisher = RenderFinisher(self._doorbell)
        self._loading, self._finishing = self._loader.loading, self._finisher.finishing
        self._recovery = Recovery(self.scheduler, store, c, self._live, self._event, self.stats)
        self._dispatch = Dispatcher(self.scheduler, executor, c, self._live, self._loading,
                                    lambda: self._writer.unwritten, self.stats)  # fmt: skip
        self._writes = WritePath(self._writer, self.scheduler, store, self._recovery, self._live,
                                 self._finishing.__contains__, self._event, self._finish,
                                 self._fail_now)  # fmt: skip
        if resume:
            for record in store.unfinished():
                log.info("resuming render %s (%s)", record.id, record.state)
                self._loader.admit(record.id, RenderConfig.model_validate(record.spec))

    # -- front-end API (any thread) -----------------------------------------------------------

    def submit(
        self,
        spec: RenderConfig,
        *,
        id: str | None = None,
        priority: int = 0,
        owner: str = "",
        retry: bool = False,
    ) -> str:
        """Queue a render; returns its id.

        With a client-chosen ``id`` the call is idempotent: the same spec returns the existing
        render (re-queued when ``retry`` and it FAILED or was CANCELLED), another spec raises
        :class:`ConflictError`. Raises :class:`ConfigError` for a spec without prompt or poses
        or an invalid id, :class:`QueueFullError` past ``cluster.max_queued`` unfinished renders.
        """
        spec.require_spec()
        data = spec.model_dump(mode="json")
        with self._lock:
            if id is not None:
                check_id(id)
                record = self.store.get(id)
                if record is not None:
                    if record.spec != data or record.owner != owner:
                        raise ConflictError(
                            f"render {id!r} exists with a different spec; choose another id"
                        )
                    if retry and record.state in ("failed", "cancelled"):
                        snapshot_inputs(self.store.files(id), spec)
                        self.store.update(id, error=None, error_kind=None, attempts=0)
                        self._set_state(id, "queued")
                        self._loader.admit(id, spec)
                    return id
            else:
                id = new_id()
            limit = self.config.cluster.max_queued
            if self.store.count(tuple(s for s in STATES if s not in FINAL_STATES)) >= limit:
                raise QueueFullError(f"{limit} renders are queued or running; retry later")
            self.store.create(id, data, priority=priority, owner=owner)
            snapshot_inputs(self.store.files(id), spec)  # the inputs travel with the render
            self._event(id, {"type": "state", "state": "queued"})
            self._loader.admit(id, spec)
        return id

    def cancel(self, render_id: str) -> RenderRecord:
        """Cancel a queued or running render (a no-op for finished ones); frees its slots."""
        with self._lock:
            record = self.get(render_id)
            if record.final:
                return record
            if render_id in self._live and not self.scheduler.stage(render_id).final:
                self.scheduler.cancel(render_id)
                self._drain_scheduler()
            else:  # still loading or finishing: the result is dropped when it arrives
                self._end(render_id, "cancelled")
            return self.get(render_id)

    def delete(self, render_id: str, timeout_s: float = 60.0) -> None:
        """Cancel the render if it is unfinished, wait until nothing works on it (its load,
        frame writes and encoding hand back), then remove its files and row
        (:func:`~engine.core.outputs.remove_render`). ``TimeoutError`` after ``timeout_s``."""
        self.cancel(render_id)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                self._take_loaded()
                self._writes.take()
                self._take_finished()
                busy = (self._live, self._loading, self._finishing)
                if not any(render_id in b for b in busy) and not self._writer.writing(render_id):
                    remove_render(self.store, render_id)
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"render {render_id!r} still busy after {timeout_s:.0f} s")
            self._doorbell.wait(0.05)

    def get(self, render_id: str) -> RenderRecord:
        record = self.store.get(render_id)
        if record is None:
            raise UnknownRenderError(f"unknown render {render_id!r}")
        return record

    def list(self, **filters: Any) -> builtins.list[RenderRecord]:
        return self.store.list(**filters)

    def events(self, render_id: str, after: int | None = None) -> builtins.list[dict[str, Any]]:
        """The render's progress events after sequence number ``after`` (replayable)."""
        self.get(render_id)
        return self.store.events(render_id, after)

    def folder(self, render_id: str) -> Any:
        return self.store.folder(render_id)

    @property
    def idle(self) -> bool:
        with self._lock:
            busy = bool(self._loading or self._finishing or self._dispatch.inflight)
            busy = busy or self._writer.writing()
            return not busy and not any(not self.scheduler.stage(r).final for r in self._live)

    # -- the loop -----------------------------------------------------------------------------

    def step(self, timeout: float = 0.5) -> None:
        """One schedule → execute → update round; waits up to ``timeout`` for work to finish."""
        self._doorbell.clear()  # before taking: a hand-over after this rings again
        with self._lock:
            self._take_loaded()
            self._writes.take()
            self._take_finished()
            self._dispatch.dispatch()
            self._drain_scheduler()
            busy = bool(self._dispatch.inflight)
        waiting = self._dispatch.waiting_since is not None
        outcomes = self.executor.poll(0.02 if waiting else timeout if busy else 0.05)
        with self._lock:
            for outcome in outcomes:
                self._update(outcome)
            self._drain_scheduler()

    def run_until_idle(self, timeout_s: float = 3600.0) -> None:
        """Step until every render has ended; ``TimeoutError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.idle:
            if time.monotonic() > deadline:
                raise TimeoutError(f"renders not finished after {timeout_s:.0f} s")
            self.step()
        with self._lock:
            self._take_finished()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loader.close()
        self._writer.close()
        self._finisher.close()
        self.executor.close()
        self.store.close()

    # -- schedule -----------------------------------------------------------------------------

    def _take_loaded(self) -> None:
        for render_id, live in self._loader.take():
            record = self.store.get(render_id)
            if record is None or record.final:  # cancelled while loading
                if isinstance(live, LiveRender):
                    self.store.unlock(render_id)
                continue
            if isinstance(live, BaseException):
                self._fail_now(render_id, f"inputs: {describe(live)}", classify(live))
                continue
            self._live[render_id] = live
            self.store.update(render_id, fingerprint=live.key, frames_total=live.frames,
                              frames_done=live.start)  # fmt: skip
            if live.start == live.frames:  # every frame persisted: only the outputs are missing
                self._finish(live)
                continue
            if render_id in self.scheduler.known():  # re-queued after it ended
                self.scheduler.forget(render_id)
            self.scheduler.add(render_id, frames_total=live.frames, signature=live.signature,
                               priority=record.priority, frames_done=live.start)  # fmt: skip

    # -- update -------------------------------------------------------------------------------

    def _update(self, outcome: Outcome) -> None:
        if isinstance(outcome, BatchDone | BatchFailed):
            batch = self._dispatch.finished(outcome.batch_id)
            if isinstance(outcome, BatchFailed):
                self._recovery.batch_failed(batch, outcome)
            else:
                self._writes.accept(batch, outcome)
            return
        live = self._live.get(outcome.render_id)
        if live is None or self.scheduler.stage(live.id) is not Stage.PREPARING:
            return  # cancelled or failed meanwhile
        if isinstance(outcome, StageStarted):
            self._set_state(live.id, outcome.stage)
        elif isinstance(outcome, PrepareFailed):
            if outcome.worker_lost and self._recovery.wait_for_worker(live, outcome.error):
                self.scheduler.requeue_prepare(live.id)
                return
            self._recovery.retry_or_fail(live.id, outcome.error, outcome.kind, prepare=True)
        else:
            try:
                spec = save_prepared(live, outcome)
            except Exception as e:
                self._recovery.retry_or_fail(live.id, f"saving the prepare stages: {describe(e)}",
                                    classify(e), prepare=True)  # fmt: skip
                return
            if live.out.shared:  # workers write their frames into the render folder
                spec.out = live.out
            self.executor.open(live.id, spec)
            live.attempts = 0
            live.lost_since = None
            self.scheduler.prepared(live.id)

    def _drain_scheduler(self) -> None:
        for progress in self.scheduler.events():
            self._progress(progress)

    def _progress(self, p: Progress) -> None:
        live = self._live.get(p.render_id)
        state = _STATE[p.stage]
        if live is not None:
            live.eta_s = p.eta_s
        if p.stage in (Stage.RENDERING, Stage.DONE) and p.frames_done > (live.start if live else 0):
            return  # a frame: recorded when its files land (WritePath.take), DONE after the last
        self._set_state(p.render_id, state, frames_done=p.frames_done, eta_s=p.eta_s)
        if p.stage is Stage.DONE and live is not None:  # every frame was already persisted
            self._finish(live)
        elif p.stage in (Stage.FAILED, Stage.CANCELLED):
            if p.stage is Stage.FAILED:
                kind = live.error_kind if live else "infra"
                self.store.update(p.render_id, error=p.error, error_kind=kind)
                self._event(p.render_id, {"type": "error", "error": p.error, "kind": kind})
            self._release(p.render_id)

    def _finish(self, live: LiveRender) -> None:
        """Encode the outputs of a render whose frames are all persisted (finisher thread)."""
        live.rendered_at = time.monotonic()
        self._set_state(live.id, "encoding", frames_done=live.frames, eta_s=0.0)
        self._finisher.finish(live, self.executor.name, self.executor.memory())

    def _take_finished(self) -> None:
        for render_id, error in self._finisher.take():
            if self.store.get(render_id).final:  # type: ignore[union-attr]
                self.store.unlock(render_id)  # cancelled while encoding
                continue
            if error is None:
                self._end(render_id, "done")
            else:
                self._fail_now(render_id, f"outputs: {describe(error)}", classify(error))

    def _fail_now(self, render_id: str, error: str, kind: str) -> None:
        log.warning("render %s failed: %s", render_id, error)
        self.store.update(render_id, error=error, error_kind=kind)
        self._event(render_id, {"type": "error", "error": error, "kind": kind})
        self._end(render_id, "failed")

    def _end(self, render_id: str, state: str) -> None:
        self._set_state(render_id, state, eta_s=0.0 if state == "done" else None)
        self._release(render_id)

    def _set_state(self, render_id: str, state: str, **fields: Any) -> None:
        """Record ``fields`` and, when the state changes, the new state and its event."""
        record = self.store.get(render_id)
        if record is not None and record.state == state:
            if fields:
                self.store.update(render_id, **fields)
            return
        self.store.update(render_id, state=state, **fields)
        self._event(render_id, {"type": "state", "state": state, **fields})

    def _release(self, render_id: str) -> None:
        """Free everything held for a render that ended: its runtime state here, its scheduler
        entry, the executor's sessions and adapters, and (once nothing writes) its folder lock."""
        self._live.pop(render_id, None)
        if render_id in self.scheduler.known() and self.scheduler.stage(render_id).final:
            self.scheduler.forget(render_id)
        self.executor.release(render_id)
        busy = (self._finishing, self._loading)
        if not any(render_id in b for b in busy) and not self._writer.writing(render_id):
            self.store.unlock(render_id)

    def _event(self, render_id: str, data: dict[str, Any]) -> None:
        data = {"render_id": render_id, "time": round(time.time(), 3), **data}
        data["seq"] = self.store.add_event(render_id, data)
        if self.on_event is not None:
            self.on_event(data)
