"""The executor interface of the engine core, and the in-process executor.

An executor runs two kinds of work for the core, both asynchronously: the prepare stages of a
render (refine → appearance LoRA → background plate) and batches of frames of many renders. The
core hands work over with :meth:`Executor.prepare` / :meth:`Executor.execute` and collects what
finished with :meth:`Executor.poll`. :class:`InProcessExecutor` (here) keeps the models in this
process; ``actors.executor.RayExecutor`` keeps them in Ray actors.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.chain import FrameChain
from engine.config import RenderConfig
from engine.core.faults import Kind, classify, describe
from engine.core.sizing import Backlog
from engine.core.work import (
    AdapterPayload,
    FrameOutcome,
    FrameWork,
    SamplerState,
    SessionSpec,
    appearance_stage,
    background_stage,
    build_chain,
    padding_policy,
    peak_rss_mb,
    refine_stage,
)
from engine.storage import Storage


@dataclass
class PrepareJob:
    """The prepare stages one render still needs (what a resumed render persisted is reused)."""

    render_id: str
    config: RenderConfig
    keypoints0: np.ndarray
    """(18, 3) pose of frame 0 at the render size (the plate's scene)."""
    refined: dict[str, Any] | None = None
    """A persisted refined prompt (never re-queried), or None to refine."""
    adapter: AdapterPayload | None = None
    """A persisted adapter, or None to train / fetch one (when intra-frame alignment is on)."""
    plate: Any = None
    """A supplied or persisted plate ((H, W, 3) uint8), or None to make one (background on)."""
    shared: Storage | None = None
    """A backend every node reaches: the adapter cache is shared through it."""

    @property
    def needs_adapter(self) -> bool:
        return self.config.alignment.intra_frame and self.adapter is None

    @property
    def needs_plate(self) -> bool:
        return self.config.alignment.background and self.plate is None


@dataclass
class StageStarted:
    render_id: str
    stage: str
    """``refining``, ``training`` or ``background``."""


@dataclass
class Prepared:
    render_id: str
    refined: dict[str, Any]
    adapter: AdapterPayload | None
    plate: Any
    """PlateResult (made now), (H, W, 3) uint8 (supplied / persisted), or None."""
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class PrepareFailed:
    render_id: str
    error: str
    kind: Kind
    worker_lost: bool = False
    """A worker of the stages died (see :attr:`BatchFailed.worker_lost`)."""


@dataclass
class BatchDone:
    batch_id: int
    outcomes: list[FrameOutcome]
    seconds: float
    peak_rss_mb: float
    """Peak memory of the worker that ran the batch."""


@dataclass
class BatchFailed:
    """The batched forward itself failed (every frame of the batch is released)."""

    batch_id: int
    error: str
    kind: Kind
    worker_lost: bool = False
    """The worker that ran it died (its node was lost, or it is restarting): its frames go back
    to the queue without spending an attempt, for up to ``cluster.restart_wait_s``."""


Outcome = StageStarted | Prepared | PrepareFailed | BatchDone | BatchFailed


class Executor(ABC):
    """Runs prepare stages and frame batches for an :class:`~engine.core.EngineCore`."""

    name: str = "executor"
    doorbell: threading.Event | None = None
    """Set by the core: rung by the core's own threads (a frame written, a render finished)
    and by the executor's background work, so a :meth:`poll` that waits for nothing of the
    executor's returns at once instead of sleeping out its timeout."""

    def _ring(self) -> None:
        if self.doorbell is not None:
            self.doorbell.set()

    def _doze(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds, or until the doorbell rings."""
        if self.doorbell is None:
            time.sleep(timeout)
        else:
            self.doorbell.wait(timeout)

    @abstractmethod
    def prepare(self, job: PrepareJob) -> None:
        """Start the prepare stages of one render (results come from :meth:`poll`)."""

    @abstractmethod
    def open(self, render_id: str, spec: SessionSpec) -> None:
        """Register a prepared render's per-render constants with the Samplers."""

    @abstractmethod
    def free_slots(self) -> int:
        """How many more batches :meth:`execute` accepts now."""

    @abstractmethod
    def execute(self, batch_id: int, work: list[FrameWork]) -> None:
        """Start denoising one batch of frames of opened renders."""

    @abstractmethod
    def poll(self, timeout: float) -> list[Outcome]:
        """What finished, waiting up to ``timeout`` seconds for something to finish."""

    @abstractmethod
    def release(self, render_id: str) -> None:
        """Free everything held for a render that ended (any state)."""

    def resize(self, backlog: Callable[[], Backlog]) -> int | None:
        """Grow or shrink the workers for the core's queue (called every step; ``backlog`` is
        evaluated only when the executor re-plans). Returns the ``max_preparing`` the core
        should use now, or None to keep its own (fixed pools)."""
        return None

    def memory(self) -> dict[str, Any]:
        """Workers' memory: peak RSS and bytes held per open render."""
        return {}

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Stop the workers."""


class InProcessExecutor(Executor):
    """Models resident in this process.

    Frame batches run on the thread that polls (the core's step). Prepare stages run on one
    background thread with its own copy of the models, built on first need, so LoRA training
    and plates overlap with sampling exactly as on Ray.

    Args:
        config: Engine settings (``model`` and ``cluster`` sections).
        chain: Resident frame-chain models to sample with (built from ``config.model`` if None).
        overlap: Run prepare stages on a background thread with a second copy of the models
            (overlaps with sampling; worth it with several renders). False runs them on the
            polling thread with the sampling models (one render: no second copy).
    """

    name = "in-process"

    def __init__(
        self, config: RenderConfig, chain: FrameChain | None = None, *, overlap: bool = True
    ):
        self.model = config.model
        self.chain = chain or build_chain(config.model)
        self.sampler = SamplerState(self.chain, config.cluster.max_batch, padding_policy(config))
        self._specs: dict[str, SessionSpec] = {}
        self._batches: list[tuple[int, list[FrameWork]]] = []
        self._events: queue.Queue[Outcome] = queue.Queue()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prepare")
        self._prep_chain: FrameChain | None = None
        self._plate_models: dict[str, Any] = {}
        self._futures: set[Future[None]] = set()
        self.overlap = overlap
        self._pending: list[PrepareJob] = []
        self.doorbell = threading.Event()  # the core's replaces it

    def prepare(self, job: PrepareJob) -> None:
        if not self.overlap:
            self._pending.append(job)
            return
        future = self._pool.submit(self._prepare, job)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)

    def _prepare_chain(self) -> FrameChain:
        if not self.overlap:
            return self.chain
        if self._prep_chain is None:
            self._prep_chain = build_chain(self.model)
        return self._prep_chain

    def _prepare(self, job: PrepareJob) -> None:
        """refine → appearance → background, each announced and timed; any fault fails the
        job with the stage it happened in."""
        seconds: dict[str, float] = {}
        stage = "refining"

        def run(name: str, key: str, fn: Any) -> Any:
            nonlocal stage
            stage = name
            self._events.put(StageStarted(job.render_id, name))
            self._ring()
            start = time.perf_counter()
            result = fn()
            seconds[key] = time.perf_counter() - start
            return result

        try:
            refined = run("refining", "refine", lambda: job.refined or refine_stage(job.config))
            adapter = job.adapter
            if job.needs_adapter:
                chain = self._prepare_chain()
                adapter = run("training", "appearance",
                              lambda: appearance_stage(chain, job.config, refined, job.shared))  # fmt: skip
            plate = job.plate
            if job.needs_plate:
                chain, models = self._prepare_chain(), self._plate_models
                plate = run("background", "background", lambda: background_stage(
                    chain, models, job.config, refined, job.keypoints0, adapter))  # fmt: skip
            self._events.put(Prepared(job.render_id, refined, adapter, plate, seconds))
        except Exception as e:
            kind = classify(e)
            self._events.put(PrepareFailed(job.render_id, f"{stage}: {describe(e)}", kind))
        self._ring()

    def open(self, render_id: str, spec: SessionSpec) -> None:
        self._specs[render_id] = spec

    def free_slots(self) -> int:
        return 0 if self._batches else 1

    def execute(self, batch_id: int, work: list[FrameWork]) -> None:
        self._batches.append((batch_id, work))

    def poll(self, timeout: float) -> list[Outcome]:
        out: list[Outcome] = []
        if self._pending:
            self._prepare(self._pending.pop(0))
            timeout = 0.0
        elif self._batches:
            batch_id, work = self._batches.pop(0)
            start = time.perf_counter()
            try:
                outcomes = self.sampler.denoise(work, self._specs.__getitem__)
                seconds = time.perf_counter() - start
                out.append(BatchDone(batch_id, outcomes, seconds, peak_rss_mb()))
            except Exception as e:
                out.append(BatchFailed(batch_id, describe(e), classify(e)))
            timeout = 0.0
        if timeout > 0 and self._events.empty():
            self._doze(timeout)  # a prepare stage's event or the core's doorbell ends it
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def release(self, render_id: str) -> None:
        self._specs.pop(render_id, None)
        self.sampler.close(render_id)

    def memory(self) -> dict[str, Any]:
        return {"peak_rss_mb": peak_rss_mb(), "sessions_bytes": self.sampler.memory()}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
