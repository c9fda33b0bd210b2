"""Actor pools of the Ray executor, and their elastic sizing on a Ray cluster.

A :class:`Pool` holds the actors of one kind keyed by slot (a slot keeps its number while its
actor is replaced, and is gone once the pool shrinks). Fixed pools (a number in the config)
start their actors on first need; :class:`Elastic` moves ``auto`` pools towards the plan of
:mod:`engine.core.sizing` on every tick: it reads the cluster's GPUs, starts and releases actors,
and asks Ray's autoscaler (``ray.autoscaler.sdk.request_resources``) for the GPUs the queue
wants when the cluster has fewer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.autoscaler.sdk import request_resources

from engine.config import ClusterConfig
from engine.core.sizing import (
    KINDS,
    Backlog,
    Plan,
    Resources,
    SlotState,
    plan_pools,
    resize,
)

log = logging.getLogger(__name__)


@dataclass
class Pool:
    """Actors of one kind, keyed by slot; ``count`` = a fixed size (None: elastic)."""

    make: Callable[[], Any]
    count: int | None
    kind: str = ""
    actors: dict[int, Any] = field(default_factory=dict)
    started: int = 0
    """Actors created so far (replacements included)."""
    load: dict[int, int] = field(default_factory=dict)
    """Jobs in flight per slot."""
    served: dict[int, int] = field(default_factory=dict)
    """Jobs handed to each slot so far."""
    draining: set[int] = field(default_factory=set)
    """Slots above the plan: no new work, released once idle."""
    born: dict[int, float] = field(default_factory=dict)
    idle_since: dict[int, float] = field(default_factory=dict)
    probes: dict[int, Any] = field(default_factory=dict)
    """slot → readiness probe (``pid``) of an actor that has not answered yet."""
    _next: int = 0

    def add(self) -> int:
        """Start one actor in a new slot."""
        slot, self._next = self._next, self._next + 1
        self.put(slot)
        return slot

    def put(self, slot: int) -> None:
        """Start an actor in ``slot`` (a new slot, or a replacement for a dead actor)."""
        actor = self.actors[slot] = self.make()
        self.started += 1
        self.born[slot] = time.monotonic()
        self.probes[slot] = actor.pid.remote()
        self.load.setdefault(slot, 0)

    def remove(self, slot: int) -> None:
        """Release the actor of ``slot`` (its GPU goes back to the cluster)."""
        ray.kill(self.actors.pop(slot))
        for book in (self.load, self.born, self.idle_since, self.probes):
            book.pop(slot, None)  # type: ignore[attr-defined]
        self.draining.discard(slot)

    def ensure(self) -> None:
        """A fixed pool: start the actors it lacks."""
        while self.count is not None and len(self.actors) < self.count:
            self.add()

    def slots(self) -> list[int]:
        """Slots that take work (a fixed pool's not started yet included)."""
        if self.count is not None:
            return list(range(self.count))
        return sorted(s for s in self.actors if s not in self.draining)

    def next(self, avoid: set[int] | frozenset[int] = frozenset()) -> tuple[Any, int]:
        """(actor, slot) with the least work in flight, among the slots not in ``avoid`` (if
        any is left). An empty elastic pool starts an actor (Ray places it when it can)."""
        self.ensure()
        slots = self.slots() or [self.add()]
        open_ = [s for s in slots if s not in avoid] or slots
        slot = min(open_, key=lambda s: (self.load.get(s, 0), s))
        return self.actors[slot], slot

    def begin(self, slot: int) -> None:
        self.load[slot] = self.load.get(slot, 0) + 1
        self.served[slot] = self.served.get(slot, 0) + 1
        self.idle_since.pop(slot, None)

    def end(self, slot: int) -> None:
        if slot in self.actors:
            self.load[slot] = max(0, self.load.get(slot, 0) - 1)
            if not self.load[slot]:
                self.idle_since[slot] = time.monotonic()

    def state(self, now: float, busy: set[int]) -> list[SlotState]:
        """The slots as :func:`engine.core.sizing.resize` sees them (``busy``: being probed)."""
        answered = [s for s, ref in self.probes.items() if ray.wait([ref], timeout=0)[0]]
        for slot in answered:  # placed and built (or failed in its constructor: not our call)
            del self.probes[slot]
            self.idle_since.setdefault(slot, now)
        out = []
        for slot in sorted(self.actors):
            load = self.load.get(slot, 0) + (slot in busy)
            ready = slot not in self.probes
            out.append(SlotState(slot, load, ready, self.born[slot], self.idle_since.get(slot)))
        return out


class Elastic:
    """Sizes the ``auto`` pools of ``pools`` from the engine core's queue.

    Args:
        pools: kind (``samplers``, ``trainers``, ``backgrounds``, ``refiners``) → its pool.
        config: The cluster settings (which pools are ``auto``, GPU shares, limits).
        every_s: Seconds between two re-plans (a tick in between returns the last plan).
    """

    def __init__(self, pools: dict[str, Pool], config: ClusterConfig, every_s: float = 1.0):
        self.pools, self.config, self.every_s = pools, config, every_s
        self.plan: Plan | None = None
        self._last = -float("inf")
        self._requested: list[dict[str, float]] = []
        self.stats: dict[str, int] = {"started": 0, "released": 0, "requests": 0, "ticks": 0}

    @staticmethod
    def resources() -> Resources:
        have = ray.cluster_resources()
        return Resources(gpus=float(have.get("GPU", 0.0)), cpus=float(have.get("CPU", 0.0)))

    def tick(self, backlog: Callable[[], Backlog], busy: dict[str, set[int]]) -> Plan | None:
        """Re-plan (at most every ``every_s``) and apply; ``busy``: kind → slots being probed
        (restarting actors are neither idle nor released)."""
        now = time.monotonic()
        if now - self._last < self.every_s:
            return self.plan
        self._last = now
        self.stats["ticks"] += 1
        queue, have = backlog(), self.resources()
        self.plan = plan = plan_pools(queue, have, self.config)
        states = {k: p.state(now, busy.get(k, set())) for k, p in self.pools.items()}
        decision = resize(plan, states, self.config, have.gpus, now)
        for kind, pool in self.pools.items():
            if pool.count is not None:
                continue
            pool.draining = decision.drain.get(kind, set())
            for slot in decision.stop.get(kind, []):
                log.info("elastic: releasing %s slot %d", kind, slot)
                pool.remove(slot)
                self.stats["released"] += 1
            grow = decision.start.get(kind, 0) if queue.total else 0
            for _ in range(grow):
                pool.add()
            self.stats["started"] += grow
        self._ask(plan, have)
        return plan

    def _ask(self, plan: Plan, have: Resources) -> None:
        """Ask the autoscaler for the GPUs the queue wants beyond the cluster's (once per
        change; an empty request withdraws the last one)."""
        want = plan.bundles if plan.wanted_gpus > have.gpus else []
        if want != self._requested:
            log.info("elastic: asking the autoscaler for %d GPU bundles", len(want))
            request_resources(bundles=want)
            self._requested = want
            self.stats["requests"] += 1


def elastic_pools(config: ClusterConfig) -> bool:
    """Whether any pool (or the prepare limit) is ``auto``."""
    return any(getattr(config, k) == "auto" for k in (*KINDS, "max_preparing"))
