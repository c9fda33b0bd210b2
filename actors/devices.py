"""One worker per GPU holding the one copy of the base model (``cluster.shared_models``).

- :class:`DeviceWorker`: a Ray actor over :class:`~engine.resident.ResidentModels` that runs
  LoRA training, plates and frame batches on one resident model set (the three-actor layout of
  ``actors/workers.py`` holds three copies per GPU). Its methods are those of the
  AppearanceTrainer (``adapter``), BackgroundWorker (``plate``) and Sampler (``denoise``,
  ``close``), so the executor drives it through the same calls.
- :class:`DevicePlanner`: the device workers of a cluster (``cluster.samplers`` of them) and the
  routing of prepare stages and batches to them (round robin over the devices that answer), and
  their :meth:`~engine.resident.ResidentModels.report` gathered without blocking the core.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.workers import _Worker
from engine.config import RenderConfig
from engine.core.work import AdapterPayload, FrameOutcome, FrameWork, padding_policy
from engine.resident import ResidentModels
from engine.storage import Storage


@ray.remote
class DeviceWorker(_Worker):
    """The base model resident once on this actor's GPU; sampling, LoRA training and plate work
    on it, one call at a time."""

    def __init__(self, model: dict[str, Any], max_batch: int, padding: str = "bucket"):
        self.resident = ResidentModels(model, max_batch, padding)

    def adapter(
        self, config: dict[str, Any], refined: dict[str, Any], shared: Storage | None = None
    ) -> AdapterPayload:
        return self.resident.adapter(RenderConfig.model_validate(config), refined, shared)

    def plate(
        self, config: dict[str, Any], refined: dict[str, Any], keypoints0: Any, adapter: Any
    ) -> Any:
        cfg = RenderConfig.model_validate(config)
        return self.resident.plate(cfg, refined, keypoints0, adapter)

    def denoise(
        self, work: list[FrameWork], specs: dict[str, list[Any]]
    ) -> tuple[list[FrameOutcome], float, dict[str, int]]:
        """As :meth:`actors.workers.Sampler.denoise`."""
        from engine.core.work import peak_rss_mb

        state = self.resident.sampler
        outcomes = self.resident.denoise(work, lambda rid: ray.get(specs[rid][0], timeout=600))
        state.deliver(outcomes)
        return outcomes, peak_rss_mb(), state.memory()

    def close(self, render_id: str) -> None:
        self.resident.close(render_id)

    def sessions(self) -> list[str]:
        return sorted(self.resident.sampler.sessions)

    def adapters(self) -> list[str]:
        from engine.appearance import loaded_adapters

        return sorted(loaded_adapters(self.resident.chain.parts.unet))

    def report(self) -> dict[str, Any]:
        """:meth:`ResidentModels.report` with this worker's pid and node."""
        return {**self.resident.report(), "pid": self.pid(), "node_id": self.node_id()}


def device_gpus(config: RenderConfig) -> float:
    """A DeviceWorker's GPU share: the Sampler's, trainer's and background worker's together
    (they share its one model copy), at most one GPU."""
    c = config.cluster
    return min(1.0, c.sampler_gpus + c.trainer_gpus + c.background_gpus)


@dataclass
class DevicePlanner:
    """The DeviceWorkers of a render cluster, one slot per GPU (``count``).

    It has the executor's pool interface (``ensure``, ``next``, ``actors``, ``count``,
    ``started``, ``make``), so the executor routes prepare stages (``next``: round robin over
    the slots not being probed) and batches (a free slot) to the same workers.
    """

    make: Any
    count: int
    actors: list[Any] = field(default_factory=list)
    turn: int = 0
    started: int = 0
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)
    _asked: dict[int, Any] = field(default_factory=dict)  # slot → pending report ref

    @classmethod
    def create(cls, config: RenderConfig, options: dict[str, Any]) -> DevicePlanner:
        """``cluster.samplers`` workers of ``config.model`` with ``options`` (restarts, CPUs,
        runtime env) and :func:`device_gpus`, spread across nodes, named for operators."""
        c, tag = config.cluster, uuid.uuid4().hex[:8]
        model = config.model.model_dump(mode="json")

        def make() -> Any:
            return DeviceWorker.options(  # type: ignore[attr-defined]
                num_gpus=device_gpus(config),
                name=f"avatar-device-{tag}-{uuid.uuid4().hex[:6]}",
                scheduling_strategy="SPREAD",
                **options,
            ).remote(model, c.max_batch, padding_policy(config))

        return cls(make, c.samplers)

    def ensure(self) -> None:
        while len(self.actors) < self.count:
            self.actors.append(self.make())
            self.started += 1
            # queued right behind the constructor: ready before the first render finishes
            self._asked[len(self.actors) - 1] = self.actors[-1].report.remote()

    def next(self, avoid: set[int] | frozenset[int] = frozenset()) -> tuple[Any, int]:
        """(worker, slot) for a prepare stage: round robin over the slots not in ``avoid``."""
        self.ensure()
        for _ in range(len(self.actors)):
            self.turn += 1
            slot = self.turn % len(self.actors)
            if slot not in avoid:
                break
        return self.actors[slot], slot

    def refresh(self, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Every worker's report as of now (waits behind their current calls, up to
        ``timeout_s``; a worker that does not answer keeps its last report)."""
        self._asked = {slot: actor.report.remote() for slot, actor in enumerate(self.actors)}
        ray.wait(list(self._asked.values()), num_returns=len(self._asked), timeout=timeout_s)
        return self.report()

    def report(self) -> list[dict[str, Any]]:
        """The latest report of each worker (``slot`` added), without waiting: a report asked
        for now is queued behind the worker's current call and read on a later call."""
        for slot, ref in list(self._asked.items()):
            if ray.wait([ref], timeout=0)[0]:
                del self._asked[slot]
                with contextlib.suppress(ray.exceptions.RayError):  # lost: keep its last one
                    self.reports[slot] = {"slot": slot, **ray.get(ref, timeout=10)}
        for slot, actor in enumerate(self.actors):
            if slot not in self._asked:
                self._asked[slot] = actor.report.remote()
        return [self.reports[s] for s in sorted(self.reports)]
