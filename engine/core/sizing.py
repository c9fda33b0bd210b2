"""Elastic pool sizing (pure logic: no Ray, no clock of its own).

How many Samplers, LoRA trainers, background workers and refiners a cluster should run for the
work the engine core holds, and which actors to start or release to get there. The Ray executor
(``actors/pools.py``) applies the decisions to real actors; ``benchmarks/scale_elastic.py``
applies the same decisions to simulated GPUs.

The plan, for a queue of ``queued`` renders waiting to prepare, ``preparing`` in the prepare
stages and ``rendering`` in their frame chains, on a cluster of ``G`` GPUs:

1. Samplers for the frames that are ready: ``ceil(rendering / max_batch)`` (one full batch of
   different characters each), within ``[min_samplers, max_samplers]``.
2. Prepare pools for the renders still to prepare: trainers and background workers split
   ``max_prepare_workers`` in proportion to the work left to each (renders still to train ×
   training time : renders still to plate × plate time; LoRA training is the long stage).
3. What fits: the Samplers first (a prepared render waiting for a Sampler holds memory and
   earns nothing) but never every GPU while renders wait to prepare (one trainer and one
   background worker keep their share); the prepare pools split what the Samplers leave; GPUs
   still free go to Samplers (one per GPU) while any work is left.
4. ``wanted_gpus``: what the queue would use without the cluster's limit; more than the cluster
   has → the executor asks the autoscaler for it.

Pools given as numbers in the config stay at those numbers (a static cluster).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.config import ClusterConfig

KINDS = ("samplers", "trainers", "backgrounds", "refiners")
"""Pool names, in the order they get GPUs when several grow at once."""
STAGE_S = {"training": 60.0, "background": 15.0}
"""Default seconds of a render's prepare stages (LoRA training, plate) until measured."""


class NoGPUError(RuntimeError):
    """A preset gives its actors GPUs and the cluster has none."""


@dataclass(frozen=True)
class Backlog:
    """The engine core's unfinished renders by stage."""

    queued: int = 0
    """Waiting to prepare (QUEUED)."""
    preparing: int = 0
    """In the prepare stages (refine → LoRA → plate)."""
    rendering: int = 0
    """In their frame chains (each has at most one frame in flight)."""
    training: int | None = None
    """Of ``preparing``, those whose LoRA is not trained yet (None: unknown, all of them); the
    executor knows it, the scheduler does not."""

    @property
    def to_prepare(self) -> int:
        return self.queued + self.preparing

    @property
    def to_train(self) -> int:
        return self.queued + (self.preparing if self.training is None else self.training)

    @property
    def total(self) -> int:
        return self.queued + self.preparing + self.rendering


def queue_backlog(scheduler: Any) -> Backlog:
    """The :class:`Backlog` of a :class:`~engine.core.scheduler.ChainScheduler`."""
    counts = scheduler.counts()
    return Backlog(counts["queued"], counts["preparing"], counts["rendering"])


@dataclass(frozen=True)
class Resources:
    """What the cluster has now (Ray's ``cluster_resources()``)."""

    gpus: float = 0.0
    cpus: float = 1.0


@dataclass(frozen=True)
class Plan:
    """Target actor counts (``counts[kind]``) and the prepare limit for the core."""

    counts: dict[str, int]
    max_preparing: int
    wanted_gpus: float
    """GPUs the queue would use if the cluster had them (≥ what ``counts`` take)."""
    bundles: list[dict[str, float]] = field(default_factory=list)
    """One ``{"GPU": share}`` per wanted GPU actor (for ``request_resources``)."""


def shares(c: ClusterConfig) -> dict[str, float]:
    """GPUs per actor of each pool (refiners run on CPUs). With ``shared_models`` the Samplers
    are DeviceWorkers holding the three stages' shares (at most 1 GPU) and no trainer or
    background worker of their own exists."""
    if c.shared_models:
        device = min(1.0, c.sampler_gpus + c.trainer_gpus + c.background_gpus)
        return {"samplers": device, "trainers": 0.0, "backgrounds": 0.0, "refiners": 0.0}
    return {"samplers": c.sampler_gpus, "trainers": c.trainer_gpus,
            "backgrounds": c.background_gpus, "refiners": 0.0}  # fmt: skip


def initial_max_preparing(c: ClusterConfig) -> int:
    """``max_preparing`` before any plan: the number, or (auto) two per prepare worker."""
    if c.max_preparing != "auto":
        return c.max_preparing
    fixed = [n for n in (c.trainers, c.backgrounds) if n != "auto"]
    return max(2, 2 * sum(fixed))


def _fit(gpus: float, share: float, want: int) -> int:
    """Actors of ``share`` GPUs each (≤ ``want``) that fit in ``gpus``."""
    if share <= 0:
        return want
    return max(0, min(want, math.floor(gpus / share + 1e-9)))


def plan_pools(
    backlog: Backlog,
    resources: Resources,
    c: ClusterConfig,
    stage_s: Mapping[str, float] | None = None,
) -> Plan:
    """Target pool sizes for ``backlog`` on ``resources`` (see the module docstring).

    Args:
        stage_s: Measured seconds of the ``training`` and ``background`` stages (their ratio
            splits the prepare workers); :data:`STAGE_S` until measured.
    """
    if c.shared_models:
        return _plan_shared(backlog, resources, c)
    share = shares(c)
    times = {**STAGE_S, **(stage_s or {})}
    prep = backlog.to_prepare
    fixed = {k: getattr(c, k) for k in KINDS if getattr(c, k) != "auto"}
    budget = resources.gpus - sum(n * share[k] for k, n in fixed.items())
    # 1-2. what the queue asks for
    want = {"samplers": min(max(math.ceil(backlog.rendering / c.max_batch), c.min_samplers),
                            c.max_samplers)}  # fmt: skip
    work = (backlog.to_train * times["training"], prep * times["background"])
    train = work[0] / sum(work) if sum(work) > 0 else 0.5
    want["trainers"] = min(backlog.to_train, max(1, round(c.max_prepare_workers * train)))
    want["backgrounds"] = min(prep, max(1, c.max_prepare_workers - want["trainers"]))
    want["refiners"] = min(4, math.ceil(prep / 32)) if prep else 1
    want.update(fixed)
    # 3. what fits: Samplers first, less one trainer + one background worker while renders
    # wait to prepare
    counts = dict(fixed)
    auto_prep = [k for k in ("trainers", "backgrounds") if k not in fixed and want[k]]
    if "samplers" not in fixed:
        keep = sum(share[k] for k in auto_prep)
        counts["samplers"] = _fit(budget - keep, share["samplers"], want["samplers"])
        budget -= counts["samplers"] * share["samplers"]
    # the prepare pools split the rest by stage time, each at least one if it fits
    weights = {"trainers": train, "backgrounds": 1.0 - train}
    left = budget
    for kind in auto_prep:
        part = budget * weights[kind] / sum(weights[k] for k in auto_prep)
        counts[kind] = max(_fit(part, share[kind], want[kind]), _fit(left, share[kind], 1))
        left -= counts[kind] * share[kind]
    for kind in auto_prep:  # what one left unused goes to the other
        more = _fit(left, share[kind], want[kind] - counts[kind])
        counts[kind] += more
        left -= more * share[kind]
    for kind in ("trainers", "backgrounds", "refiners"):
        counts.setdefault(kind, want[kind] if kind == "refiners" else 0)
    if "samplers" not in fixed and backlog.total and share["samplers"] > 0:
        # 3b. free GPUs go to Samplers while work is left (one per GPU)
        extra = _fit(left, share["samplers"], c.max_samplers - counts["samplers"])
        counts["samplers"] += extra
    # 4. the GPUs the queue wants
    wanted = sum(want[k] * share[k] for k in KINDS)
    bundles = [{"GPU": share[k]} for k in KINDS for _ in range(want[k]) if share[k] > 0]
    limit = c.max_preparing
    if limit == "auto":  # one render in work and one waiting per prepare worker
        return Plan(counts, max(1, 2 * (counts["trainers"] + counts["backgrounds"])), wanted,
                    bundles)  # fmt: skip
    return Plan(counts, limit, wanted, bundles)


def _plan_shared(backlog: Backlog, resources: Resources, c: ClusterConfig) -> Plan:
    """``shared_models``: one pool of DeviceWorkers that sample, train and plate. The queue
    wants a worker per full batch of ready frames plus one per render to prepare (within
    ``max_prepare_workers``), within ``[min_samplers, max_samplers]``; free GPUs go to workers
    while work is left (as step 3b). ``max_preparing`` (auto): one render per worker, so a
    worker's frame batches wait behind at most one prepare stage."""
    share = shares(c)["samplers"]
    prep = backlog.to_prepare
    need = math.ceil(backlog.rendering / c.max_batch) + min(prep, c.max_prepare_workers)
    want = min(max(need, c.min_samplers), c.max_samplers)
    if c.samplers != "auto":
        count = want = c.samplers
    else:
        count = _fit(resources.gpus, share, want)
        if backlog.total and share > 0:
            left = resources.gpus - count * share
            count += _fit(left, share, c.max_samplers - count)
    refiners = c.refiners if c.refiners != "auto" else (min(4, math.ceil(prep / 32)) if prep else 1)
    counts = {"samplers": count, "trainers": 0, "backgrounds": 0, "refiners": refiners}
    bundles = [{"GPU": share} for _ in range(want)] if share > 0 else []
    limit = max(1, count) if c.max_preparing == "auto" else c.max_preparing
    return Plan(counts, limit, want * share, bundles)


def check_gpus(c: ClusterConfig, gpus: float) -> None:
    """Raise :class:`NoGPUError` when the config gives actors GPUs and the cluster has none."""
    given = {"sampler": c.sampler_gpus, "trainer": c.trainer_gpus, "background": c.background_gpus}
    need = {k: s for k, s in given.items() if s > 0}  # the config's own keys (shared_models too)
    if need and gpus <= 0:
        asked = ", ".join(f"cluster.{k}_gpus={s:g}" for k, s in need.items())
        raise NoGPUError(
            f"the Ray cluster has no GPU, and the config gives actors GPUs ({asked}): they "
            "would wait forever. Connect to a cluster with GPU nodes (for an autoscaling one, "
            "a GPU worker group with minReplicas >= 1), or run on CPUs with "
            "--set cluster.sampler_gpus=0 cluster.trainer_gpus=0 cluster.background_gpus=0"
        )


@dataclass(frozen=True)
class SlotState:
    """One live actor of a pool, as the resize decision sees it."""

    slot: int
    load: int
    """Jobs in flight on it."""
    ready: bool
    """It has answered once (placed on a GPU, models built)."""
    started: float
    idle_since: float | None
    """When its load last fell to 0 (None while busy or not ready)."""


@dataclass
class Resize:
    """What to do to the pools now."""

    start: dict[str, int] = field(default_factory=dict)
    """kind → actors to start."""
    stop: dict[str, list[int]] = field(default_factory=dict)
    """kind → slots to release now (idle, or never got a GPU)."""
    drain: dict[str, set[int]] = field(default_factory=dict)
    """kind → busy slots above the plan: they take no new work and are released when idle."""

    @property
    def empty(self) -> bool:
        return not (any(self.start.values()) or any(self.stop.values()))


def resize(
    plan: Plan,
    pools: Mapping[str, list[SlotState]],
    c: ClusterConfig,
    gpus: float,
    now: float,
) -> Resize:
    """Decisions that move ``pools`` towards ``plan`` on a cluster of ``gpus`` GPUs.

    Over the plan, a prepare pool releases its idle actors at once and drains busy ones; the
    Samplers release an actor only after ``sampler_idle_s`` without work (a queue that dips
    for a moment keeps its Samplers warm). An actor not ready ``gpu_wait_s`` after its start
    (no GPU came) is released whatever the plan. Growth is limited to the GPUs that no actor
    (ready, starting or draining) holds; Samplers grow first.
    """
    share = shares(c)
    out = Resize()
    used = 0.0
    for kind in KINDS:
        slots = list(pools.get(kind, []))
        stop = [s.slot for s in slots if not s.ready and now - s.started >= c.gpu_wait_s]
        live = [s for s in slots if s.slot not in stop]
        excess = len(live) - plan.counts.get(kind, 0)
        if excess > 0:
            since = {s.slot: now if s.idle_since is None else s.idle_since for s in live}
            idle = sorted((s for s in live if s.ready and s.load == 0),
                          key=lambda s: (since[s.slot], -s.slot))  # fmt: skip
            if kind == "samplers":
                idle = [s for s in idle if now - since[s.slot] >= c.sampler_idle_s]
            else:  # prepare pools: starting ones without work too, then drain the busy
                idle = [s for s in live if not s.ready and s.load == 0] + idle
            gone = [s.slot for s in idle[:excess]]
            stop += gone
            if kind != "samplers" and excess > len(gone):
                busy = sorted((s for s in live if s.slot not in gone), key=lambda s: -s.started)
                out.drain[kind] = {s.slot for s in busy[: excess - len(gone)]}
        out.stop[kind] = stop
        used += (len(slots) - len(stop)) * share[kind]
    free = gpus - used
    for kind in KINDS:
        have = len(pools.get(kind, [])) - len(out.stop[kind])
        grow = _fit(free, share[kind], max(0, plan.counts.get(kind, 0) - have))
        out.start[kind] = grow
        free -= grow * share[kind]
    return out
