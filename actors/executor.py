"""The Ray executor of the engine core: resident model actors on a Ray cluster.

Prepare stages run as chained actor calls (Refiner → AppearanceTrainer → BackgroundWorker; the
object store carries the refined prompt, adapter and plate along), so while the Samplers render
frames of A and B the trainer works on C and the background worker on D. Pools of fixed size
start their actors on first need and keep them as long as the executor (a finished manifest
re-run starts none); ``auto`` pools grow with the queue and shrink when idle (actors/pools.py,
engine/core/sizing.py). A config that gives actors GPUs on a cluster without any fails at once.

Faults: a worker that raises gives the error's own kind (input or infrastructure); a dead actor
(killed, node lost, constructor failed) is an infrastructure fault — its in-flight work comes back
as failed with ``worker_lost`` (the core requeues it without spending an attempt, for up to
``cluster.restart_wait_s``), and a liveness probe (backing off from 0.5 s to 10 s) waits for
Ray's restart or replaces the actor by a new one, on a surviving node, once Ray has given up
restarting it. Samplers are spread across nodes (``SPREAD``). Frames are encoded on the
Sampler; with a shared backend (an object store) the Sampler writes them itself.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayError, RayTaskError

from actors.pools import Elastic, Pool, elastic_pools
from actors.workers import AppearanceTrainer, BackgroundWorker, Refiner, Sampler
from engine.config import RenderConfig
from engine.core.executor import (
    BatchDone,
    BatchFailed,
    Executor,
    Outcome,
    Prepared,
    PrepareFailed,
    PrepareJob,
    StageStarted,
)
from engine.core.faults import Kind, classify, describe
from engine.core.sizing import Backlog, check_gpus
from engine.core.work import FrameWork, SessionSpec, padding_policy
from engine.storage import env_credentials

log = logging.getLogger(__name__)


def ray_fault(error: BaseException) -> tuple[str, Kind]:
    """(one-line reason, kind) of an exception raised by ``ray.get``."""
    if isinstance(error, RayTaskError) and not isinstance(error, RayActorError):
        cause = error.cause if isinstance(error.cause, BaseException) else None
        if cause is not None:
            return describe(cause), classify(cause)
    if isinstance(error, RayActorError):
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        raised = [ln for ln in lines if "Error:" in ln and not ln.startswith("ray.")]
        detail = raised[-1] if raised else (lines[0] if lines else type(error).__name__)
        return f"worker died: {detail}", "infra"
    if isinstance(error, RayError):
        return f"{type(error).__name__}: {describe(error)}", "infra"
    return describe(error), classify(error)


def _lost(error: BaseException) -> bool:
    """The actor was lost (its node died, it was killed, it is restarting), not broken by its
    own constructor: the work is waited for, not counted as a failed attempt."""
    return isinstance(error, RayActorError) and not error.actor_init_failed


@dataclass
class _Prep:
    job: PrepareJob
    refs: dict[str, Any]
    """stage name → ObjectRef, in pipeline order (refined, adapter, plate)."""
    actors: list[tuple[Pool, int]] = field(default_factory=list)
    """The (pool, slot) of each actor working on it (probed when one dies)."""
    slots: dict[str, int] = field(default_factory=dict)
    """stage name → the slot of its actor (``shared_models``: which DeviceWorker runs it)."""
    started: float = field(default_factory=time.perf_counter)
    announced: set[str] = field(default_factory=set)


class RayExecutor(Executor):
    """Resident model actors on the connected Ray cluster (``ray.init`` first).

    Args:
        config: Engine settings; ``cluster`` gives actor counts, GPU shares, restarts, batch size.
    """

    name = "ray"

    def __init__(self, config: RenderConfig):
        c = config.cluster
        model = config.model.model_dump(mode="json")
        # num_cpus=0: placement by GPUs only (a CPU-only test cluster has 2 cores for 4+ actors).
        opts: dict[str, Any] = {"max_restarts": c.max_restarts, "max_task_retries": 0,
                                "num_cpus": 0}  # fmt: skip
        credentials = env_credentials()
        if credentials and config.storage.uri and "://" in config.storage.uri:
            # Samplers write frames to the object store: its credentials travel with them
            opts["runtime_env"] = {"env_vars": credentials}
        # the refiner's OpenAI-compatible server settings (OPENAI_API_KEY, OPENAI_BASE_URL)
        # reach it from this process's environment, whichever node it lands on
        secrets = {k: v for k, v in os.environ.items() if k.startswith("OPENAI_")}
        refiner_opts = {**opts, "runtime_env": {"env_vars": secrets}} if secrets else opts
        check_gpus(c, float(ray.cluster_resources().get("GPU", 0.0)))  # fail now, not wait

        def size(count: int | str) -> int | None:
            return None if count == "auto" else int(count)

        self.refiners = Pool(lambda: Refiner.options(**refiner_opts).remote(), size(c.refiners))  # type: ignore[attr-defined]
        self.trainers = Pool(
            lambda: AppearanceTrainer.options(num_gpus=c.trainer_gpus, **opts).remote(model),  # type: ignore[attr-defined]
            size(c.trainers),
        )
        self.backgrounds = Pool(
            lambda: BackgroundWorker.options(num_gpus=c.background_gpus, **opts).remote(model),  # type: ignore[attr-defined]
            size(c.backgrounds),
        )
        tag = uuid.uuid4().hex[:8]  # named (findable by operators and fault tests), unique
        # SPREAD: one Sampler per GPU across the nodes, not packed on one (a lost node then
        # takes only its share of the Samplers with it).
        self.samplers = Pool(
            lambda: Sampler.options(  # type: ignore[attr-defined]
                num_gpus=c.sampler_gpus,
                name=f"avatar-sampler-{tag}-{uuid.uuid4().hex[:6]}",
                scheduling_strategy="SPREAD",
                **opts,
            ).remote(model, c.max_batch, padding_policy(config)),
            size(c.samplers),
        )
        self.pools = {"samplers": self.samplers, "trainers": self.trainers,
                      "backgrounds": self.backgrounds, "refiners": self.refiners}  # fmt: skip
        # cluster.shared_models: one DeviceWorker per GPU is the trainer, background worker and
        # Sampler at once (actors/devices.py); the three names are one pool, sized as Samplers.
        self.devices = None
        if c.shared_models:
            from actors.devices import DevicePlanner

            self.devices = DevicePlanner.create(config, opts)
            self.trainers = self.backgrounds = self.samplers = self.devices
            self.pools = {"samplers": self.devices, "refiners": self.refiners}
        self.elastic = Elastic(self.pools, c) if elastic_pools(c) else None
        self._auto_preparing = c.max_preparing == "auto"
        self._preps: dict[str, _Prep] = {}
        self._deferred: list[PrepareJob] = []
        self._specs: dict[str, Any] = {}
        self._busy: dict[Any, tuple[int, int, float]] = {}  # ref → (sampler, batch, start)
        self._probes: dict[Any, tuple[Pool, int]] = {}
        self._probing: set[tuple[int, int]] = set()
        self._reprobes: list[tuple[float, Pool, int]] = []
        self._backoff: dict[tuple[int, int], float] = {}  # (pool, slot) → next reprobe delay
        self._events: list[Outcome] = []
        self._memory: dict[str, Any] = {"peak_rss_mb": 0.0, "sessions_bytes": {}}
        self.stats: dict[str, Any] = {"actor_failures": 0, "replaced_actors": 0}

    # -- prepare ------------------------------------------------------------------------------

    def _probed(self, pool: Pool) -> set[int]:
        return {slot for p, slot in self._probing if p == id(pool)}

    def _restarting(self, pool: Pool) -> bool:
        """Every actor of ``pool`` is being probed (restarting or being replaced)."""
        pool.ensure()
        return bool(pool.actors) and all((id(pool), s) in self._probing for s in pool.actors)

    def prepare(self, job: PrepareJob) -> None:
        self.samplers.ensure()  # warm the Samplers while the first characters prepare
        pools = [self.refiners] if not job.refined else []
        pools += [self.trainers] if job.needs_adapter else []
        pools += [self.backgrounds] if job.needs_plate else []
        if any(self._restarting(p) for p in pools):  # start once an actor answers again
            self._deferred.append(job)
            return
        cfg = job.config.model_dump(mode="json")
        refs: dict[str, Any] = {}
        used: list[tuple[Pool, int]] = []
        if job.refined:
            refs["refining"] = ray.put(job.refined)
        else:
            refiner, slot = self.refiners.next(self._probed(self.refiners))
            refs["refining"] = refiner.refine.remote(cfg)
            used.append((self.refiners, slot))
        adapter: Any = job.adapter
        slots: dict[str, int] = {}
        if job.needs_adapter:
            trainer, slots["training"] = self.trainers.next(self._probed(self.trainers))
            adapter = refs["training"] = trainer.adapter.remote(cfg, refs["refining"], job.shared)
            used.append((self.trainers, slots["training"]))
        if job.needs_plate:
            worker, slots["background"] = self.backgrounds.next(self._probed(self.backgrounds))
            refs["background"] = worker.plate.remote(cfg, refs["refining"], job.keypoints0, adapter)
            used.append((self.backgrounds, slots["background"]))
        for pool, slot in used:
            pool.begin(slot)
        self._preps[job.render_id] = _Prep(job, refs, used, slots=slots)
        self._announce(job.render_id)

    def _announce(self, render_id: str) -> None:
        """StageStarted for the first stage of the render not finished yet."""
        prep = self._preps[render_id]
        for stage, ref in prep.refs.items():
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                if stage not in prep.announced:
                    prep.announced.add(stage)
                    self._events.append(StageStarted(render_id, stage))
                return

    def _collect_prep(self, render_id: str) -> None:
        prep = self._preps[render_id]
        pending = [r for r in prep.refs.values() if not ray.wait([r], timeout=0)[0]]
        if pending:
            self._announce(render_id)
            return
        self._end_prep(self._preps.pop(render_id))
        try:
            got = {stage: ray.get(ref, timeout=600) for stage, ref in prep.refs.items()}
        except Exception as e:
            reason, kind = ray_fault(e)
            if isinstance(e, RayActorError):
                for pool, slot in prep.actors:
                    if (id(pool), slot) not in self._probing and slot in pool.actors:
                        self._probe(pool, slot)
            self._events.append(PrepareFailed(render_id, reason, kind, worker_lost=_lost(e)))
            return
        seconds = {"prepare": time.perf_counter() - prep.started}
        adapter = got.get("training", prep.job.adapter)
        plate = got.get("background", prep.job.plate)
        self._events.append(Prepared(render_id, got["refining"], adapter, plate, seconds))

    @staticmethod
    def _end_prep(prep: _Prep) -> None:
        for pool, slot in prep.actors:
            pool.end(slot)

    # -- frames -------------------------------------------------------------------------------

    def open(self, render_id: str, spec: SessionSpec) -> None:
        self._specs[render_id] = ray.put(spec)

    def _free(self) -> list[int]:
        busy = {s for s, _, _ in self._busy.values()} | {
            i for p, i in self._probing if p == id(self.samplers)
        }
        if self.devices is not None:
            busy |= self._preparing_devices()
        return [i for i in self.samplers.slots() if i not in busy]

    def _preparing_devices(self) -> set[int]:
        """``shared_models``: DeviceWorkers with a prepare stage queued or running. A worker
        runs one call at a time, so a batch handed to one would wait behind a LoRA training
        while another worker idles; batches go to the others."""
        pending = {ref: prep.slots[stage] for prep in self._preps.values()
                   for stage, ref in prep.refs.items() if stage in prep.slots}  # fmt: skip
        if not pending:
            return set()
        done = set(ray.wait(list(pending), num_returns=len(pending), timeout=0)[0])
        return {slot for ref, slot in pending.items() if ref not in done}

    def free_slots(self) -> int:
        return len(self._free())

    def execute(self, batch_id: int, work: list[FrameWork]) -> None:
        self.samplers.ensure()
        slot = self._free()[0]
        specs = {w.render_id: [self._specs[w.render_id]] for w in work}
        ref = self.samplers.actors[slot].denoise.remote(work, specs)
        self.samplers.begin(slot)
        self._busy[ref] = (slot, batch_id, time.perf_counter())

    # -- poll ---------------------------------------------------------------------------------

    def poll(self, timeout: float) -> list[Outcome]:
        self._due_reprobes()
        deferred, self._deferred = self._deferred, []
        for job in deferred:
            self.prepare(job)
        refs = list(self._busy) + list(self._probes)
        owners = {}
        for render_id, prep in self._preps.items():
            for ref in prep.refs.values():
                refs.append(ref)
                owners[ref] = render_id
        if refs and not self._events:
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if ready else (ready, None)
        elif refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        else:
            self._doze(min(timeout, 0.05))  # nothing of ours in flight: the core's doorbell
            ready = []
        for ref in ready:
            if ref in self._busy:
                self._collect_batch(ref)
            elif ref in self._probes:
                self._collect_probe(ref)
            elif owners.get(ref) in self._preps:
                self._collect_prep(owners[ref])
        events, self._events = self._events, []
        return events

    def _collect_batch(self, ref: Any) -> None:
        slot, batch_id, start = self._busy.pop(ref)
        self.samplers.end(slot)
        try:
            outcomes, peak, sessions = ray.get(ref, timeout=600)
        except Exception as e:
            reason, kind = ray_fault(e)
            log.warning("sampler %d: batch %d failed: %s", slot, batch_id, reason)
            if isinstance(e, RayActorError) and slot in self.samplers.actors:
                self._probe(self.samplers, slot)
            self._events.append(BatchFailed(batch_id, reason, kind, worker_lost=_lost(e)))
            return
        self._memory["peak_rss_mb"] = max(self._memory["peak_rss_mb"], peak)
        self._memory["sessions_bytes"].update(sessions)
        seconds = time.perf_counter() - start
        self._events.append(BatchDone(batch_id, outcomes, seconds, peak))

    def _probe(self, pool: Pool, slot: int, *, again: bool = False) -> None:
        """Ask a failed actor for its pid: it answers once Ray restarted it; if it is dead for
        good (``ActorDiedError``) the slot gets a new actor. The slot takes no work meanwhile."""
        if not again:
            self.stats["actor_failures"] += 1
        self._probing.add((id(pool), slot))
        self._probes[pool.actors[slot].pid.remote()] = (pool, slot)

    def _collect_probe(self, ref: Any) -> None:
        pool, slot = self._probes.pop(ref)
        if slot not in pool.actors:  # released by the elastic sizing meanwhile
            self._probing.discard((id(pool), slot))
            return
        try:
            ray.get(ref, timeout=60)
        except ActorDiedError as e:
            log.warning("actor slot %d is dead for good (%s); starting a new one", slot, e)
            self.stats["replaced_actors"] += 1
            pool.put(slot)
        except RayError:  # still restarting (ActorUnavailableError): ask again, backing off
            delay = self._backoff.get((id(pool), slot), 0.5)
            self._backoff[(id(pool), slot)] = min(delay * 2, 10.0)
            self._reprobes.append((time.monotonic() + delay, pool, slot))
            return
        self._backoff.pop((id(pool), slot), None)
        self._probing.discard((id(pool), slot))

    def _due_reprobes(self) -> None:
        now = time.monotonic()
        due = [r for r in self._reprobes if r[0] <= now]
        self._reprobes = [r for r in self._reprobes if r[0] > now]
        for _, pool, slot in due:
            if slot in pool.actors:
                self._probe(pool, slot, again=True)
            else:
                self._probing.discard((id(pool), slot))

    # -- lifetime -----------------------------------------------------------------------------

    def release(self, render_id: str) -> None:
        prep = self._preps.pop(render_id, None)
        if prep is not None:
            self._end_prep(prep)
        self._deferred = [j for j in self._deferred if j.render_id != render_id]
        if self._specs.pop(render_id, None) is not None:
            for actor in self.samplers.actors.values():
                actor.close.remote(render_id)
        self._memory["sessions_bytes"].pop(render_id, None)

    def resize(self, backlog: Callable[[], Backlog]) -> int | None:
        """Elastic pools: re-plan and resize (actors/pools.py); → the prepare limit (auto)."""
        if self.elastic is None:
            return None
        probing = {k: self._probed(p) for k, p in self.pools.items()}
        plan = self.elastic.tick(lambda: self._training(backlog()), probing)
        return plan.max_preparing if plan is not None and self._auto_preparing else None

    def _training(self, backlog: Backlog) -> Backlog:
        """``backlog`` with the renders whose LoRA is still to train (only we know it)."""
        refs = [p.refs["training"] for p in self._preps.values() if "training" in p.refs]
        trained = len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else 0
        no_lora = sum("training" not in p.refs for p in self._preps.values())
        return replace(backlog, training=max(0, backlog.preparing - trained - no_lora))

    def memory(self) -> dict[str, Any]:
        memory = {
            "peak_rss_mb": self._memory["peak_rss_mb"],
            "sessions_bytes": dict(self._memory["sessions_bytes"]),
        }
        if self.devices is not None:  # shared_models hook
            memory["devices"] = self.devices.report()
        return memory

    @property
    def actors_started(self) -> int:
        """Actors created so far (replacements included)."""
        return sum(p.started for p in self.pools.values())

    def close(self) -> None:
        for pool in self.pools.values():
            for actor in pool.actors.values():
                ray.kill(actor)
            pool.actors.clear()
