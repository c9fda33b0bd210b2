"""Elastic vs static pools on simulated GPUs: ``python -m benchmarks.scale_elastic``

A discrete-event simulation on a virtual clock (seconds of cluster time, not of this machine)
that drives the engine core's real decision code: the :class:`~engine.core.scheduler.ChainScheduler`
(which renders to prepare, which frames to batch) and the elastic sizing of
:mod:`engine.core.sizing` (``plan_pools`` + ``resize``, as ``actors/pools.py`` applies them on
Ray, re-planned every ``--tick-s``). The actors are simulated: one starts ``--actor-start-s``
after it is asked for (placement + loading the weights) on a GPU with room for its share (first
fit); it runs its jobs in submission order (a Ray actor does), a plate waiting for its render's
LoRA. A LoRA takes ``--train-s``, a plate ``--plate-s``, a batch of B frames ``--frame-s`` × the
rows it is padded to (``bucket``: the next power of two).

Workload: ``--renders`` full-method renders (LoRA + plate + a chain of ``--frames`` frames) queued
at t = 0 on ``--gpus`` GPUs, under four configs of ``configs/sd15.yaml``'s cluster section:
``elastic`` (every pool ``auto``, separate Samplers / trainers / background workers, whole GPUs
per actor here), ``elastic-shared`` (as shipped: ``shared_models``, one elastic DeviceWorker per
GPU that trains, plates and samples; a batch goes only to a worker with no prepare stage
queued, as the Ray executor does), ``static-hand`` (what
the preset's comment used to say for N GPUs: N-1 Samplers, one trainer and one background worker
sharing a GPU, ``max_preparing`` 2) and ``static-default`` (the counts the preset shipped with:
one of each on one GPU). Reported per config: time to full utilisation (every GPU busy at once),
makespan, efficiency (GPU-busy seconds ÷ GPUs × makespan), GPU-seconds idle, the lower bound of
the makespan (all work ÷ GPUs); and elastic ÷ static ratios.

Scheduler-only: ``--core-gpus`` (64 256 1024) GPUs, GPUs × B renders already prepared, every
Sampler busy; the CPU this process spends in the scheduler and the sizing per frame, and the
frames per second one core could feed at that cost (vs the cluster's demand).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.common import OUT, machine_info
from engine.config import ClusterConfig, load_config
from engine.core.scheduler import ChainScheduler
from engine.core.sizing import (
    Resources,
    SlotState,
    plan_pools,
    queue_backlog,
    resize,
    shares,
)

KINDS_SIM = ("samplers", "trainers", "backgrounds")  # refiners: CPU, instant here


def configs(gpus: int) -> dict[str, ClusterConfig]:
    """The three cluster sections compared (from configs/sd15.yaml)."""
    base = load_config(None, preset="sd15").cluster
    whole = {"sampler_gpus": 1.0, "trainer_gpus": 1.0, "background_gpus": 1.0,
             "max_samplers": gpus, "batch_wait_s": 0.0}  # fmt: skip
    fixed = {"min_samplers": 1, "refiners": 1, "max_preparing": 2, "batch_wait_s": 0.0}
    return {
        "elastic": base.model_copy(update={**whole, "shared_models": False}),
        # sd15 as shipped: one DeviceWorker per GPU trains, plates and samples (shared_models)
        "elastic-shared": base.model_copy(update={"max_samplers": gpus, "batch_wait_s": 0.0}),
        "static-hand": base.model_copy(update={**fixed, "shared_models": False, "samplers": gpus - 1, "sampler_gpus": 1.0,
                                               "trainers": 1, "trainer_gpus": 0.5,
                                               "backgrounds": 1, "background_gpus": 0.5}),
        "static-default": base.model_copy(update={**fixed, "shared_models": False, "samplers": 1, "sampler_gpus": 0.5,
                                                  "trainers": 1, "trainer_gpus": 0.25,
                                                  "backgrounds": 1, "background_gpus": 0.25}),
    }  # fmt: skip


@dataclass
class Job:
    kind: str  # "train", "plate", "batch"
    render: str = ""
    frames: list[Any] = field(default_factory=list)


@dataclass
class Actor:
    kind: str
    slot: int
    gpu: int
    share: float
    started: float
    ready_at: float
    queue: deque[Job] = field(default_factory=deque)
    running: Job | None = None
    idle_since: float | None = None
    draining: bool = False


class Sim:
    """One run: the scheduler, the sizing and simulated actors on a virtual clock."""

    def __init__(self, c: ClusterConfig, gpus: int, args: argparse.Namespace, prepare: bool):
        self.c, self.gpus, self.args, self.prepare = c, gpus, args, prepare
        self.t = 0.0
        self.scheduler = ChainScheduler(max_batch=c.max_batch, max_preparing=2,
                                        clock=lambda: self.t)  # fmt: skip
        self.room = [1.0] * gpus  # free share per GPU
        self.busy_count = [0] * gpus
        self.busy_s = [0.0] * gpus
        self.changed = [0.0] * gpus
        self.held_s = 0.0  # GPU-seconds held by an actor that is not working
        self.pools: dict[str, dict[int, Actor]] = {k: {} for k in KINDS_SIM}
        self.serial = 0
        self.adapters: set[str] = set()
        self.preparing: set[str] = set()
        self.events: list[tuple[float, int, str, Any]] = []
        self.full_at: float | None = None
        self.timeline: list[dict[str, Any]] = []
        self.cpu_s = 0.0
        self.frames = 0
        self.elastic = any(getattr(c, k) == "auto" for k in KINDS_SIM)

    # -- actors ------------------------------------------------------------------------------

    def start(self, kind: str) -> Actor | None:
        share = shares(self.c)[kind]
        gpu = next((g for g, room in enumerate(self.room) if room >= share - 1e-9), None)
        if gpu is None:
            return None
        self.room[gpu] -= share
        self.serial += 1
        ready = self.t + self.args.actor_start_s
        actor = Actor(kind, self.serial, gpu, share, self.t, ready)
        self.pools[kind][actor.slot] = actor
        self._at(ready, "ready", actor)
        return actor

    def stop(self, actor: Actor) -> None:
        del self.pools[actor.kind][actor.slot]
        self.room[actor.gpu] += actor.share

    def pick(self, kind: str) -> Actor | None:
        """The least-loaded actor taking work (actors/pools.py, Pool.next)."""
        open_ = [a for a in self.pools[kind].values() if not a.draining]
        if not open_:
            return self.start(kind)
        return min(open_, key=lambda a: (len(a.queue) + (a.running is not None), a.slot))

    def core(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, its thread CPU time counted as the core's (scheduler calls)."""
        cpu = time.thread_time()
        try:
            return fn(*args)
        finally:
            self.cpu_s += time.thread_time() - cpu

    def _at(self, when: float, what: str, data: Any) -> None:
        self.serial += 1
        heapq.heappush(self.events, (when, self.serial, what, data))

    def _busy(self, gpu: int, delta: int) -> None:
        if self.busy_count[gpu]:
            self.busy_s[gpu] += self.t - self.changed[gpu]
        self.changed[gpu] = self.t
        self.busy_count[gpu] += delta

    def run_jobs(self, actor: Actor) -> None:
        """Start the actor's next job if it is ready, idle and the job's input exists."""
        if actor.running or self.t < actor.ready_at or not actor.queue:
            return
        job = actor.queue[0]
        if job.kind == "plate" and job.render not in self.adapters:
            return  # in order: waits for its LoRA
        actor.queue.popleft()
        actor.running, actor.idle_since = job, None
        a = self.args
        rows = 1 << (len(job.frames) - 1).bit_length() if job.frames else 0
        took = {"train": a.train_s, "plate": a.plate_s, "batch": a.frame_s * rows}[job.kind]
        self._busy(actor.gpu, +1)
        self._at(self.t + took, "done", actor)

    # -- the loop ----------------------------------------------------------------------------

    def submit(self, renders: int, frames: int) -> None:
        for i in range(renders):
            self.scheduler.add(f"r{i}", frames_total=frames, signature=0)
        if not self.prepare:  # scheduler-only: every render prepared at once
            for rid in self.scheduler.next_prepares():
                self.scheduler.prepared(rid)

    def tick(self) -> None:
        c = self.c
        cpu = time.thread_time()  # the core's share: backlog, plan, resize decisions
        training = len(self.preparing - self.adapters)  # what the Ray executor tells it
        backlog = replace(queue_backlog(self.scheduler), training=training)
        plan = plan_pools(backlog, Resources(gpus=self.gpus), c,
                          {"training": self.args.train_s, "background": self.args.plate_s})  # fmt: skip
        self.cpu_s += time.thread_time() - cpu
        if not self.elastic:
            self.scheduler.max_preparing = plan.max_preparing
            for kind in KINDS_SIM:  # fixed pools: started on first need (all at once here)
                while len(self.pools[kind]) < plan.counts[kind] and self.start(kind):
                    pass
            return
        self.scheduler.max_preparing = plan.max_preparing
        states = {k: [SlotState(a.slot, len(a.queue) + (a.running is not None),
                                self.t >= a.ready_at, a.started, a.idle_since)
                      for a in pool.values()] for k, pool in self.pools.items()}  # fmt: skip
        cpu = time.thread_time()
        decision = resize(plan, states, c, self.gpus, self.t)
        self.cpu_s += time.thread_time() - cpu
        for kind, pool in self.pools.items():
            for slot in decision.stop.get(kind, []):
                self.stop(pool[slot])
            drain = decision.drain.get(kind, set())
            for slot, actor in pool.items():
                actor.draining = slot in drain
            for _ in range(decision.start.get(kind, 0)):
                self.start(kind)
        for pool in self.pools.values():  # drained and idle: gone now
            for actor in [a for a in pool.values() if a.draining and not a.running
                          and not a.queue]:  # fmt: skip
                self.stop(actor)

    def dispatch(self) -> None:
        shared = self.c.shared_models  # the DeviceWorkers (the samplers pool) prepare too
        for rid in self.core(self.scheduler.next_prepares):
            trainer = self.pick("samplers" if shared else "trainers")
            worker = self.pick("samplers" if shared else "backgrounds")
            assert trainer is not None and worker is not None, "no GPU room for preparation"
            trainer.queue.append(Job("train", rid))
            self.preparing.add(rid)
            worker.queue.append(Job("plate", rid))
        for actor in sorted(self.pools["samplers"].values(), key=lambda a: a.slot):
            if actor.running or actor.queue or self.t < actor.ready_at:
                continue
            batch = self.core(self.scheduler.next_batch)
            if not batch:
                break
            actor.queue.append(Job("batch", frames=batch))
        for pool in self.pools.values():
            for actor in pool.values():
                self.run_jobs(actor)

    def finish(self, actor: Actor) -> None:
        job, actor.running = actor.running, None
        assert job is not None
        self._busy(actor.gpu, -1)
        actor.idle_since = self.t
        if job.kind == "train":
            self.adapters.add(job.render)
            for other in self.pools["samplers" if self.c.shared_models else "backgrounds"].values():
                self.run_jobs(other)
        elif job.kind == "plate":
            self.core(self.scheduler.prepared, job.render)
            self.preparing.discard(job.render)
        else:
            for request in job.frames:
                self.core(self.scheduler.frame_done, request.render_id, request.index)
            self.frames += len(job.frames)

    def run(self, limit_s: float) -> None:
        next_tick = 0.0
        while not self.core(lambda: self.scheduler.finished):
            if self.t > limit_s:
                raise TimeoutError(f"not done after {limit_s:.0f} simulated s")
            tick = self.t >= next_tick
            if tick:
                self.tick()
                next_tick = self.t + self.args.tick_s
            self.dispatch()
            if tick:
                self._sample()
            busy = sum(1 for n in self.busy_count if n)
            if busy == self.gpus and self.full_at is None:
                self.full_at = self.t
            self.t = min(self.events[0][0] if self.events else next_tick, next_tick)
            while self.events and self.events[0][0] <= self.t:
                _, _, what, actor = heapq.heappop(self.events)
                if what == "done":
                    self.finish(actor)
                else:
                    self.run_jobs(actor)
        for g in range(self.gpus):
            self._busy(g, 0)

    def _sample(self) -> None:
        """Utilisation and pool sizes every tick (the timeline in the JSON: every 10th)."""
        held = sum(1 for g in range(self.gpus) if self.room[g] < 1 - 1e-9
                   and not self.busy_count[g])  # fmt: skip
        self.held_s += held * self.args.tick_s
        if len(self.timeline) * 10 * self.args.tick_s <= self.t:
            self.timeline.append({
                "t": round(self.t, 1), "busy_gpus": sum(1 for n in self.busy_count if n),
                **{k: len(p) for k, p in self.pools.items()},
                "max_preparing": self.scheduler.max_preparing,
            })  # fmt: skip

    def report(self, work_s: float) -> dict[str, Any]:
        busy = sum(self.busy_s)
        makespan = self.t
        return {
            "gpus": self.gpus,
            "makespan_s": round(makespan, 1),
            "lower_bound_s": round(work_s / self.gpus, 1),
            "full_utilisation_at_s": None if self.full_at is None else round(self.full_at, 1),
            "efficiency": round(busy / (self.gpus * makespan), 3),
            "gpu_s_idle": round(self.gpus * makespan - busy),
            "gpu_s_idle_held": round(min(self.held_s, self.gpus * makespan - busy)),
            "frames": self.frames,
            "timeline": self.timeline[:: max(1, len(self.timeline) // 100)],  # ≤ ~100 points
        }


def full_run(name: str, c: ClusterConfig, args: argparse.Namespace) -> dict[str, Any]:
    sim = Sim(c, args.gpus, args, prepare=True)
    sim.submit(args.renders, args.frames)
    sim.run(args.limit_s)
    work = args.renders * (args.train_s + args.plate_s + args.frames * args.frame_s)
    return {"config": name, **sim.report(work)}


def core_run(gpus: int, args: argparse.Namespace) -> dict[str, Any]:
    """Scheduler-only: GPUs × B prepared renders, every Sampler busy from t = actor start."""
    c = configs(gpus)["elastic"]
    sim = Sim(c, gpus, args, prepare=False)
    sim.submit(gpus * c.max_batch, args.core_frames)
    sim.run(args.limit_s)
    ms = 1000 * sim.cpu_s / max(sim.frames, 1)
    demand = gpus * c.max_batch / (c.max_batch * args.frame_s)  # frames/s the GPUs make
    return {"gpus": gpus, "renders": gpus * c.max_batch, "frames": sim.frames,
            "core_cpu_ms_per_frame": round(ms, 3), "core_max_fps": round(1000 / ms, 1),
            "cluster_fps": round(demand, 1),
            "core_keeps_up": 1000 / ms >= demand}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_elastic",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--renders", type=int, default=500)
    p.add_argument("--frames", type=int, default=16, help="frames per render")
    p.add_argument("--train-s", type=float, default=60.0, help="LoRA training per render")
    p.add_argument("--plate-s", type=float, default=15.0, help="background plate per render")
    p.add_argument("--frame-s", type=float, default=1.0, help="GPU seconds per batch row")
    p.add_argument("--actor-start-s", type=float, default=30.0, help="placement + weights")
    p.add_argument("--tick-s", type=float, default=1.0, help="re-plan period")
    p.add_argument("--core-gpus", type=int, nargs="*", default=[64, 256, 1024])
    p.add_argument("--core-frames", type=int, default=8)
    p.add_argument("--configs", nargs="+",
                   default=["elastic", "elastic-shared", "static-hand", "static-default"])  # fmt: skip
    p.add_argument("--limit-s", type=float, default=200_000.0, help="simulated-time limit")
    p.add_argument("--out", type=Path, default=OUT / "scale_elastic.json")
    args = p.parse_args(argv)
    runs = []
    for name in args.configs:
        start = time.perf_counter()
        record = full_run(name, configs(args.gpus)[name], args)
        record["wall_s"] = round(time.perf_counter() - start, 2)
        runs.append(record)
        print(_line(record), flush=True)
    base = next((r for r in runs if r["config"] == "elastic"), None)
    ratios = {r["config"]: {"efficiency": round(base["efficiency"] / r["efficiency"], 2),
                            "makespan": round(base["makespan_s"] / r["makespan_s"], 3)}
              for r in runs if base and r is not base}  # fmt: skip
    for name, ratio in ratios.items():
        print(f"elastic / {name}: efficiency x{ratio['efficiency']}, makespan x{ratio['makespan']}")
    core = []
    for gpus in args.core_gpus:
        record = core_run(gpus, args)
        core.append(record)
        print(f"scheduler-only {gpus:>5} GPUs: {record['core_cpu_ms_per_frame']} CPU ms/frame "
              f"-> one core feeds {record['core_max_fps']} frames/s; the cluster makes "
              f"{record['cluster_fps']}", flush=True)  # fmt: skip
    report = {
        "machine": {**machine_info(), "load_avg_1m": os.getloadavg()[0],
                    "note": "simulated cluster time; only the scheduler-only CPU ms are of "
                            "this machine (2 cores shared with other work)"},
        "preset": "sd15 (cluster section; whole GPUs per actor in the elastic run)",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": runs,
        "elastic_over_static": ratios,
        "scheduler_only": core,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


def _line(r: dict[str, Any]) -> str:
    full = r["full_utilisation_at_s"]
    return (
        f"{r['config']:>15}: {r['gpus']} GPUs, full at "
        f"{'never' if full is None else f'{full} s'}, makespan {r['makespan_s']} s "
        f"(bound {r['lower_bound_s']} s), efficiency {r['efficiency']}, "
        f"idle {r['gpu_s_idle']} GPU-s ({r['gpu_s_idle_held']} held by idle actors)"
    )


if __name__ == "__main__":
    sys.exit(main())
