"""ChainScheduler on CPU with fake runners: no weights, no Ray, no threads, no sleeping.

A small synchronous reference driver (:func:`drive`) plays the role of the engine core: each
step it completes the prepares started the step before, starts new ones, takes one batch, runs it
on a :class:`FakeSampler` and reports the results back. Every batch is checked against the chain
invariants as it is handed out.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine.core.scheduler import ChainScheduler, FrameRequest, Progress, Stage, UnknownRenderError

Specs = dict[str, dict[str, Any]]  # render_id → ChainScheduler.add() keyword arguments


class ExecutorDied(RuntimeError):
    """What a dead Sampler actor looks like to the driver (RayActorError in production)."""


@dataclass
class FakeClock:
    """Manually advanced monotonic clock (seconds)."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeSampler:
    """Stands in for the Sampler actors: records every batch it is given.

    Args:
        seconds: Fake-clock seconds one batch takes.
        fail_calls: 1-based call numbers that raise :class:`ExecutorDied` (whole batch lost).
        poison: ``render_id → frame index`` whose result is an error (that render fails alone).
    """

    clock: FakeClock
    seconds: float = 1.0
    fail_calls: set[int] = field(default_factory=set)
    poison: dict[str, int] = field(default_factory=dict)
    batches: list[list[FrameRequest]] = field(default_factory=list)

    def __call__(self, batch: list[FrameRequest]) -> list[dict[str, Any]]:
        self.batches.append(list(batch))
        if len(self.batches) in self.fail_calls:
            raise ExecutorDied(f"sampler died on call {len(self.batches)}")
        self.clock.advance(self.seconds)
        results: list[dict[str, Any]] = []
        for r in batch:
            result: dict[str, Any] = {"render_id": r.render_id, "index": r.index}
            if self.poison.get(r.render_id) == r.index:
                result["error"] = f"NaN latent in {r.render_id} frame {r.index}"
            results.append(result)
        return results


@dataclass
class Trace:
    """What happened during :func:`drive`."""

    prepares: list[str] = field(default_factory=list)
    batches: list[list[FrameRequest]] = field(default_factory=list)  # the successful ones
    done: dict[str, list[int]] = field(default_factory=dict)
    events: list[Progress] = field(default_factory=list)


def make(
    renders: Specs, *, max_batch: int = 8, max_preparing: int = 8
) -> tuple[ChainScheduler, FakeClock]:
    """A scheduler on a fake clock with ``renders`` (id → add() keyword arguments) added."""
    clock = FakeClock()
    sched = ChainScheduler(max_batch=max_batch, max_preparing=max_preparing, clock=clock)
    for render_id, kwargs in renders.items():
        sched.add(render_id, **{"signature": "sig", "frames_total": 4, **kwargs})
    return sched, clock


def check_batch(
    sched: ChainScheduler,
    batch: list[FrameRequest],
    signatures: dict[str, Hashable],
    expected_next: dict[str, int],
) -> None:
    """The chain invariants: one frame per render, one signature, in order, within max_batch."""
    ids = [r.render_id for r in batch]
    assert 1 <= len(batch) <= sched.max_batch
    assert len(set(ids)) == len(ids), f"two frames of one render in {batch}"
    assert len({signatures[i] for i in ids}) == 1, f"signatures mixed in {batch}"
    assert sched.in_flight() == batch  # the driver is synchronous: only this batch flies
    for r in batch:
        assert sched.status(r.render_id).stage is Stage.RENDERING
        assert r.index == expected_next[r.render_id], f"{r} out of chain order"


def drive(
    sched: ChainScheduler,
    sampler: FakeSampler,
    renders: Specs,
    *,
    prepare_deaths: dict[str, int] | None = None,
    on_step: Callable[[int, ChainScheduler], None] | None = None,
    max_steps: int = 500,
) -> Trace:
    """Run the synchronous reference driver loop until the scheduler is finished.

    Args:
        renders: The ``make`` specification (signatures and resumed frames are read from it).
        prepare_deaths: ``render_id → n``: its prepare worker dies the first ``n`` times.
        on_step: Called at the start of every step (to cancel renders mid-run).
    """
    trace = Trace()
    deaths = dict(prepare_deaths or {})
    signatures = {rid: spec.get("signature", "sig") for rid, spec in renders.items()}
    expected_next = {rid: spec.get("frames_done", 0) for rid, spec in renders.items()}
    preparing: list[str] = []
    for step in range(max_steps):
        if sched.finished:
            trace.events += sched.events()
            return trace
        if on_step is not None:
            on_step(step, sched)
        # 1. prepares started last step complete (or their worker died)
        for render_id in preparing:
            if deaths.get(render_id, 0) > 0:
                deaths[render_id] -= 1
                sched.requeue_prepare(render_id)
            else:
                sched.prepared(render_id)
        # 2. schedule
        preparing = sched.next_prepares()
        trace.prepares += preparing
        batch = sched.next_batch()
        # 3. execute and update
        if batch:
            check_batch(sched, batch, signatures, expected_next)
            try:
                results = sampler(batch)
            except ExecutorDied:
                sched.requeue(batch)
                results = []
            else:
                trace.batches.append(batch)
            for result in results:
                render_id, index = result["render_id"], result["index"]
                if "error" in result:
                    sched.fail(render_id, result["error"])
                    continue
                sched.frame_done(render_id, index)
                trace.done.setdefault(render_id, []).append(index)
                expected_next[render_id] = index + 1
        trace.events += sched.events()
    raise AssertionError(f"not finished after {max_steps} steps: {sched.active()}")


def ids(batch: list[FrameRequest]) -> set[str]:
    return {r.render_id for r in batch}


# -- ordering and batching -------------------------------------------------------------------


def test_every_frame_once_in_chain_order() -> None:
    renders: Specs = {
        "a": {"frames_total": 5, "signature": "512"},
        "b": {"frames_total": 2, "signature": "768", "priority": 1},
        "c": {"frames_total": 7, "signature": "512"},
        "d": {"frames_total": 3, "signature": "768"},
        "e": {"frames_total": 1, "signature": "512", "priority": 2},
    }
    sched, clock = make(renders, max_batch=2, max_preparing=2)
    trace = drive(sched, FakeSampler(clock), renders)
    for render_id, spec in renders.items():
        assert trace.done[render_id] == list(range(spec["frames_total"]))
        assert sched.status(render_id).stage is Stage.DONE
    assert sched.finished and sched.active() == [] and sched.in_flight() == []


def test_equal_signatures_fill_one_batch() -> None:
    renders: Specs = {f"r{i}": {"frames_total": 6} for i in range(4)}
    sched, clock = make(renders, max_batch=8)
    trace = drive(sched, FakeSampler(clock), renders)
    assert [len(b) for b in trace.batches] == [4] * 6


def test_signatures_never_mix_and_max_batch_holds() -> None:
    renders: Specs = {f"a{i}": {"frames_total": 3, "signature": (512, 512, 4)} for i in range(3)}
    renders |= {f"b{i}": {"frames_total": 3, "signature": (768, 512, 4)} for i in range(2)}
    sched, clock = make(renders, max_batch=2)
    trace = drive(sched, FakeSampler(clock), renders)  # check_batch asserts both per batch
    assert max(len(b) for b in trace.batches) == 2
    assert all(trace.done[rid] == [0, 1, 2] for rid in renders)


# -- fairness and priorities -----------------------------------------------------------------


def test_round_robin_serves_everyone_even_a_long_render() -> None:
    renders: Specs = {f"r{i}": {"frames_total": 10} for i in range(4)} | {
        "long": {"frames_total": 40}
    }
    sched, clock = make(renders, max_batch=2)
    trace = drive(sched, FakeSampler(clock), renders)
    window = math.ceil(len(renders) / 2)
    first_done = min(len(trace.batches), 20)  # every render is still unfinished up to here
    for start in range(first_done - window + 1):
        served = set().union(*(ids(b) for b in trace.batches[start : start + window]))
        assert served == set(renders), f"starved in batches {start}..{start + window - 1}"
    counts = {rid: sum(rid in ids(b) for b in trace.batches[:20]) for rid in renders}
    assert counts == dict.fromkeys(renders, 8)  # the long render takes no more than its share
    assert trace.done["long"] == list(range(40))


def test_a_lone_signature_is_not_starved() -> None:
    renders: Specs = {"a": {"frames_total": 6}, "b": {"frames_total": 6}, "x": {"frames_total": 3}}
    renders["x"]["signature"] = "other"
    sched, clock = make(renders, max_batch=2)
    trace = drive(sched, FakeSampler(clock), renders)
    x_batches = [i for i, b in enumerate(trace.batches) if "x" in ids(b)]
    assert x_batches == [1, 3, 5]  # every other batch, alternating with the {a, b} group


def test_higher_priority_is_prepared_first_and_always_batched() -> None:
    renders: Specs = {rid: {"frames_total": 4} for rid in ("a", "b", "c")}
    renders["vip"] = {"frames_total": 4, "priority": 5, "signature": "other"}
    sched, clock = make(renders, max_batch=2, max_preparing=1)
    trace = drive(sched, FakeSampler(clock), renders)
    assert trace.prepares == ["vip", "a", "b", "c"]
    first = next(i for i, b in enumerate(trace.batches) if "vip" in ids(b))
    assert all("vip" in ids(b) for b in trace.batches[first : first + 4])
    assert trace.done["vip"] == [0, 1, 2, 3]


def test_priority_wins_a_place_over_fairness() -> None:
    renders: Specs = {"low1": {"frames_total": 3}, "low2": {"frames_total": 3}}
    renders["high"] = {"frames_total": 3, "priority": 1}
    sched, clock = make(renders, max_batch=2)
    trace = drive(sched, FakeSampler(clock), renders)
    assert [ids(b) for b in trace.batches[:3]] == [
        {"high", "low1"},
        {"high", "low2"},
        {"high", "low1"},
    ]


# -- cancellation ----------------------------------------------------------------------------


def test_cancel_queued_and_rendering_renders() -> None:
    renders: Specs = {rid: {"frames_total": 6} for rid in ("a", "b", "c", "d")}
    sched, clock = make(renders, max_batch=4, max_preparing=2)
    sched.cancel("d")  # still QUEUED

    def cancel_b(step: int, s: ChainScheduler) -> None:
        if step == 3:
            s.cancel("b")

    trace = drive(sched, FakeSampler(clock), renders, on_step=cancel_b)
    assert "d" not in trace.prepares
    assert all("d" not in ids(b) for b in trace.batches)
    cancelled_at = len(trace.done["b"])
    assert 0 < cancelled_at < 6
    assert sum("b" in ids(b) for b in trace.batches) == cancelled_at
    assert trace.done["a"] == trace.done["c"] == list(range(6))
    assert sched.status("b") == Progress("b", Stage.CANCELLED, cancelled_at, 6, None)
    sched.cancel("b")  # a no-op once final
    sched.cancel("a")
    assert sched.status("a").stage is Stage.DONE


def test_late_results_after_cancel_are_ignored() -> None:
    sched, _ = make({"a": {"frames_total": 2}, "b": {"frames_total": 2}})
    assert sched.next_prepares() == ["a", "b"]
    sched.cancel("a")
    sched.prepared("a")  # the prepare finished after the cancel: ignored
    sched.requeue_prepare("a")
    sched.prepared("b")
    sched.events()
    batch = sched.next_batch()
    assert batch == [FrameRequest("b", 0)]
    sched.cancel("b")
    assert sched.in_flight() == [] and sched.finished
    sched.frame_done("b", 0)  # the batch finishes after the cancel: ignored
    sched.requeue(batch)
    sched.fail("b", "too late")
    assert sched.status("b") == Progress("b", Stage.CANCELLED, 0, 2, None)
    assert [e.stage for e in sched.events()] == [Stage.CANCELLED]
    assert sched.next_batch() == [] and sched.next_prepares() == []


# -- failures --------------------------------------------------------------------------------


def test_executor_failure_requeues_the_same_frames() -> None:
    renders: Specs = {rid: {"frames_total": 4} for rid in ("a", "b", "c")}
    sched, clock = make(renders, max_batch=2)
    sampler = FakeSampler(clock, fail_calls={2})
    trace = drive(sched, sampler, renders)
    assert sampler.batches[1] == sampler.batches[2]  # re-run as is: same frames, same turn
    assert sampler.batches[1] == [FrameRequest("c", 0), FrameRequest("a", 1)]
    assert all(trace.done[rid] == [0, 1, 2, 3] for rid in renders)


def test_poisoned_render_fails_alone() -> None:
    renders: Specs = {rid: {"frames_total": 4} for rid in ("a", "b", "c")}
    sched, clock = make(renders)
    trace = drive(sched, FakeSampler(clock, poison={"b": 1}), renders)
    status = sched.status("b")
    assert status.stage is Stage.FAILED and status.frames_done == 1
    assert status.error == "NaN latent in b frame 1"
    assert sum("b" in ids(b) for b in trace.batches) == 2
    assert trace.done["a"] == trace.done["c"] == [0, 1, 2, 3]
    assert Progress("b", Stage.FAILED, 1, 4, None, "NaN latent in b frame 1") in trace.events


def test_fail_releases_the_in_flight_frame() -> None:
    sched, _ = make({"a": {}, "b": {}})
    sched.next_prepares()
    sched.prepared("a")
    sched.prepared("b")
    sched.next_batch()
    sched.fail("a", "out of memory")
    assert sched.in_flight() == [FrameRequest("b", 0)]
    sched.fail("a", "second error")  # the first error is kept
    assert sched.status("a").error == "out of memory"


def test_requeue_prepare_after_worker_death() -> None:
    renders: Specs = {"a": {"frames_total": 2}, "b": {"frames_total": 2}}
    sched, clock = make(renders, max_preparing=1)
    trace = drive(sched, FakeSampler(clock), renders, prepare_deaths={"a": 1})
    assert trace.prepares == ["a", "a", "b"]  # keeps its place in the queue
    stages = [e.stage for e in trace.events if e.render_id == "a"]
    assert stages[:4] == [Stage.QUEUED, Stage.PREPARING, Stage.QUEUED, Stage.PREPARING]
    assert trace.done == {"a": [0, 1], "b": [0, 1]}


# -- resume and progress ---------------------------------------------------------------------


def test_resume_starts_at_the_first_missing_frame() -> None:
    renders: Specs = {"a": {"frames_total": 5, "frames_done": 3}, "full": {"frames_total": 2}}
    renders["full"]["frames_done"] = 2
    sched, clock = make(renders)
    assert sched.status("a") == Progress("a", Stage.QUEUED, 3, 5, None)
    trace = drive(sched, FakeSampler(clock), renders)
    assert trace.batches[0] == [FrameRequest("a", 3)]
    assert trace.done == {"a": [3, 4]}
    assert sched.status("full") == Progress("full", Stage.DONE, 2, 2, 0.0)


def test_progress_events_with_eta() -> None:
    sched, clock = make({"a": {"frames_total": 3}})
    sched.next_prepares()
    clock.advance(10.0)  # preparing time does not count as frame time
    sched.prepared("a")
    for _ in range(2):
        (request,) = sched.next_batch()
        clock.advance(2.0)
        sched.frame_done("a", request.index)
    (request,) = sched.next_batch()
    sched.frame_done("a", request.index, seconds=5.0)  # measured by the runner
    assert sched.events() == [
        Progress("a", Stage.QUEUED, 0, 3, None),
        Progress("a", Stage.PREPARING, 0, 3, None),
        Progress("a", Stage.RENDERING, 0, 3, None),
        Progress("a", Stage.RENDERING, 1, 3, 4.0),  # 2 s/frame x 2 left
        Progress("a", Stage.RENDERING, 2, 3, 2.0),
        Progress("a", Stage.DONE, 3, 3, 0.0),
    ]
    assert sched.events() == []


# -- errors and queries ----------------------------------------------------------------------


def test_bad_input_raises_naming_the_values() -> None:
    sched, _ = make({"a": {"frames_total": 3}})
    with pytest.raises(ValueError, match="'a' was already added"):
        sched.add("a", frames_total=3, signature="sig")
    with pytest.raises(ValueError, match="frames_total must be >= 1, got 0"):
        sched.add("b", frames_total=0, signature="sig")
    with pytest.raises(ValueError, match=r"frames_done=4 must lie in \[0, frames_total=3\]"):
        sched.add("b", frames_total=3, signature="sig", frames_done=4)
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        ChainScheduler(max_batch=0)
    with pytest.raises(ValueError, match="max_preparing must be >= 1, got 0"):
        ChainScheduler(max_preparing=0)
    with pytest.raises(ValueError, match=r"prepared\('a'\): render is queued, expected preparing"):
        sched.prepared("a")


def test_frame_done_must_name_the_in_flight_frame() -> None:
    sched, _ = make({"a": {"frames_total": 3}})
    sched.next_prepares()
    sched.prepared("a")
    with pytest.raises(ValueError, match=r"frame_done\('a', 0\).*has no frame in flight"):
        sched.frame_done("a", 0)
    sched.next_batch()
    with pytest.raises(ValueError, match=r"frame_done\('a', 2\).*has frame 0 in flight"):
        sched.frame_done("a", 2)
    with pytest.raises(ValueError, match=r"has frame 0 in flight"):
        sched.requeue([FrameRequest("a", 1)])
    with pytest.raises(ValueError, match=r"seconds=-1\.0 is negative"):
        sched.frame_done("a", 0, seconds=-1.0)
    sched.frame_done("a", 0)
    assert sched.status("a").frames_done == 1


def test_unknown_render_is_a_value_and_key_error() -> None:
    sched, _ = make({"a": {}})
    with pytest.raises(ValueError, match="unknown render 'zz' \\(known: 'a'\\)"):
        sched.status("zz")
    with pytest.raises(KeyError):
        sched.frame_done("zz", 0)
    with pytest.raises(UnknownRenderError):
        sched.requeue([FrameRequest("zz", 0)])


def test_fail_after_done_is_an_error() -> None:
    sched, _ = make({"a": {"frames_total": 1}})
    sched.next_prepares()
    sched.prepared("a")
    sched.next_batch()
    sched.frame_done("a", 0)
    with pytest.raises(ValueError, match="render is already done"):
        sched.fail("a", "boom")


def test_queries_follow_the_states() -> None:
    sched, _ = make({"a": {}, "b": {}, "c": {}}, max_preparing=2)
    assert not sched.finished and sched.active() == []
    assert sched.next_prepares() == ["a", "b"]
    assert sched.next_prepares() == []  # max_preparing reached
    sched.prepared("a")
    assert sched.active() == ["a", "b"]
    assert sched.next_batch() == [FrameRequest("a", 0)]
    assert sched.next_batch() == []  # a chain has one frame in flight at most
    assert sched.in_flight() == [FrameRequest("a", 0)]
    sched.requeue(sched.in_flight())
    assert sched.in_flight() == [] and sched.status("a").stage is Stage.RENDERING
    assert ChainScheduler().finished  # nothing to do


def test_scheduler_is_pure_python() -> None:
    source = Path(__file__).resolve().parents[1] / "engine" / "core" / "scheduler.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "collections", "dataclasses", "enum", "time", "typing"}


def test_a_failed_prepare_frees_its_slot() -> None:
    sched, _ = make({"a": {}, "b": {}}, max_preparing=1)
    assert sched.next_prepares() == ["a"]
    sched.fail("a", "prepare failed: LoRA diverged")
    assert sched.next_prepares() == ["b"]
    sched.prepared("a")  # a late prepare result of a failed render is ignored
    assert sched.status("a") == Progress(
        "a", Stage.FAILED, 0, 4, None, "prepare failed: LoRA diverged"
    )
