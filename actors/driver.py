"""The cluster render driver: one loop = schedule → submit to actors → collect → persist.

It owns a :class:`~actors.scheduler.ChainScheduler` (pure logic) and the actors. Prepare stages
run as chained actor calls (Refiner → AppearanceTrainer → BackgroundWorker; Ray passes the
results along through the object store), so while the Samplers render frames of A and B the
trainer works on C and the background worker on D. Every finished frame is persisted under its
render folder with its latent; a dead Sampler's batch is re-queued and re-run on the restarted
actor from the persisted state, so no frame is lost or rendered differently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.scheduler import ChainScheduler, FrameRequest, Progress, Stage
from actors.workers import AppearanceTrainer, BackgroundWorker, Refiner, Sampler
from engine.config import RenderConfig
from engine.models.registry import model_name
from engine.pose import PoseSequence
from engine.render import (
    fingerprint,
    load_latent,
    open_output,
    prepare_poses,
    save_frame,
    write_contact_sheet,
    write_manifest,
)
from engine.video import VideoWriter, load_png

log = logging.getLogger(__name__)


@dataclass
class RenderTask:
    """One character of a cluster render."""

    render_id: str
    config: RenderConfig
    out: Path
    poses: PoseSequence = field(init=False)
    key: str = ""
    start: int = 0
    prep: dict[str, Any] = field(default_factory=dict)
    latents: dict[str, np.ndarray] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


class ClusterRenderer:
    """Renders many characters on a Ray cluster with resident model actors.

    Args:
        config: Engine settings shared by every render (``model`` and ``cluster`` sections).
        on_event: Called with every progress event (stage changes, finished frames with ETA).
    """

    def __init__(self, config: RenderConfig, on_event: Callable[[Progress], None] | None = None):
        c = config.cluster
        model = config.model.model_dump(mode="json")
        # num_cpus=0: placement by GPUs only (a CPU-only test cluster has 2 cores for 4+ actors).
        restarts = {"max_restarts": c.max_restarts, "max_task_retries": 0, "num_cpus": 0}
        self.model_name = model_name(config.model)
        self.refiner = Refiner.options(num_cpus=0).remote()  # type: ignore[attr-defined]
        self.trainers = [
            AppearanceTrainer.options(num_gpus=c.trainer_gpus, **restarts).remote(model)
            for _ in range(c.trainers)
        ]  # type: ignore[attr-defined]
        self.backgrounds = [
            BackgroundWorker.options(num_gpus=c.background_gpus, **restarts).remote(model)
            for _ in range(c.backgrounds)
        ]  # type: ignore[attr-defined]
        self.samplers = [
            Sampler.options(num_gpus=c.sampler_gpus, **restarts).remote(
                model, c.max_batch, c.deterministic_batches
            )
            for _ in range(c.samplers)
        ]  # type: ignore[attr-defined]
        self.scheduler = ChainScheduler(max_batch=c.max_batch, max_preparing=c.max_preparing)
        self.config = c
        self._waiting_since: float | None = None
        self.on_event = on_event
        self.tasks: dict[str, RenderTask] = {}
        self.opened: list[set[str]] = [set() for _ in self.samplers]
        self.busy: dict[Any, tuple[int, list[FrameRequest]]] = {}
        self.preparing: dict[Any, str] = {}
        self.stats: dict[str, Any] = {
            "batch_sizes": [],
            "requeued_frames": 0,
            "sampler_failures": 0,
        }

    # -- submission -----------------------------------------------------------------------

    def submit(self, render_id: str, config: RenderConfig, out: Path, *, priority: int = 0) -> None:
        """Queue a render; a folder holding some of its frames is resumed, a finished one skipped."""
        config.require_spec()
        task = RenderTask(render_id, config, Path(out))
        task.poses = prepare_poses(config)
        task.key = fingerprint(config, task.poses, self.model_name)
        task.start = open_output(task.out, task.key, True, len(task.poses.keypoints))
        for index in {0, task.start - 1} if task.start else ():
            task.latents[str(index)] = load_latent(task.out, index).numpy()
        self.tasks[render_id] = task
        signature = (
            config.width,
            config.height,
            config.sampler.steps,
            config.alignment.inter_frame,
            config.chain.kv_include_self,
        )
        self.scheduler.add(
            render_id,
            frames_total=len(task.poses.keypoints),
            signature=signature,
            priority=priority,
            frames_done=task.start,
        )

    def cancel(self, render_id: str) -> None:
        self.scheduler.cancel(render_id)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, timeout_s: float = 3600.0) -> dict[str, Progress]:
        """Drive every submitted render to an end state; returns their final status."""
        deadline = time.monotonic() + timeout_s
        while not self.scheduler.finished:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster render not finished after {timeout_s:.0f} s")
            for render_id in self.scheduler.next_prepares():
                try:
                    self._start_prepare(render_id)
                except (
                    Exception
                ) as e:  # a bad input (e.g. unreadable plate) fails this render alone
                    self.scheduler.fail(render_id, f"prepare failed: {e}")
            self._submit_batches()
            pending = list(self.busy) + list(self.preparing)
            if pending:
                holding = self._waiting_since is not None
                done, _ = ray.wait(pending, num_returns=1, timeout=0.05 if holding else 1.0)
                for ref in done:
                    self._collect(ref)
                self._submit_batches()  # keep the Samplers busy while finished renders encode
            self._emit()
        self._emit()
        return {rid: self.scheduler.status(rid) for rid in self.tasks}

    def _emit(self) -> None:
        for event in self.scheduler.events():
            if event.stage in (Stage.DONE,) and event.render_id in self.tasks:
                self._finish(self.tasks[event.render_id])
            if self.on_event is not None:
                self.on_event(event)

    def _start_prepare(self, render_id: str) -> None:
        task = self.tasks[render_id]
        cfg = task.config.model_dump(mode="json")
        refined = self.refiner.refine.remote(cfg)
        n = len(self.preparing)
        adapter = (
            self.trainers[n % len(self.trainers)].adapter.remote(cfg, refined)
            if task.config.alignment.intra_frame
            else None
        )
        plate = None
        if task.config.alignment.background:
            if task.config.plate is not None:
                from engine.method import load_plate

                plate = ray.put(
                    (
                        load_plate(task.config.plate, task.config.width, task.config.height),
                        {"source": str(task.config.plate)},
                    )
                )
            else:
                worker = self.backgrounds[n % len(self.backgrounds)]
                plate = worker.plate.remote(cfg, refined, task.poses.keypoints[0], adapter)
        task.prep = {"refined": refined, "adapter": adapter, "plate": plate}
        last = plate if plate is not None else adapter if adapter is not None else refined
        self.preparing[last] = render_id

    def _submit_batches(self) -> None:
        free = [i for i in range(len(self.samplers)) if i not in {s for s, _ in self.busy.values()}]
        for sampler in free:
            batch = self.scheduler.next_batch()
            if not batch:
                return
            if self._hold(batch):
                self.scheduler.requeue(batch)
                return
            self._waiting_since = None
            for request in list(batch):
                if request.render_id not in self.opened[sampler]:
                    try:
                        self._open(sampler, self.tasks[request.render_id])
                    except (RayTaskError, ValueError, OSError) as e:
                        self.scheduler.fail(request.render_id, f"opening the render failed: {e}")
                        batch.remove(request)
            if not batch:
                continue
            payload = [self._request(r) for r in batch]
            self.stats["batch_sizes"].append(len(batch))
            self.busy[self.samplers[sampler].denoise.remote(payload)] = (sampler, batch)

    def _hold(self, batch: list[FrameRequest]) -> bool:
        """Wait window: hold back a part-full batch while characters are still being prepared
        (they would otherwise join one frame later, unbatched), at most ``batch_wait_s``."""
        preparing = any(
            self.scheduler.status(r).stage is Stage.PREPARING for r in self.scheduler.active()
        )
        if len(batch) >= self.config.max_batch or not preparing or self.config.batch_wait_s <= 0:
            return False
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        return now - self._waiting_since < self.config.batch_wait_s

    def _request(self, r: FrameRequest) -> dict[str, Any]:
        latents = self.tasks[r.render_id].latents
        return {
            "render_id": r.render_id,
            "index": r.index,
            "previous": latents.get(str(r.index - 1)) if r.index > 0 else None,
            "anchor": latents.get("0") if r.index > 0 else None,
        }

    def _open(self, sampler: int, task: RenderTask) -> None:
        prep = task.prep
        refined = ray.get(prep["refined"], timeout=600)
        plate = ray.get(prep["plate"], timeout=600)[0] if prep["plate"] is not None else None
        self.samplers[sampler].open.remote(
            task.render_id,
            task.config.model_dump(mode="json"),
            task.poses.keypoints,
            refined["full"],
            task.config.negative_prompt,
            plate,
            prep["adapter"],
        )
        self.opened[sampler].add(task.render_id)

    # -- results ----------------------------------------------------------------------------

    def _collect(self, ref: Any) -> None:
        if ref in self.preparing:
            render_id = self.preparing.pop(ref)
            try:
                ray.get(ref, timeout=600)
            except RayActorError as e:
                log.warning("prepare of %s lost its worker (%s); re-queued", render_id, e)
                self.scheduler.requeue_prepare(render_id)
                return
            except RayTaskError as e:
                self.scheduler.fail(render_id, f"prepare failed: {e.cause if e.cause else e}")
                return
            self.scheduler.prepared(render_id)
            return
        sampler, batch = self.busy.pop(ref)
        try:
            results = ray.get(ref, timeout=600)
        except RayActorError as e:
            log.warning("sampler %d died (%s); re-queueing %d frames", sampler, e, len(batch))
            self.opened[sampler].clear()  # a restarted actor holds no sessions
            self.stats["sampler_failures"] += 1
            self.stats["requeued_frames"] += len(batch)
            self.scheduler.requeue(batch)
            return
        for result in results:
            self._store(result)

    def _store(self, result: dict[str, Any]) -> None:
        render_id, index = result["render_id"], result["index"]
        task = self.tasks[render_id]
        if self.scheduler.status(render_id).stage is not Stage.RENDERING:
            return  # cancelled or failed meanwhile
        if "error" in result:
            self.scheduler.fail(render_id, result["error"])
            return
        import torch

        latent = result["latent"]
        save_frame(
            task.out,
            index,
            result["frame"],
            torch.from_numpy(np.array(latent)),
            result["pose_map"],
            result["mask"],
        )
        task.latents[str(index)] = latent
        task.latents.pop(str(index - 1), None) if index > 1 else None
        self.scheduler.frame_done(render_id, index)

    def _stages(self, task: RenderTask) -> tuple[tuple[str, str], dict[str, Any]]:
        """(frame prompt, negative) and the prepare stages' records of a render."""
        stages: dict[str, Any] = {"executor": "ray"}
        if not task.prep:  # every frame was already persisted: nothing was prepared this run
            return ("", task.config.negative_prompt), stages
        refined = ray.get(task.prep["refined"], timeout=600)
        stages["refined_prompt"] = refined
        if task.prep["adapter"] is not None:
            stages["adapter"] = {"name": ray.get(task.prep["adapter"], timeout=600)[0]}
        if task.prep["plate"] is not None:
            stages["plate"] = ray.get(task.prep["plate"], timeout=600)[1]
        return (refined["full"], task.config.negative_prompt), stages

    def _finish(self, task: RenderTask) -> None:
        """Encode the video, contact sheet and manifest of a finished render; free its session."""
        config, out, frames = task.config, task.out, len(task.poses.keypoints)
        with VideoWriter(
            out / "video.mp4",
            fps=task.poses.fps,
            width=config.width,
            height=config.height,
            crf=config.output.crf,
        ) as video:
            for index in range(frames):
                video.write(load_png(out / "frames" / f"{index:06d}.png"))
        if config.output.contact_sheet:
            write_contact_sheet(out, task.poses, config.output.contact_sheet_frames)
        prompt, stages = self._stages(task)
        model = {"name": self.model_name, "device": "ray cluster", "dtype": config.model.dtype}
        timings = {"total": time.monotonic() - task.started}
        write_manifest(
            out, config, task.poses, model, task.key, task.start, timings, prompt, stages
        )
        for sampler, opened in zip(self.samplers, self.opened, strict=True):
            if task.render_id in opened:
                sampler.close.remote(task.render_id)
                opened.discard(task.render_id)
