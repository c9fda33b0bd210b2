"""Chain scheduler: which renders to prepare and which frames to denoise together (pure logic).

A render ("character") goes QUEUED → PREPARING (refine, appearance LoRA, background plate) →
RENDERING (its autoregressive frame chain) → DONE, or ends FAILED / CANCELLED. A chain is strictly
sequential: frame ``t + 1`` is scheduled only after frame ``t`` is done, so each render has at
most one frame in flight. Throughput comes from batching the ready frames of *different* renders
into one sampler call; a batch only holds renders of one ``signature`` (resolution, steps, mode).

The batch goes to the signature group of the most deserving ready render, where deserving means
highest priority, then least recently served (no render starves), then submission order; it is
filled from that group in the same order, up to ``max_batch`` frames.

This module is the scheduler of the vLLM-style loop ``schedule → execute → update``: it owns no
workers, imports neither Ray nor torch, and is tested on CPU with fake runners. The engine core
(:mod:`engine.core.core`) calls :meth:`ChainScheduler.next_prepares` / :meth:`~ChainScheduler.next_batch`,
runs the work, and reports back with :meth:`~ChainScheduler.prepared`,
:meth:`~ChainScheduler.frame_done`, :meth:`~ChainScheduler.requeue` and friends.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from enum import StrEnum


class Stage(StrEnum):
    """Life-cycle stage of one render (a ``str`` enum: ``Stage.DONE == "done"``)."""

    QUEUED = "queued"
    PREPARING = "preparing"
    RENDERING = "rendering"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """True for DONE, FAILED and CANCELLED (no further transitions)."""
        return self in (Stage.DONE, Stage.FAILED, Stage.CANCELLED)


@dataclass(frozen=True)
class FrameRequest:
    """Frame ``index`` (0-based) of render ``render_id``, to be denoised."""

    render_id: str
    index: int


@dataclass(frozen=True)
class Progress:
    """A progress event or status snapshot of one render.

    ``eta_s`` is the mean measured seconds per frame of this render times the frames left
    (``None`` until one frame has been done in this session; 0.0 once DONE; ``None`` when FAILED
    or CANCELLED). ``error`` is set for FAILED renders only.
    """

    render_id: str
    stage: Stage
    frames_done: int
    frames_total: int
    eta_s: float | None
    error: str | None = None


class UnknownRenderError(ValueError, KeyError):
    """A render id the scheduler was never given (both a ValueError and a KeyError)."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else ""


@dataclass
class _Flight:
    """The one in-flight frame of a render."""

    index: int
    batch: int  # serial number of the batch that carried it
    slot: int  # its position in that batch
    prev_served: int  # the render's last_served before that batch (restored on requeue)


@dataclass
class _Render:
    """Book-keeping of one render."""

    render_id: str
    frames_total: int
    signature: Hashable
    priority: int
    seq: int  # submission order
    frames_done: int
    stage: Stage = Stage.QUEUED
    error: str | None = None
    last_served: int = -1  # serial of its last frame handed out (all renders); -1 = never
    flight: _Flight | None = None
    mark: float | None = None  # clock at the start of rendering or at the last frame done
    spent_s: float = 0.0  # measured seconds over the frames done in this session
    measured: int = 0  # frames done in this session

    def eta(self) -> float | None:
        """Seconds left (see :class:`Progress`)."""
        if self.stage is Stage.DONE:
            return 0.0
        if self.stage.final or self.measured == 0:
            return None
        return self.spent_s / self.measured * (self.frames_total - self.frames_done)

    def progress(self) -> Progress:
        return Progress(
            self.render_id,
            self.stage,
            self.frames_done,
            self.frames_total,
            self.eta(),
            self.error,
        )


class ChainScheduler:
    """Schedules the prepare stages and batched frame chains of many renders.

    Args:
        max_batch: Most frames (of different renders) in one sampler call, ≥ 1.
        max_preparing: Most renders in PREPARING at once, ≥ 1.
        clock: Monotonic seconds; used to measure seconds per frame when :meth:`frame_done`
            is not given them (a fake clock in tests).
    """

    def __init__(
        self,
        *,
        max_batch: int = 8,
        max_preparing: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_preparing < 1:
            raise ValueError(f"max_preparing must be >= 1, got {max_preparing}")
        self.max_batch = max_batch
        self.max_preparing = max_preparing
        self._clock = clock
        self._renders: dict[str, _Render] = {}  # in submission order
        self._events: list[Progress] = []
        self._batches = 0  # serial number of the last batch handed out
        self._served = 0  # serial number of the last frame handed out

    # -- submission -------------------------------------------------------------------------

    def add(
        self,
        render_id: str,
        *,
        frames_total: int,
        signature: Hashable,
        priority: int = 0,
        frames_done: int = 0,
    ) -> None:
        """Queue a new render (QUEUED); ``frames_done > 0`` resumes after persisted frames.

        Raises:
            ValueError: duplicate ``render_id``, ``frames_total < 1`` or ``frames_done`` outside
                ``[0, frames_total]``.
        """
        if render_id in self._renders:
            stage = self._renders[render_id].stage.value
            raise ValueError(f"render {render_id!r} was already added (stage {stage})")
        if frames_total < 1:
            raise ValueError(f"render {render_id!r}: frames_total must be >= 1, got {frames_total}")
        if not 0 <= frames_done <= frames_total:
            raise ValueError(
                f"render {render_id!r}: frames_done={frames_done} must lie in "
                f"[0, frames_total={frames_total}]"
            )
        render = _Render(
            render_id, frames_total, signature, priority, len(self._renders), frames_done
        )
        self._renders[render_id] = render
        self._emit(render)

    def cancel(self, render_id: str) -> None:
        """Cancel a render from any non-final state (a no-op for finished ones).

        Its in-flight frame is released; a late :meth:`frame_done` for it is ignored.
        """
        render = self._get(render_id)
        if render.stage.final:
            return
        render.stage, render.flight = Stage.CANCELLED, None
        self._emit(render)

    def forget(self, render_id: str) -> None:
        """Drop a render that ended (DONE, FAILED or CANCELLED) so its id can be added again."""
        render = self._get(render_id)
        if not render.stage.final:
            raise ValueError(f"forget({render_id!r}): render is {render.stage.value}, not final")
        del self._renders[render_id]

    # -- prepare stages ---------------------------------------------------------------------

    def next_prepares(self) -> list[str]:
        """QUEUED renders to start preparing now (→ PREPARING), highest priority first.

        At most ``max_preparing`` renders are PREPARING at once; ties go by submission order.
        """
        busy = sum(r.stage is Stage.PREPARING for r in self._renders.values())
        queued = [r for r in self._renders.values() if r.stage is Stage.QUEUED]
        queued.sort(key=lambda r: (-r.priority, r.seq))
        started = queued[: max(0, self.max_preparing - busy)]
        for render in started:
            render.stage = Stage.PREPARING
            self._emit(render)
        return [r.render_id for r in started]

    def prepared(self, render_id: str) -> None:
        """PREPARING → RENDERING (→ DONE at once when every frame was already persisted).

        Ignored for CANCELLED or FAILED renders (a prepare may finish after a cancel).
        """
        render = self._get(render_id)
        if render.stage in (Stage.CANCELLED, Stage.FAILED):
            return
        self._expect(render, Stage.PREPARING, "prepared")
        done = render.frames_done == render.frames_total
        render.stage = Stage.DONE if done else Stage.RENDERING
        render.mark = self._clock()
        self._emit(render)

    def requeue_prepare(self, render_id: str) -> None:
        """PREPARING → QUEUED (the prepare worker died); it keeps its place in the queue.

        Ignored for CANCELLED or FAILED renders.
        """
        render = self._get(render_id)
        if render.stage in (Stage.CANCELLED, Stage.FAILED):
            return
        self._expect(render, Stage.PREPARING, "requeue_prepare")
        render.stage = Stage.QUEUED
        self._emit(render)

    # -- frames -----------------------------------------------------------------------------

    def next_batch(self) -> list[FrameRequest]:
        """The frames to denoise together now (marked in flight); empty when nothing is ready.

        Ready = RENDERING with no frame in flight. All frames share the signature of the most
        deserving ready render (priority, then least recently served, then submission order);
        the batch is filled from that group in the same order, up to ``max_batch``. Equal-priority
        renders of one signature are thus served round-robin: each within ``ceil(K / max_batch)``
        consecutive batches of that group, whatever their lengths.
        """
        ready = [
            r for r in self._renders.values() if r.stage is Stage.RENDERING and r.flight is None
        ]
        if not ready:
            return []
        ready.sort(key=lambda r: (-r.priority, r.last_served, r.seq))
        signature = ready[0].signature
        chosen = [r for r in ready if r.signature == signature][: self.max_batch]
        self._batches += 1
        for slot, render in enumerate(chosen):
            render.flight = _Flight(render.frames_done, self._batches, slot, render.last_served)
            self._served += 1  # frame serials, not batch serials: served renders go to the back
            render.last_served = self._served  # of the round in batch order (no ties)
        return [FrameRequest(r.render_id, r.frames_done) for r in chosen]

    def frame_done(self, render_id: str, index: int, *, seconds: float | None = None) -> None:
        """Frame ``index`` of ``render_id`` is finished (and persisted); DONE after the last one.

        Args:
            seconds: Measured seconds for this frame; by default the clock time since the
                previous frame of this render was done (or since it started rendering).

        Raises:
            ValueError: ``index`` is not the render's in-flight frame (ignored, no error, for
                CANCELLED and FAILED renders), or ``seconds < 0``.
        """
        render = self._get(render_id)
        if render.stage in (Stage.CANCELLED, Stage.FAILED):
            return
        flight = render.flight
        if render.stage is not Stage.RENDERING or flight is None or flight.index != index:
            held = f"frame {flight.index}" if flight is not None else "no frame"
            raise ValueError(
                f"frame_done({render_id!r}, {index}): render {render_id!r} "
                f"({render.stage.value}) has {held} in flight"
            )
        if seconds is not None and seconds < 0:
            raise ValueError(f"frame_done({render_id!r}, {index}): seconds={seconds} is negative")
        now = self._clock()
        start = render.mark if render.mark is not None else now
        render.spent_s += seconds if seconds is not None else max(0.0, now - start)
        render.measured += 1
        render.mark = now
        render.frames_done += 1
        render.flight = None
        if render.frames_done == render.frames_total:
            render.stage = Stage.DONE
        self._emit(render)

    def requeue(self, requests: Iterable[FrameRequest]) -> None:
        """Release in-flight frames after an executor failure; they are scheduled again.

        States are unchanged and each render gets back its place in the fairness order.
        Requests of CANCELLED or FAILED renders are ignored.

        Raises:
            ValueError: a request is not its render's in-flight frame (nothing is changed).
        """
        releases: dict[str, _Render] = {}
        for request in requests:
            render = self._get(request.render_id)
            if render.stage in (Stage.CANCELLED, Stage.FAILED):
                continue
            flight = render.flight
            if flight is None or flight.index != request.index:
                held = f"frame {flight.index}" if flight is not None else "no frame"
                raise ValueError(
                    f"requeue of {request}: render {request.render_id!r} "
                    f"({render.stage.value}) has {held} in flight"
                )
            releases[render.render_id] = render
        for render in releases.values():
            assert render.flight is not None
            render.last_served = render.flight.prev_served
            render.flight = None

    def fail(self, render_id: str, error: str) -> None:
        """This render fails alone (FAILED, ``error`` kept); its in-flight frame is released.

        Ignored for CANCELLED renders and already FAILED ones (the first error is kept).

        Raises:
            ValueError: the render is already DONE.
        """
        render = self._get(render_id)
        if render.stage in (Stage.CANCELLED, Stage.FAILED):
            return
        if render.stage is Stage.DONE:
            raise ValueError(f"fail({render_id!r}, {error!r}): render is already done")
        render.stage, render.error, render.flight = Stage.FAILED, error, None
        self._emit(render)

    # -- queries ----------------------------------------------------------------------------

    def status(self, render_id: str) -> Progress:
        """A snapshot of one render; :class:`UnknownRenderError` for unknown ids."""
        return self._get(render_id).progress()

    def stage(self, render_id: str) -> Stage:
        """The stage of one render (``status(id).stage`` without computing its progress)."""
        return self._get(render_id).stage

    def events(self) -> list[Progress]:
        """Progress events since the last call, in order.

        One per state change or finished frame; the last frame of a render gives one DONE event.
        """
        events, self._events = self._events, []
        return events

    def in_flight(self) -> list[FrameRequest]:
        """Frames handed out by :meth:`next_batch`, not yet done or released; in batch order."""
        flights = [(r.flight, r.render_id) for r in self._renders.values() if r.flight]
        flights.sort(key=lambda fr: (fr[0].batch, fr[0].slot))
        return [FrameRequest(render_id, flight.index) for flight, render_id in flights]

    def known(self) -> list[str]:
        """Ids of every render added (and not forgotten), in submission order."""
        return list(self._renders)

    def active(self) -> list[str]:
        """Ids of the renders PREPARING or RENDERING, in submission order."""
        busy = (Stage.PREPARING, Stage.RENDERING)
        return [r.render_id for r in self._renders.values() if r.stage in busy]

    def counts(self) -> Counter[Stage]:
        """How many renders are in each stage (one pass; for the elastic sizing)."""
        return Counter(r.stage for r in self._renders.values())

    @property
    def finished(self) -> bool:
        """True when every render is DONE, FAILED or CANCELLED (also when there are none)."""
        return all(r.stage.final for r in self._renders.values())

    # -- helpers ----------------------------------------------------------------------------

    def _get(self, render_id: str) -> _Render:
        try:
            return self._renders[render_id]
        except KeyError:
            known = ", ".join(map(repr, list(self._renders)[:8])) or "none"
            raise UnknownRenderError(
                f"unknown render {render_id!r} (known: {known}); add() it first"
            ) from None

    @staticmethod
    def _expect(render: _Render, stage: Stage, call: str) -> None:
        if render.stage is not stage:
            raise ValueError(
                f"{call}({render.render_id!r}): render is {render.stage.value}, "
                f"expected {stage.value}"
            )

    def _emit(self, render: _Render) -> None:
        self._events.append(render.progress())
