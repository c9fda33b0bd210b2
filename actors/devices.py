"""One worker per GPU holding the one copy of the base model (``cluster.shared_models``).

- :class:`DeviceWorker`: a Ray actor over :class:`~engine.resident.ResidentModels` that runs
  LoRA training, plates and frame batches on one resident model set (the three-actor layout of
  ``actors/workers.py`` holds three copies per GPU). Its methods are those of the
  AppearanceTrainer (``adapter``), BackgroundWorker (``plate``) and Sampler (``denoise``,
  ``close``), so the executor drives it through the same calls.
- :class:`DevicePlanner`: the device workers of a cluster, a :class:`~actors.pools.Pool`
  (``cluster.samplers`` of them, or elastic with ``auto``) that the executor routes prepare
  stages and batches to, and their :meth:`~engine.resident.ResidentModels.report` gathered
  without blocking the core.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.pools import Pool
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
class DevicePlanner(Pool):
    """The DeviceWorkers of a render cluster: one :class:`~actors.pools.Pool` (slot-keyed, fixed
    or elastic) that the executor uses as its Samplers, trainers and background workers at once,
    so prepare stages (``next``: the least loaded slot not being probed) and batches (a free
    slot) go to the same workers; with ``cluster.samplers: auto`` the elastic sizing grows and
    shrinks it like the Samplers (:func:`engine.core.sizing.plan_pools`, shared branch).
    """

    reports: dict[int, dict[str, Any]] = field(default_factory=dict)
    _asked: dict[int, Any] = field(default_factory=dict)  # slot → pending report ref

    @classmethod
    def create(cls, config: RenderConfig, options: dict[str, Any]) -> DevicePlanner:
        """Workers of ``config.model`` (``cluster.samplers`` of them, or elastic when ``auto``)
        with ``options`` (restarts, CPUs, runtime env) and :func:`device_gpus`, spread across
        nodes, named for operators."""
        c, tag = config.cluster, uuid.uuid4().hex[:8]
        model = config.model.model_dump(mode="json")

        def make() -> Any:
            return DeviceWorker.options(  # type: ignore[attr-defined]
                num_gpus=device_gpus(config),
                name=f"avatar-device-{tag}-{uuid.uuid4().hex[:6]}",
                scheduling_strategy="SPREAD",
                **options,
            ).remote(model, c.max_batch, padding_policy(config))

        return cls(make, None if c.samplers == "auto" else int(c.samplers), kind="devices")

    def put(self, slot: int) -> None:
        super().put(slot)
        # queued right behind the constructor: ready before the first render finishes
        self._asked[slot] = self.actors[slot].report.remote()

    def remove(self, slot: int) -> None:
        super().remove(slot)
        self._asked.pop(slot, None)
        self.reports.pop(slot, None)

    def refresh(self, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Every worker's report as of now (waits behind their current calls, up to
        ``timeout_s``; a worker that does not answer keeps its last report)."""
        self._asked = {slot: actor.report.remote() for slot, actor in self.actors.items()}
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
        for slot, actor in self.actors.items():
            if slot not in self._asked:
                self._asked[slot] = actor.report.remote()
        return [self.reports[s] for s in sorted(self.reports) if s in self.actors]
