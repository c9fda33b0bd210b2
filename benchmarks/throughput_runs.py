"""The variants of :mod:`benchmarks.throughput`: plain diffusers at batch 1 and batched across
characters, the engine core in-process and on Ray, the bare batched loop, the full method.

Each runner warms its variant up (first-call costs, never timed), then times ``repeat`` passes
over the same characters and returns the fastest pass's record (:func:`benchmarks.common.best`)
and the frames it made, keyed (character id, frame index), for the like-for-like checks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common
from benchmarks.common import Character, best, run_core, run_record, timed
from engine.config import RenderConfig, load_config


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


class RowCounter:
    """Rows of every UNet forward pass while entered (what each batch really computed)."""

    def __init__(self, unet: torch.nn.Module):
        self.unet, self.rows = unet, []

    def __enter__(self) -> RowCounter:
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            self.rows.append(int((args[0] if args else kwargs["sample"]).shape[0]))

        self.handle = self.unet.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# -- (a), (a2) plain diffusers -------------------------------------------------------------------


def _pipeline(config: RenderConfig) -> Any:
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    from engine.models.registry import build_components

    parts = build_components(config.model)
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
    return pipe


def _plain_call(pipe: Any, group: Sequence[Character], index: int, steps: int) -> list[np.ndarray]:
    """Frame ``index`` of every character of ``group`` in one pipeline call → uint8 frames."""
    from PIL import Image

    from engine.chain import frame_seed
    from engine.pose import render_pose_map

    c = group[0].config
    out = pipe(
        prompt=[ch.prompt for ch in group],
        negative_prompt=[ch.config.negative_prompt for ch in group],
        image=[
            Image.fromarray(render_pose_map(ch.keypoints[index], c.width, c.height)) for ch in group
        ],
        height=c.height,
        width=c.width,
        num_inference_steps=steps,
        guidance_scale=c.sampler.guidance,
        controlnet_conditioning_scale=c.sampler.controlnet_scale,
        eta=c.sampler.eta,
        generator=[
            torch.Generator().manual_seed(frame_seed(ch.config.seed, index)) for ch in group
        ],
        output_type="np",
    )
    return [(np.asarray(img) * 255.0).round().astype(np.uint8) for img in out.images]


def run_plain(
    characters: Sequence[Character], repeat: int, batched: bool
) -> tuple[dict[str, Any], dict[tuple[str, int], np.ndarray]]:
    """(a) batch 1, or (a2) one call per frame index across the characters → (best record,
    frames keyed (render id, index))."""
    pipe, build_s = timed(lambda: _pipeline(characters[0].config))
    frames_each, steps = len(characters[0].keypoints), characters[0].config.sampler.steps
    groups = [list(characters)] if batched else [[ch] for ch in characters]

    def loop() -> dict[tuple[str, int], np.ndarray]:
        out = {}
        for group in groups:
            for i in range(frames_each):
                for ch, frame in zip(group, _plain_call(pipe, group, i, steps), strict=True):
                    out[(ch.render_id, i)] = frame
        return dict(sorted(out.items()))

    with common.quiet_tokenizer():
        _, warmup_s = timed(lambda: _plain_call(pipe, groups[0], 0, 1))
        records, frames = [], {}
        for _ in range(repeat):
            frames, seconds = timed(loop)
            records.append(run_record(seconds, len(frames)))
    record = best(records)
    batch = len(characters) if batched else 1
    record.update(build_s=round(build_s, 3), warmup_s=round(warmup_s, 3), batch=batch)
    return record, frames


# -- (b) the in-process core, and the bare batched loop ------------------------------------------


@dataclass
class EngineTrace:
    """What (b)'s first timed run did, for the bare replay and the frame checks."""

    chain: Any
    folder: Path
    batches: list[list[tuple[str, int]]]
    frames: dict[tuple[str, int], np.ndarray]


def _timed_core_runs(
    core: Any,
    executor: Any,
    unet: Any,
    characters: Sequence[Character],
    repeat: int,
    timeout_s: float,
) -> tuple[dict[str, Any], list[list[tuple[str, int]]]]:
    """``repeat`` timed passes of every character through ``core`` (fresh ids per pass) →
    (best record, the batches of the first pass)."""
    records, batches = [], []
    for k in range(repeat):
        specs = [(f"{ch.render_id}-r{k}", ch.config) for ch in characters]
        first = len(core.stats["batches"])
        counter = RowCounter(unet) if unet is not None else None
        with common.CoreProfile(executor) as profile, counter or contextlib.nullcontext():
            seconds, sizes = run_core(core, specs, timeout_s)
        frames = sum(len(ch.keypoints) for ch in characters)
        rows = {"unet_rows": counter.rows} if counter else {}
        busy = profile.record()
        outside = {"outside_sampler_s": round(seconds - busy["sampler_busy_s"], 3)}
        records.append(run_record(seconds, frames, batch_sizes=sizes, **busy, **outside, **rows))
        if k == 0:
            batches = [list(b) for b in core.stats["batches"][first:]]
    return best(records), batches


def run_engine(
    characters: Sequence[Character],
    engine: RenderConfig,
    root: Path,
    repeat: int,
    timeout_s: float,
) -> tuple[dict[str, Any], EngineTrace]:
    """(b): the engine core with the in-process executor (models built once, warmed up)."""
    from engine.core import EngineCore, InProcessExecutor, RenderStore

    executor, build_s = timed(lambda: InProcessExecutor(engine))
    core = EngineCore(engine, RenderStore(root / "engine"), executor, resume=False)
    try:
        warm = [("warmup", common.warmup_spec(characters[0], root))]
        _, warmup_s = timed(lambda: run_core(core, warm, 600))
        unet = executor.chain.parts.unet
        record, batches = _timed_core_runs(core, executor, unet, characters, repeat, timeout_s)
    finally:
        core.close()
    record.update(build_s=round(build_s, 3), warmup_s=round(warmup_s, 3))
    ids = [f"{ch.render_id}-r0" for ch in characters]
    frames = common.load_frames(root / "engine", ids, len(characters[0].keypoints))
    return record, EngineTrace(executor.chain, root / "engine", batches, frames)


def sampler_padding(engine: RenderConfig, inter_frame: str) -> tuple[int, str]:
    """(capacity in rows, padding policy) of the Sampler's forward passes and VAE decodes, as
    ``SamplerState`` sets them from the engine config."""
    from engine.batching import rows_per_frame
    from engine.core.work import padding_policy

    return engine.cluster.max_batch * rows_per_frame(inter_frame), padding_policy(engine)


def run_bare(
    trace: EngineTrace, characters: Sequence[Character], engine: RenderConfig, repeat: int
) -> tuple[dict[str, Any], dict[tuple[str, int], np.ndarray]]:
    """bare: (b)'s batches replayed with pre-built jobs (references from (b)'s persisted
    latents) through BatchDenoiser + the batched VAE decode only, padded as the Sampler pads
    (:func:`sampler_padding`) → (best record, frames)."""
    from engine.batching import BatchDenoiser, decode_frames
    from engine.core.outputs import load_latent
    from engine.session import CharacterChain

    chain = trace.chain
    sessions = {
        f"{ch.render_id}-r0": CharacterChain(
            chain, ch.config, ch.keypoints, prompt=ch.prompt, negative=ch.config.negative_prompt
        )
        for ch in characters
    }

    def latent(rid: str, index: int) -> torch.Tensor:
        return torch.from_numpy(load_latent(trace.folder / rid, index))

    batches = [
        [
            sessions[rid].job(i, latent(rid, i - 1) if i else None, latent(rid, 0) if i else None)
            for rid, i in batch
        ]
        for batch in trace.batches
    ]
    capacity, padding = sampler_padding(engine, characters[0].config.alignment.inter_frame)
    denoiser = BatchDenoiser(chain, pad_rows=capacity, padding=padding)  # type: ignore[arg-type]
    keys = [key for batch in trace.batches for key in batch]
    max_batch = engine.cluster.max_batch

    def loop() -> list[np.ndarray]:
        return [
            frame
            for jobs in batches
            for frame in decode_frames(chain, denoiser.denoise(jobs), padding, max_batch)  # type: ignore[arg-type]
        ]

    records, decoded = [], []
    for _ in range(repeat):
        with RowCounter(chain.parts.unet) as counter:
            decoded, seconds = timed(loop)
        sizes = [len(b) for b in batches]
        records.append(run_record(seconds, len(decoded), batch_sizes=sizes, unet_rows=counter.rows))
    return best(records), dict(sorted(zip(keys, decoded, strict=True)))


# -- (c), (d) the core on Ray --------------------------------------------------------------------


def _sampler_threads(executor: Any) -> int:
    import ray

    actor = executor.samplers.actors[0]
    return int(ray.get(actor.__ray_call__.remote(lambda _: torch.get_num_threads()), timeout=60))


def run_ray(
    characters: Sequence[Character],
    engine: RenderConfig,
    root: Path,
    *,
    full: FullMethod | None,
    repeat: int,
    timeout_s: float,
) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, int], np.ndarray]]:
    """(c) and, unless ``full`` is None, (d) on a local Ray instance (started if none is) →
    (runs, (c)'s frames). (d) runs once (a repeat would hit the adapter cache)."""
    import ray

    from actors.executor import RayExecutor
    from engine.core import EngineCore, RenderStore

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    executor = RayExecutor(engine)
    core = EngineCore(engine, RenderStore(root / "ray"), executor, resume=False)
    try:
        start = time.perf_counter()
        executor.refiners.ensure()
        executor.samplers.ensure()
        actors = [*executor.refiners.actors, *executor.samplers.actors]
        ray.get([a.__ray_ready__.remote() for a in actors], timeout=600)
        info = {"actor_start_s": round(time.perf_counter() - start, 3)}
        info["sampler_threads"] = _sampler_threads(executor)
        warm = [("warmup", common.warmup_spec(characters[0], root))]
        info["warmup_s"] = round(timed(lambda: run_core(core, warm, 600))[1], 3)
        record, _ = _timed_core_runs(core, executor, None, characters, repeat, timeout_s)
        runs = {"ray": {**record, **info}}
        if full is not None:
            runs["ray_full"] = _ray_full(core, executor, characters, root, full, timeout_s)
    finally:
        core.close()
        if started:
            ray.shutdown()
    ids = [f"{ch.render_id}-r0" for ch in characters]
    return runs, common.load_frames(root / "ray", ids, len(characters[0].keypoints))


def _ray_full(
    core: Any,
    executor: Any,
    characters: Sequence[Character],
    root: Path,
    full: FullMethod,
    timeout_s: float,
) -> dict[str, Any]:
    """(d): a tiny full-method warm-up (starts the trainer and background actors, builds the
    plate models), then every character once with the full method."""
    tiny = FullMethod(full.inter_frame, lora_steps=1, references=1, inpaint_steps=1)
    warm = [("warmup-full", common.warmup_spec(characters[0], root, tiny.overrides()))]
    _, warmup_s = timed(lambda: run_core(core, warm, 600))
    specs = [
        (
            f"full-{ch.render_id}",
            load_config(
                None, preset=ch.config.model.preset, overrides=[*ch.overrides, *full.overrides()]
            ),
        )
        for ch in characters
    ]
    with common.CoreProfile(executor) as profile:
        seconds, sizes = run_core(core, specs, timeout_s)
    frames = sum(len(ch.keypoints) for ch in characters)
    return run_record(
        seconds,
        frames,
        batch_sizes=sizes,
        warmup_s=round(warmup_s, 3),
        settings=asdict(full),
        **profile.record(),
    )
