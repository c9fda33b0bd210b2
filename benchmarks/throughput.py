"""Throughput benchmark: K characters × F frames through the plain diffusers loop and our engine.

For each preset, in one run and on the same seeded random-weight models:

- (a) ``plain``: the plain diffusers loop — each character's frames rendered one after another
  with :class:`~diffusers.StableDiffusionControlNetPipeline` at batch 1 (its own, unpatched
  components: diffusers' default attention processors), same prompt, pose maps, steps, guidance,
  seeds and size.
- (b) ``engine``: our engine in one process — the Ray driver's loop without Ray:
  :class:`~actors.scheduler.ChainScheduler` → :meth:`CharacterChain.job
  <engine.session.CharacterChain.job>` → :class:`~engine.batching.BatchDenoiser` (padded like the
  Sampler actor) → decode → ``frame_done``.
- ``bare``: the batches (b) ran, replayed with pre-built jobs straight through
  ``BatchDenoiser.denoise`` + decode (no scheduler, no job building): the limit batching allows
  on this machine. (b)/bare is the batching efficiency.
- (c) ``ray``: our engine on a local Ray instance (:class:`~actors.driver.ClusterRenderer`, one
  Sampler, frames persisted and videos encoded as in production), timed from the first
  ``submit`` to the end of ``run()`` with every actor already built and warmed up.
- (d) ``ray_full``: (c) with the full method (appearance LoRA trained per character, background
  plate with the pose mask, ``latent`` inter-frame alignment): the cost of the alignment stages.

(a), (b), bare and (c) use inter-frame alignment ``none`` and no LoRA/plate, so they do the same
work on the same frames: the frames of (a) and (c) are compared with (b)'s (the prompt of all
three is the spec prompt refined by the template backend, as the Ray driver's Refiner does).
``engine_io`` (b+io) is (b) plus the output work the Ray driver does (PNG frames, pose maps,
latents, one video and manifest per character), so (b+io)/(c) is the Ray overhead alone.

Timing: models are built and every path warmed up (one 1-step frame; on Ray, a 1-frame render
after the actors are built) before the clock starts; (a), (b), bare and (c) run ``--repeat``
times and the fastest run counts. Every torch runs ``--threads`` intra-op threads (default 1:
Ray's own default in actors, and on a shared 2-core machine two OpenMP threads per process
oversubscribe the cores, which makes every run several times slower and erratic). The Ray run
records where its time went (:class:`DriverProfile`).

Prints a markdown table per preset with pass/fail against the targets of issue 5 and writes
JSON (machine, settings, timings, batch sizes, load averages) and the tables (``.md``)::

    python -m benchmarks.throughput --preset tiny --characters 8 --frames 8 --steps 20
    python -m benchmarks.throughput --presets tiny:8x8x20,small:4x4x10 --out out/bench/t.json

A preset item is ``NAME`` or ``NAME:KxF[xS]`` (characters × frames × steps for that preset).
The machine is assumed shared: the 1-minute load average is recorded before and after each run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random-weight presets: never touch the network
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from engine.config import RenderConfig, load_config
from engine.pose import save_poses_json, synthetic_dance

PROMPTS: tuple[str, ...] = (
    "a woman in a red dress dancing on a beach",
    "a man in a black suit dancing in a city street at night",
    "an astronaut in a white spacesuit dancing on the moon",
    "a girl in a yellow raincoat dancing in a park in autumn",
    "a boy in a green hoodie dancing in a gym",
    "an old man in a grey coat dancing in a library",
    "a dancer in a blue tutu dancing on a stage",
    "a robot with silver armour dancing in a factory",
)
FPS: tuple[float, ...] = (8.0, 10.0, 12.0, 6.0)
"""Pose sequence frame rates, cycled over characters so their dances differ."""


@dataclass(frozen=True)
class Case:
    """One preset's benchmark size."""

    preset: str
    characters: int
    frames: int
    steps: int

    @property
    def label(self) -> str:
        return f"{self.preset} {self.characters}x{self.frames}x{self.steps}"


@dataclass(frozen=True)
class FullMethod:
    """Settings of the full-method run (d), kept small so it finishes in bounded time."""

    inter_frame: str = "latent"
    lora_steps: int = 20
    references: int = 2
    inpaint_steps: int = 20

    def overrides(self) -> list[str]:
        return [
            "alignment.intra_frame=true",
            "alignment.background=true",
            f"alignment.inter_frame={self.inter_frame}",
            f"appearance.steps={self.lora_steps}",
            f"appearance.references={self.references}",
            "background.mask_source=pose",
            f"background.inpaint_steps={self.inpaint_steps}",
        ]


@dataclass(frozen=True)
class Target:
    """A ratio target of issue 5: ``value >= bound`` (``at_least``) or ``value <= bound``."""

    ratio: str
    bound: float
    at_least: bool
    label: str

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value >= self.bound if self.at_least else value <= self.bound

    @property
    def text(self) -> str:
        return f"{'≥' if self.at_least else '≤'} {self.bound:g}"


COMMON_TARGETS: tuple[Target, ...] = (
    Target("engine_over_ray", 1.10, False, "(b)/(c) Ray overhead"),
    Target("engine_over_bare", 0.90, True, "(b)/bare batching efficiency"),
)
SPEEDUP_TARGETS: dict[str, Target] = {
    "tiny": Target("ray_over_plain", 1.5, True, "(c)/(a) speed-up over plain diffusers"),
    "small": Target("ray_over_plain", 1.0, True, "(c)/(a) speed-up over plain diffusers"),
}
RATIOS: dict[str, tuple[str, str, str]] = {
    "ray_over_plain": ("ray", "plain", "(c)/(a) speed-up over plain diffusers"),
    "engine_over_plain": ("engine", "plain", "(b)/(a) in-process speed-up over plain diffusers"),
    "engine_over_ray": ("engine", "ray", "(b)/(c) Ray overhead"),
    "engine_io_over_ray": ("engine_io", "ray", "(b+io)/(c) Ray overhead, same output work"),
    "engine_over_bare": ("engine", "bare", "(b)/bare batching efficiency"),
    "full_over_ray": ("ray_full", "ray", "(d)/(c) full method vs like-for-like"),
}
"""name → (numerator run, denominator run, label); each ratio is of frames/s."""
RUN_LABELS: dict[str, str] = {
    "plain": "(a) plain diffusers, batch 1",
    "engine": "(b) engine in-process",
    "engine_io": "(b+io) in-process + the driver's file/video writes",
    "bare": "bare batched loop",
    "ray": "(c) engine on Ray",
    "ray_full": "(d) Ray, full method",
}


def targets_for(preset: str) -> list[Target]:
    """The issue's targets that apply to ``preset`` (the speed-up target is per preset)."""
    speedup = SPEEDUP_TARGETS.get(preset)
    return ([speedup] if speedup else []) + list(COMMON_TARGETS)


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Character:
    """One benchmark character: its render id, config (inter-frame ``none``) and poses."""

    render_id: str
    config: RenderConfig
    keypoints: np.ndarray
    prompt: str
    """The frame prompt: the spec prompt refined as the Ray driver's Refiner does (template)."""
    overrides: list[str] = field(default_factory=list)
    """The per-character ``key=value`` overrides (reused for the full-method configs)."""


def load_avg() -> float:
    """The 1-minute load average (other processes on a shared machine), or -1 if unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def make_characters(case: Case, root: Path, cache_dir: Path) -> list[Character]:
    """``case.characters`` characters with distinct prompts, seeds and dances (poses.json files
    under ``root/poses``), configured for the like-for-like runs (inter-frame ``none``)."""
    from engine.method import refine_prompt
    from engine.render import prepare_poses

    (root / "poses").mkdir(parents=True, exist_ok=True)
    base = load_config(None, preset=case.preset)
    characters = []
    for k in range(case.characters):
        poses = root / "poses" / f"c{k:02d}.json"
        fps = FPS[k % len(FPS)]
        dance = synthetic_dance(frames=case.frames, fps=fps, width=base.width, height=base.height)
        save_poses_json(dance, poses)
        prompt = PROMPTS[k % len(PROMPTS)]
        if k >= len(PROMPTS):
            prompt += f" take {k // len(PROMPTS) + 1}"  # a distinct character (and adapter)
        overrides = [
            f"prompt={prompt}",
            f"poses={poses}",
            f"seed={100 + k}",
            f"sampler.steps={case.steps}",
            "output.contact_sheet=false",
            f"cluster.max_batch={case.characters}",
            f"cache_dir={cache_dir}",
        ]
        config = load_config(
            None, preset=case.preset, overrides=[*overrides, "alignment.inter_frame=none"]
        )
        keypoints = prepare_poses(config).keypoints
        prompt = refine_prompt(config).frame_prompt
        characters.append(Character(f"c{k:02d}", config, keypoints, prompt, overrides))
    return characters


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _best(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs of one variant, with every run's seconds in ``samples_s``."""
    best = dict(min(records, key=lambda r: r["seconds"]))
    best["samples_s"] = [r["seconds"] for r in records]
    return best


@contextlib.contextmanager
def _quiet_tokenizer() -> Iterator[None]:
    """Silence the pipeline's per-call "prompt truncated to 77 tokens" warnings (the refined
    prompts are long; the engine truncates the same way, silently)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def _run_record(seconds: float, frames: int, **extra: Any) -> dict[str, Any]:
    return {
        "seconds": round(seconds, 3),
        "frames": frames,
        "frames_per_s": round(frames / seconds, 4) if seconds > 0 else None,
        "s_per_frame": round(seconds / frames, 4) if frames else None,
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# (a) the plain diffusers loop


def run_plain(
    characters: Sequence[Character], repeat: int = 1
) -> tuple[dict[str, Any], dict[tuple[str, int], Any]]:
    """(a): every character's frames one after another through StableDiffusionControlNetPipeline.

    Builds its own components (same preset and seed → the same weights as the engine's) so no
    engine attention processor is installed. Returns the best of ``repeat`` runs' record and the
    frames (uint8).
    """
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    from engine.chain import frame_seed
    from engine.models.registry import build_components
    from engine.pose import render_pose_map

    config = characters[0].config
    parts, build_s = _timed(lambda: build_components(config.model))
    pipe = StableDiffusionControlNetPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        controlnet=parts.controlnet,
        scheduler=DDIMScheduler.from_config(parts.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def frame(character: Character, index: int, steps: int) -> np.ndarray:
        c = character.config
        pose = render_pose_map(character.keypoints[index], c.width, c.height)
        out = pipe(
            prompt=character.prompt,
            negative_prompt=c.negative_prompt,
            image=Image.fromarray(pose),
            height=c.height,
            width=c.width,
            num_inference_steps=steps,
            guidance_scale=c.sampler.guidance,
            controlnet_conditioning_scale=c.sampler.controlnet_scale,
            eta=c.sampler.eta,
            generator=torch.Generator().manual_seed(frame_seed(c.seed, index)),
            output_type="np",
        )
        return (np.asarray(out.images[0]) * 255.0).round().astype(np.uint8)

    def loop() -> dict[tuple[str, int], np.ndarray]:
        return {
            (ch.render_id, i): frame(ch, i, ch.config.sampler.steps)
            for ch in characters
            for i in range(len(ch.keypoints))
        }

    with _quiet_tokenizer():
        _, warmup_s = _timed(lambda: frame(characters[0], 0, 1))
        records = []
        for _ in range(repeat):
            frames, seconds = _timed(loop)
            records.append(_run_record(seconds, len(frames)))
    record = _best(records)
    record.update(build_s=round(build_s, 3), warmup_s=round(warmup_s, 3), batch=1)
    return record, frames


# ---------------------------------------------------------------------------------------------
# (b) the engine in one process, and the bare batched loop


@dataclass
class EngineTrace:
    """What (b) did, for the bare replay and the output checks."""

    chain: Any
    sessions: dict[str, Any]
    batches: list[list[tuple[str, int]]]
    latents: dict[str, dict[int, torch.Tensor]]
    frames: dict[tuple[str, int], np.ndarray]
    pad_rows: int | None


def _pad_rows(config: RenderConfig) -> int | None:
    """The Sampler actor's padding: ``max_batch`` frames' rows when batches are deterministic."""
    from engine.batching import REF_SLOTS

    rows = 2 + (REF_SLOTS if "kv" in config.alignment.inter_frame else 0)
    return config.cluster.max_batch * rows if config.cluster.deterministic_batches else None


def _warm(chain: Any, session: Any, pad_rows: int | None) -> float:
    """One 1-step padded denoise + decode (first-call costs), excluded from the timings."""
    from engine.batching import BatchDenoiser

    job = session.job(0, None, None)
    job.settings = dataclasses.replace(job.settings, steps=1)
    start = time.perf_counter()
    latent = BatchDenoiser(chain, pad_rows=pad_rows).denoise([job])[0]
    chain.decode(latent)
    return time.perf_counter() - start


class _Outputs:
    """The Ray driver's output work, for an in-process run: each frame's PNG, pose map and latent
    as it finishes (``_store``), each render's video and manifest when it ends (``_finish``)."""

    def __init__(self, root: Path, characters: Sequence[Character], model: str):
        from engine.render import fingerprint, open_output, prepare_poses

        self.root = root
        self.model = model
        self.characters = {ch.render_id: ch for ch in characters}
        self.poses: dict[str, Any] = {}
        self.keys: dict[str, str] = {}
        for ch in characters:
            poses = prepare_poses(ch.config)
            self.poses[ch.render_id] = poses
            self.keys[ch.render_id] = fingerprint(ch.config, poses, model)
            open_output(root / ch.render_id, self.keys[ch.render_id], True, len(poses.keypoints))

    def frame(self, render_id: str, index: int, frame: np.ndarray, latent: torch.Tensor) -> None:
        from engine.pose import render_pose_map
        from engine.render import save_frame

        ch = self.characters[render_id]
        pose_map = render_pose_map(ch.keypoints[index], ch.config.width, ch.config.height)
        save_frame(self.root / render_id, index, frame, latent, pose_map, None)

    def finish(self, render_id: str, seconds: float) -> None:
        from engine.render import write_manifest
        from engine.video import VideoWriter, load_png

        ch, out, poses = self.characters[render_id], self.root / render_id, self.poses[render_id]
        c = ch.config
        with VideoWriter(
            out / "video.mp4", fps=poses.fps, width=c.width, height=c.height, crf=c.output.crf
        ) as video:
            for index in range(len(poses.keypoints)):
                video.write(load_png(out / "frames" / f"{index:06d}.png"))
        model = {"name": self.model, "device": "in-process", "dtype": c.model.dtype}
        stages = {"executor": "benchmark"}
        prompt = (ch.prompt, c.negative_prompt)
        timings = {"total": seconds}
        write_manifest(out, c, poses, model, self.keys[render_id], 0, timings, prompt, stages)


def _engine_loop(
    chain: Any,
    characters: Sequence[Character],
    pad_rows: int | None,
    out: Path | None,
) -> tuple[dict[str, Any], EngineTrace]:
    """The driver's schedule → denoise → finish loop in this process (timed), optionally with
    the driver's output work (:class:`_Outputs`) into ``out``."""
    from actors.scheduler import ChainScheduler, Stage
    from engine.batching import BatchDenoiser
    from engine.session import CharacterChain

    config = characters[0].config
    trace = EngineTrace(chain, {}, [], {}, {}, pad_rows)
    split = {"jobs": 0.0, "denoise": 0.0, "finish": 0.0, "outputs": 0.0}
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)

    def loop() -> None:
        outputs = _Outputs(out, characters, chain.parts.name) if out is not None else None
        scheduler = ChainScheduler(
            max_batch=config.cluster.max_batch, max_preparing=len(characters)
        )
        for ch in characters:
            c = ch.config
            trace.sessions[ch.render_id] = CharacterChain(
                chain, c, ch.keypoints, prompt=ch.prompt, negative=c.negative_prompt
            )
            trace.latents[ch.render_id] = {}
            signature = (
                c.width,
                c.height,
                c.sampler.steps,
                c.alignment.inter_frame,
                c.chain.kv_include_self,
            )
            scheduler.add(ch.render_id, frames_total=len(ch.keypoints), signature=signature)
        denoiser = BatchDenoiser(chain, pad_rows=pad_rows)
        start = time.perf_counter()
        while not scheduler.finished:
            for render_id in scheduler.next_prepares():
                scheduler.prepared(render_id)  # no refine / LoRA / plate stages here
            batch = scheduler.next_batch()
            if not batch:
                raise RuntimeError("scheduler has unfinished renders but no ready frame")
            t0 = time.perf_counter()
            jobs = []
            for r in batch:
                done = trace.latents[r.render_id]
                previous = done[r.index - 1] if r.index > 0 else None
                anchor = done[0] if r.index > 0 else None
                jobs.append(trace.sessions[r.render_id].job(r.index, previous, anchor))
            t1 = time.perf_counter()
            latents = denoiser.denoise(jobs)
            t2 = time.perf_counter()
            for r, latent in zip(batch, latents, strict=True):
                if not torch.isfinite(latent).all():
                    raise RuntimeError(f"{r}: the model produced non-finite values")
                frame = trace.sessions[r.render_id].finish(r.index, latent)
                trace.frames[(r.render_id, r.index)] = frame
                trace.latents[r.render_id][r.index] = latent
                if outputs is not None:
                    outputs.frame(r.render_id, r.index, frame, latent)
                scheduler.frame_done(r.render_id, r.index)
            t3 = time.perf_counter()
            if outputs is not None:
                for r in batch:
                    if scheduler.status(r.render_id).stage is Stage.DONE:
                        outputs.finish(r.render_id, t3 - start)
            t4 = time.perf_counter()
            split["jobs"] += t1 - t0
            split["denoise"] += t2 - t1
            split["finish"] += t3 - t2  # decode (+ the per-frame files with outputs)
            split["outputs"] += t4 - t3  # videos and manifests
            trace.batches.append([(r.render_id, r.index) for r in batch])

    _, seconds = _timed(loop)
    record = _run_record(
        seconds,
        len(trace.frames),
        pad_rows=pad_rows,
        batch_sizes=[len(b) for b in trace.batches],
        split_s={k: round(v, 3) for k, v in split.items()},
    )
    return record, trace


def run_engine(
    characters: Sequence[Character], io_root: Path | None = None, repeat: int = 1
) -> tuple[dict[str, Any], EngineTrace, dict[str, Any] | None]:
    """(b): the driver's loop in one process, without Ray; with ``io_root`` also (b+io): the
    same loop again doing the driver's output work (files, videos, manifests) under it. Each is
    run ``repeat`` times, alternately, and the fastest run is kept."""
    from engine.chain import FrameChain
    from engine.models.registry import build_components
    from engine.session import CharacterChain

    config = characters[0].config
    chain, build_s = _timed(
        lambda: FrameChain(build_components(config.model), config.model.attention)
    )
    pad_rows = _pad_rows(config)
    first = characters[0]
    warm = CharacterChain(
        chain, first.config, first.keypoints, prompt=first.prompt, negative=config.negative_prompt
    )
    warmup_s = _warm(chain, warm, pad_rows)
    plain: list[dict[str, Any]] = []
    with_io: list[dict[str, Any]] = []
    trace: EngineTrace | None = None
    for _ in range(repeat):
        record, run_trace = _engine_loop(chain, characters, pad_rows, None)
        plain.append(record)
        trace = trace or run_trace
        if io_root is not None:
            with_io.append(_engine_loop(chain, characters, pad_rows, io_root)[0])
    assert trace is not None
    record = _best(plain)
    record.update(build_s=round(build_s, 3), warmup_s=round(warmup_s, 3))
    return record, trace, _best(with_io) if with_io else None


def run_bare(trace: EngineTrace, repeat: int = 1) -> dict[str, Any]:
    """bare: (b)'s batches replayed with pre-built jobs through BatchDenoiser + decode only."""
    from engine.batching import BatchDenoiser

    batches = []
    for batch in trace.batches:
        jobs = []
        for render_id, index in batch:
            done = trace.latents[render_id]
            previous = done[index - 1] if index > 0 else None
            anchor = done[0] if index > 0 else None
            jobs.append(trace.sessions[render_id].job(index, previous, anchor))
        batches.append(jobs)
    denoiser = BatchDenoiser(trace.chain, pad_rows=trace.pad_rows)

    def loop() -> int:
        count = 0
        for jobs in batches:
            for latent in denoiser.denoise(jobs):
                trace.chain.decode(latent)
                count += 1
        return count

    records = []
    for _ in range(repeat):
        count, seconds = _timed(loop)
        records.append(_run_record(seconds, count, batch_sizes=[len(b) for b in batches]))
    return _best(records)


# ---------------------------------------------------------------------------------------------
# (c), (d) the engine on Ray


def _actor_threads(actors: Sequence[Any]) -> list[int]:
    """torch's intra-op thread count inside each actor."""
    import ray

    calls = [a.__ray_call__.remote(lambda _: torch.get_num_threads()) for a in actors]
    return [int(n) for n in ray.get(calls, timeout=60)]


def _set_actor_threads(actors: Sequence[Any], threads: int) -> None:
    """``torch.set_num_threads(threads)`` inside each actor."""
    import ray

    calls = [a.__ray_call__.remote(lambda _, n=threads: torch.set_num_threads(n)) for a in actors]
    ray.get(calls, timeout=60)


class DriverProfile:
    """Where a Ray run's wall time goes, seen from the driver (diagnostics, no engine change).

    Wraps the :class:`~actors.driver.ClusterRenderer` instance's own steps for one run: the
    seconds the driver spends persisting frames (``_store``), finishing renders (``_finish``:
    video, manifest), opening sessions and starting prepares, and each Sampler batch's flight
    (submit → collected: denoise + decode + transfers). With one Sampler, the sampler is idle
    for ``seconds - sampler_busy_s``.
    """

    STEPS = ("_store", "_finish", "_open", "_start_prepare", "_submit_batches")

    def __init__(self, renderer: Any):
        self.renderer = renderer
        self.seconds: dict[str, float] = dict.fromkeys(self.STEPS, 0.0)
        self.flights: list[float] = []
        self.first_submit_s: float | None = None
        self._sent: dict[Any, float] = {}
        self._start = 0.0

    def _timed_step(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                if name == "_submit_batches":
                    self._note_submits()

        return wrapper

    def _note_submits(self) -> None:
        now = time.perf_counter()
        for ref in self.renderer.busy:
            if ref not in self._sent:
                self._sent[ref] = now
                if self.first_submit_s is None:
                    self.first_submit_s = now - self._start

    def _collect(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def wrapper(ref: Any) -> Any:
            if ref in self._sent:
                self.flights.append(time.perf_counter() - self._sent.pop(ref))
            return fn(ref)

        return wrapper

    def __enter__(self) -> DriverProfile:
        self._start = time.perf_counter()
        for name in self.STEPS:
            setattr(self.renderer, name, self._timed_step(name, getattr(self.renderer, name)))
        self.renderer._collect = self._collect(self.renderer._collect)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in (*self.STEPS, "_collect"):
            vars(self.renderer).pop(name, None)  # back to the class's methods

    def record(self) -> dict[str, Any]:
        return {
            "driver_s": {k.lstrip("_"): round(v, 3) for k, v in self.seconds.items()},
            "sampler_busy_s": round(sum(self.flights), 3),
            "batch_flight_s": [round(f, 3) for f in self.flights],
            "first_batch_after_s": (
                None if self.first_submit_s is None else round(self.first_submit_s, 3)
            ),
        }


def _ray_pass(
    renderer: Any,
    configs: Sequence[tuple[str, RenderConfig]],
    out: Path,
    timeout_s: float,
) -> tuple[dict[str, Any], float]:
    """Submit ``configs`` (render id, config) into fresh folders under ``out`` and run them."""
    from actors.scheduler import Stage

    shutil.rmtree(out, ignore_errors=True)
    first_batch = len(renderer.stats["batch_sizes"])
    with DriverProfile(renderer) as profile:
        start = time.perf_counter()
        for render_id, config in configs:
            renderer.submit(render_id, config, out / render_id)
        results = renderer.run(timeout_s=timeout_s)
        seconds = time.perf_counter() - start
    failed = {
        rid: (p.stage.value, p.error)
        for rid, p in results.items()
        if rid in dict(configs) and p.stage is not Stage.DONE
    }
    if failed:
        raise RuntimeError(f"ray renders did not finish: {failed}")
    frames = sum(results[rid].frames_total for rid, _ in configs)
    record = _run_record(
        seconds,
        frames,
        batch_sizes=renderer.stats["batch_sizes"][first_batch:],
        profile=profile.record(),
    )
    return record, seconds


def _warmup_config(character: Character, root: Path, extra: Sequence[str]) -> RenderConfig:
    """A 1-frame, 1-step render of a distinct character (first-call costs, not timed)."""
    poses = root / "poses" / "warmup.json"
    c = character.config
    save_poses_json(synthetic_dance(frames=1, fps=8.0, width=c.width, height=c.height), poses)
    overrides = [
        *character.overrides,
        "prompt=a warm-up dancer in a plain room",
        f"poses={poses}",
        "sampler.steps=1",
        *extra,
    ]
    return load_config(None, preset=c.model.preset, overrides=overrides)


def run_ray(
    characters: Sequence[Character],
    root: Path,
    *,
    full: FullMethod | None,
    threads: int,
    timeout_s: float,
    repeat: int = 1,
) -> dict[str, Any]:
    """(c) and, unless ``full`` is None, (d) on a local Ray instance (started if none is).

    Actor start (model builds) and a 1-frame warm-up render per variant are measured apart.
    (c) is run ``repeat`` times (fresh render ids and folders: ``ray``, ``ray-1``, …) and the
    fastest kept; (d) once (a repeat would hit the adapter cache).
    """
    import ray

    from actors.driver import ClusterRenderer

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        engine = load_config(
            None,
            preset=characters[0].config.model.preset,
            overrides=[f"cluster.max_batch={len(characters)}"],
        )
        start = time.perf_counter()
        renderer = ClusterRenderer(engine)
        actors = [renderer.refiner, *renderer.trainers, *renderer.backgrounds, *renderer.samplers]
        ray.get([a.__ray_ready__.remote() for a in actors], timeout=600)
        actor_start_s = time.perf_counter() - start
        models = actors[1:]  # the Refiner runs no torch model
        threads_default = _actor_threads(models)
        if threads > 0:
            _set_actor_threads(models, threads)
        info: dict[str, Any] = {
            "actor_start_s": round(actor_start_s, 3),
            "actor_threads_default": threads_default,
            "sampler_threads": _actor_threads(renderer.samplers)[0],
        }
        warm = _warmup_config(characters[0], root, ["alignment.inter_frame=none"])
        _, info["warmup_s"] = _ray_pass(renderer, [("warmup", warm)], root / "ray-warmup", 600)
        runs: dict[str, Any] = {}
        configs = [(ch.render_id, ch.config) for ch in characters]
        records = [_ray_pass(renderer, configs, root / "ray", timeout_s)[0]]
        for k in range(1, repeat):
            again = [(f"{rid}-{k}", c) for rid, c in configs]
            records.append(_ray_pass(renderer, again, root / f"ray-{k}", timeout_s)[0])
        runs["ray"] = _best(records)
        runs["ray"].update(info)
        if full is not None:
            tiny_full = dataclasses.replace(full, lora_steps=1, references=1, inpaint_steps=1)
            warm = _warmup_config(characters[0], root, tiny_full.overrides())
            _, full_warmup_s = _ray_pass(
                renderer, [("warmup-full", warm)], root / "ray-full-warmup", 600
            )
            full_configs = [
                (
                    f"full-{ch.render_id}",
                    load_config(
                        None,
                        preset=ch.config.model.preset,
                        overrides=[*ch.overrides, *full.overrides()],
                    ),
                )
                for ch in characters
            ]
            runs["ray_full"], _ = _ray_pass(renderer, full_configs, root / "ray-full", timeout_s)
            runs["ray_full"].update(
                warmup_s=round(full_warmup_s, 3), settings=dataclasses.asdict(full)
            )
        return runs
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# One preset


def _frame_diffs(
    reference: dict[tuple[str, int], np.ndarray], other: dict[tuple[str, int], np.ndarray]
) -> dict[str, float]:
    """Mean and max |Δ| in grey levels between two renders of the same frames."""
    deltas = [
        np.abs(reference[key].astype(np.int16) - other[key].astype(np.int16)) for key in reference
    ]
    return {
        "mean_abs": round(float(np.mean([d.mean() for d in deltas])), 4),
        "max_abs": int(max(int(d.max()) for d in deltas)),
    }


def _ray_frames(root: Path, characters: Sequence[Character]) -> dict[tuple[str, int], np.ndarray]:
    from engine.video import load_png

    return {
        (ch.render_id, i): load_png(root / ch.render_id / "frames" / f"{i:06d}.png")
        for ch in characters
        for i in range(len(ch.keypoints))
    }


def compute_ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Every ratio of :data:`RATIOS` whose two runs are present (frames/s over frames/s)."""
    out: dict[str, float | None] = {}
    for name, (top, bottom, _) in RATIOS.items():
        a = runs.get(top, {}).get("frames_per_s")
        b = runs.get(bottom, {}).get("frames_per_s")
        out[name] = round(a / b, 4) if a and b else None
    return out


def bench_case(
    case: Case,
    root: Path,
    *,
    full: FullMethod | None,
    threads: int,
    timeout_s: float,
    repeat: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (a), (b), bare, (c) and (d) for one preset; the result dict of the JSON."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    wall = time.perf_counter()
    characters = make_characters(case, root, root / "cache")
    c = characters[0].config
    loads: dict[str, float] = {"start": load_avg()}
    runs: dict[str, dict[str, Any]] = {}

    phases: dict[str, float] = {}

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        log(f"[{case.label}] {name} …")
        result, seconds = _timed(fn)
        phases[name] = round(seconds, 2)
        loads[f"after_{name}"] = load_avg()
        return result

    runs["plain"], plain_frames = phase("plain", lambda: run_plain(characters, repeat))
    runs["engine"], trace, runs["engine_io"] = phase(
        "engine", lambda: run_engine(characters, root / "engine-io", repeat)
    )
    runs["bare"] = phase("bare", lambda: run_bare(trace, repeat))
    engine_frames = trace.frames
    trace.chain, trace.sessions = None, {}  # free the in-process models before Ray's actors
    runs.update(
        phase(
            "ray",
            lambda: run_ray(
                characters,
                root,
                full=full,
                threads=threads,
                timeout_s=timeout_s,
                repeat=repeat,
            ),
        )
    )
    ray_frames = _ray_frames(root / "ray", characters)

    ratios = compute_ratios(runs)
    targets = [
        {
            "ratio": t.ratio,
            "label": t.label,
            "target": t.text,
            "value": ratios.get(t.ratio),
            "met": t.met(ratios.get(t.ratio)),
        }
        for t in targets_for(case.preset)
    ]
    return {
        "preset": case.preset,
        "characters": case.characters,
        "frames": case.frames,
        "steps": case.steps,
        "size": [c.width, c.height],
        "guidance": c.sampler.guidance,
        "max_batch": c.cluster.max_batch,
        "threads": torch.get_num_threads(),
        "repeat": repeat,
        "deterministic_batches": c.cluster.deterministic_batches,
        "cluster": c.cluster.model_dump(mode="json"),
        "runs": runs,
        "ratios": ratios,
        "targets": targets,
        "checks": {
            "plain_vs_engine": _frame_diffs(engine_frames, plain_frames),
            "ray_vs_engine": _frame_diffs(engine_frames, ray_frames),
        },
        "load_1min": loads,
        "phase_wall_s": phases,
        "wall_s": round(time.perf_counter() - wall, 2),
    }


# ---------------------------------------------------------------------------------------------
# Report


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, torch threads and versions (and the git commit, when available)."""
    import diffusers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "diffusers": diffusers.__version__,
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if commit:
            info["commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """One preset's runs, ratios and targets as markdown, with the Ray run's time breakdown."""
    w, h = result["size"]
    runs = result["runs"]
    lines = [
        f"### {result['preset']}: {result['characters']} characters × {result['frames']} frames, "
        f"{result['steps']} steps, {w}×{h}, max_batch {result['max_batch']}",
        "",
        "| run | seconds (best) | frames/s | s/frame | all runs (s) | batch sizes |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, label in RUN_LABELS.items():
        if name not in runs:
            continue
        r = runs[name]
        sizes = r.get("batch_sizes")
        shown = "1" if name == "plain" else _sizes(sizes) if sizes else ""
        samples = ", ".join(f"{x:.1f}" for x in r.get("samples_s", [r["seconds"]]))
        lines.append(
            f"| {label} | {_fmt(r['seconds'], 1)} | {_fmt(r['frames_per_s'])} | "
            f"{_fmt(r['s_per_frame'])} | {samples} | {shown} |"
        )
    lines += ["", "| ratio (of frames/s) | value | target | result |", "|---|---:|---:|---|"]
    targeted = {t["ratio"]: t for t in result["targets"]}
    for name, (_, _, label) in RATIOS.items():
        value = result["ratios"].get(name)
        if value is None:
            continue
        t = targeted.get(name)
        verdict = "—" if t is None else "PASS" if t["met"] else "FAIL"
        lines.append(f"| {label} | {_fmt(value)} | {t['target'] if t else ''} | {verdict} |")
    ray = runs.get("ray", {})
    checks = result["checks"]
    loads = result["load_1min"]
    lines += ["", _breakdown(result)] if "profile" in ray else [""]
    lines += [
        "",
        f"torch threads: in-process {result['threads']}, Sampler {ray.get('sampler_threads')} "
        f"(Ray's default in the actors: {ray.get('actor_threads_default')}); actor start "
        f"{_fmt(ray.get('actor_start_s'), 1)} s. Frames vs (b): plain diffusers mean |Δ| "
        f"{checks['plain_vs_engine']['mean_abs']} (max {checks['plain_vs_engine']['max_abs']}), "
        f"Ray max |Δ| {checks['ray_vs_engine']['max_abs']} grey levels. Load (1 min) "
        f"{' → '.join(f'{v:.2f}' for v in loads.values())} on {os.cpu_count()} cores; "
        f"wall {result['wall_s']:.0f} s.",
    ]
    return "\n".join(lines)


def _breakdown(result: dict[str, Any]) -> str:
    """Where (c)'s time went, next to (b)'s: Sampler batches, idle Sampler, driver output work."""
    ray, engine = result["runs"]["ray"], result["runs"]["engine"]
    p = ray["profile"]
    flights = p["batch_flight_s"]
    split = engine.get("split_s", {})
    per_batch = (split.get("denoise", 0.0) + split.get("finish", 0.0)) / max(
        1, len(engine["batch_sizes"])
    )
    return (
        f"(c) breakdown: {len(flights)} Sampler batches ({_sizes(ray['batch_sizes'])}) busy "
        f"{p['sampler_busy_s']:.2f} s, mean {p['sampler_busy_s'] / max(1, len(flights)):.3f} "
        f"s/batch vs (b) {per_batch:.3f} s/batch (denoise + decode); Sampler idle "
        f"{ray['seconds'] - p['sampler_busy_s']:.2f} s, of which driver file writes "
        f"{p['driver_s']['store']:.2f} s and video/manifest {p['driver_s']['finish']:.2f} s."
    )


def _sizes(sizes: list[int]) -> str:
    """Run-length batch sizes: ``8×8`` for eight batches of 8, ``1, 7, 8×7`` …"""
    parts: list[str] = []
    i = 0
    while i < len(sizes):
        j = i
        while j < len(sizes) and sizes[j] == sizes[i]:
            j += 1
        parts.append(f"{sizes[i]}×{j - i}" if j - i > 1 else str(sizes[i]))
        i = j
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# CLI


def parse_cases(spec: str, characters: int, frames: int, steps: int) -> list[Case]:
    """``tiny,small:4x4x10`` → cases; a bare name uses the default K, F and steps."""
    cases = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, size = item.partition(":")
        k, f, s = characters, frames, steps
        if size:
            numbers = [int(n) for n in size.lower().split("x")]
            if len(numbers) not in (2, 3) or min(numbers) < 1:
                raise argparse.ArgumentTypeError(f"bad preset item {item!r}: use NAME:KxF[xS]")
            k, f = numbers[:2]
            s = numbers[2] if len(numbers) == 3 else steps
        cases.append(Case(name, k, f, s))
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="tiny", help="preset to run (default tiny)")
    parser.add_argument(
        "--presets", default=None, help="comma list NAME[:KxF[xS]], overrides --preset"
    )
    parser.add_argument("--characters", type=int, default=8, help="K characters (default 8)")
    parser.add_argument("--frames", type=int, default=8, help="F frames each (default 8)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--skip-full", action="store_true", help="skip (d), the full method")
    parser.add_argument(
        "--full-inter", default="latent", help="(d) inter-frame alignment (default latent)"
    )
    parser.add_argument("--lora-steps", type=int, default=20, help="(d) appearance.steps")
    parser.add_argument("--references", type=int, default=2, help="(d) appearance.references")
    parser.add_argument("--inpaint-steps", type=int, default=20, help="(d) inpainting steps")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in this process and in every Ray actor (default 1, Ray's own default "
        "for actors; 0 leaves both as they are)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="run (a), (b), bare and (c) this many times and keep the fastest (default 2)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="per Ray run, seconds")
    parser.add_argument("--out", type=Path, default=Path("out/bench/throughput.json"))
    args = parser.parse_args(argv)

    cases = parse_cases(args.presets or args.preset, args.characters, args.frames, args.steps)
    full = (
        None
        if args.skip_full
        else FullMethod(args.full_inter, args.lora_steps, args.references, args.inpaint_steps)
    )
    threads_default = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    work = args.out.parent / f"{args.out.stem}-work"
    report: dict[str, Any] = {
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "full_method": dataclasses.asdict(full) if full else None,
            "threads": args.threads,
            "repeat": args.repeat,
            "torch_threads_default": threads_default,
        },
        "presets": {},
    }
    start = time.perf_counter()
    tables = []
    try:
        for case in cases:
            result = bench_case(
                case,
                work / case.preset,
                full=full,
                threads=args.threads,
                timeout_s=args.timeout,
                repeat=max(1, args.repeat),
            )
            report["presets"][case.preset] = result
            tables.append(markdown(result))
            print("\n" + tables[-1] + "\n", flush=True)
    finally:
        torch.set_num_threads(threads_default)  # main() may run inside another program
    report["wall_s"] = round(time.perf_counter() - start, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, args.out)
    args.out.with_suffix(".md").write_text("\n\n".join(tables) + "\n")
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
