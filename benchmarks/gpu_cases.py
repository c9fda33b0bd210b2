"""The measurements of :mod:`benchmarks.gpu`: one dtype's resident models and what is timed on them.

Every engine figure goes through the engine's own loop (:class:`~engine.batching.BatchDenoiser`
and :meth:`~engine.chain.FrameChain.decode_batch`, the core's :class:`~engine.core.EngineCore`);
the peer is plain diffusers' :class:`~diffusers.StableDiffusionControlNetPipeline`, batched, on
an unpatched copy of the same weights. Timings synchronise the GPU before and after each call
(wall seconds of the whole call); each figure is the fastest of ``repeats`` calls after one
1-step warm-up at the same shapes (kernel selection, cuDNN autotuning, compilation).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch

from benchmarks import common
from engine.batching import BatchDenoiser, FrameJob, rows_per_frame
from engine.chain import FrameChain, FrameSettings, Reference
from engine.config import RenderConfig, load_config

MODES: tuple[str, ...] = ("none", "latent", "kv", "kv+latent")
ADAPTERS: tuple[str, ...] = ("char0", "char1", "char2")


@dataclass(frozen=True)
class Plan:
    """What one run measures (the full plan from the preset's YAML, or the CPU smoke plan)."""

    preset: str
    device: str
    steps: int
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    """The first is the main dtype (peer, LoRA, core, DeepCache, compile run in it)."""
    repeats: int = 2
    core_characters: int = 8
    core_frames: int = 3
    deep_cache: int = 3
    compile_backend: str = "inductor"
    """torch.compile's back-end (the smoke plan traces with ``eager``: no code generation)."""
    goal_batch: int = 8
    goal_s_per_frame: float = 0.2


def full_plan(preset: str = "sd15-random", device: str = "cuda") -> Plan:
    """The GPU plan: the preset's steps and main dtype (configs/<preset>.yaml), batches 1-16."""
    config = load_config(None, preset=preset)
    main = config.model.dtype
    other = "bfloat16" if main != "bfloat16" else "float16"
    return Plan(preset, device, config.sampler.steps, (8, 1, 4, 16), (main, other))


SMOKE = Plan(
    "tiny", "cpu", 1, (2, 1), ("float32", "bfloat16"), repeats=1, core_characters=2,
    core_frames=2, deep_cache=2, compile_backend="eager", goal_batch=2,
)  # fmt: skip
"""The CPU smoke plan: tiny preset (64²), 1 step, batches of 1-2: every code path in seconds."""


# -- timing --------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clocked(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), wall seconds), the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict[str, Any]) -> Iterator[None]:
    """Record in ``into`` the GPU memory torch allocated: ``resident_gib`` when the block starts
    (every resident model of the run), ``peak_gpu_gib`` at the block's peak, and
    ``peak_over_resident_gib`` (what the block itself needed: activations, workspaces). None on
    a CPU."""
    if device.type != "cuda":
        into.update(resident_gib=None, peak_gpu_gib=None, peak_over_resident_gib=None)
        yield
        return
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    yield
    peak = torch.cuda.max_memory_allocated(device)
    into["resident_gib"] = round(resident / 2**30, 2)
    into["peak_gpu_gib"] = round(peak / 2**30, 2)
    into["peak_over_resident_gib"] = round((peak - resident) / 2**30, 2)


# -- resident models -----------------------------------------------------------------------------


@dataclass
class Bench:
    """One dtype's resident models: the engine's chain and an unpatched copy for the peer."""

    config: RenderConfig
    chain: FrameChain
    pristine: Any
    """The same weights before the engine patched the attention (DiffusionComponents)."""
    poses: list[torch.Tensor]
    """(1, 3, H, W) pose maps in [0, 1], one per frame of a synthetic dance (max batch + 2)."""
    pose_maps: list[np.ndarray]
    """The same poses as (H, W, 3) uint8 images (the pipeline's input)."""
    text: torch.Tensor
    """(2, 77, D) [negative, prompt] embeddings."""
    build_s: float

    @property
    def weights_gib(self) -> float:
        """GiB of the engine's models' parameters (UNet, ControlNet, VAE, text encoder)."""
        p = self.chain.parts
        modules = (p.unet, p.controlnet, p.vae, p.text_encoder)
        size = sum(t.numel() * t.element_size() for m in modules for t in m.parameters())
        return round(size / 2**30, 3)

    @property
    def device(self) -> torch.device:
        return self.chain.device


def build_bench(plan: Plan, dtype: str, source: Bench | None = None) -> Bench:
    """``plan.preset``'s models in ``dtype`` on ``plan.device``: built from the registry, or (with
    ``source``) converted from another dtype's unpatched copy (skips the random initialisation;
    the weights are then ``source``'s, rounded to ``dtype``)."""
    from engine.models.registry import build_components
    from engine.pose import render_pose_map, synthetic_dance

    if source is None:
        overrides = [f"model.device={plan.device}", f"sampler.steps={plan.steps}"]
        config = load_config(
            None, preset=plan.preset, overrides=[f"model.dtype={dtype}", *overrides]
        )
    else:  # the settings stay the source's (the random-weight presets validate float32 only)
        config = source.config
    start = time.perf_counter()
    if source is None:
        parts = build_components(config.model)
    else:
        parts = copy.deepcopy(source.pristine)
        torch_dtype = getattr(torch, dtype)
        for module in (parts.unet, parts.controlnet, parts.vae, parts.text_encoder):
            module.to(torch_dtype)
        parts.dtype = torch_dtype
    pristine = copy.deepcopy(parts)
    chain = FrameChain(parts, config.model.attention)
    sync(chain.device)
    build_s = time.perf_counter() - start
    w, h = config.width, config.height
    dance = synthetic_dance(frames=max(plan.batches) + 2, fps=8.0, width=w, height=h)
    maps = [render_pose_map(k, w, h) for k in dance.keypoints]
    text = chain.encode_prompt(common.PROMPTS[0], config.negative_prompt)
    poses = [chain.image_tensor(m) for m in maps]
    return Bench(config, chain, pristine, poses, maps, text, build_s)


def settings(bench: Bench, mode: str, **changes: Any) -> FrameSettings:
    """The preset's frame settings with inter-frame ``mode`` and ``changes``."""
    return replace(FrameSettings.from_config(bench.config), inter_frame=mode, **changes)


def steady_jobs(
    bench: Bench, s: FrameSettings, batch: int, adapters: Sequence[str | None] = ()
) -> list[FrameJob]:
    """Frame 2 of ``batch`` characters (distinct poses and seeds), each with a finished frame 1
    (previous) and frame 0 (anchor) of random latents: the steady state of a chain, so ``kv``
    attends to two references and ``latent`` starts late. ``adapters``: the LoRA per row."""
    g = torch.Generator().manual_seed(7)
    shape = (1, 4, bench.poses[0].shape[2] // 8, bench.poses[0].shape[3] // 8)
    dev, dt = bench.device, bench.chain.parts.dtype

    def latent() -> torch.Tensor:
        return torch.randn(shape, generator=g).to(dev, dt)

    jobs = []
    for k in range(batch):
        anchor = Reference(0, latent(), bench.poses[k])
        previous = Reference(1, latent(), bench.poses[k + 1])
        adapter = adapters[k % len(adapters)] if adapters else None
        job = FrameJob(2, 100 + k, bench.poses[k + 2], bench.text, s, previous, anchor)
        job.adapter = adapter
        jobs.append(job)
    return jobs


def measure_batch(
    bench: Bench, plan: Plan, mode: str, batch: int, *, adapters: Sequence[str | None] = (),
    **changes: Any,
) -> dict[str, Any]:  # fmt: skip
    """s/frame per character of ``batch`` characters in one batch (denoise + VAE decode), the
    split between them, the warm-up (1 step: first-call costs, compilation) and the peak GPU
    memory of the timed calls."""
    s = settings(bench, mode, **changes)
    denoiser = BatchDenoiser(bench.chain)
    warm = steady_jobs(bench, replace(s, steps=1), batch, adapters)
    dev = bench.device
    (_, warmup_s) = clocked(dev, lambda: bench.chain.decode_batch(denoiser.denoise(warm)))
    work = steady_jobs(bench, s, batch, adapters)
    samples: list[tuple[float, float]] = []
    row: dict[str, Any] = {}
    with peak_memory(dev, row):
        for _ in range(plan.repeats):
            latents, denoise_s = clocked(dev, lambda: denoiser.denoise(work))
            _, decode_s = clocked(dev, partial(bench.chain.decode_batch, latents))
            samples.append((denoise_s, decode_s))
    denoise_s, decode_s = min(samples, key=sum)
    finite = sum(bool(torch.isfinite(x).all()) for x in latents)
    total = denoise_s + decode_s
    return {
        "mode": mode,
        "batch": batch,
        "dtype": str(bench.chain.parts.dtype).removeprefix("torch."),
        "s_per_frame": round(total / batch, 4),
        "denoise_s": round(denoise_s, 4),
        "decode_s": round(decode_s, 4),
        "decode_share": round(decode_s / total, 4),
        "samples_s": [round(sum(x), 4) for x in samples],
        "warmup_s": round(warmup_s, 3),
        "unet_rows": batch * rows_per_frame(mode) if "kv" in mode else batch * 2,
        "finite_latents": f"{finite}/{batch}",
        "weights_gib": bench.weights_gib,
        **row,
        **{k: v for k, v in changes.items()},
    }


# -- the peer: plain diffusers -------------------------------------------------------------------


def peer_pipeline(bench: Bench) -> Any:
    """StableDiffusionControlNetPipeline on ``bench``'s unpatched weights, DDIM as the engine."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    p = bench.pristine
    pipe = StableDiffusionControlNetPipeline(
        vae=p.vae,
        text_encoder=p.text_encoder,
        tokenizer=p.tokenizer,
        unet=p.unet,
        controlnet=p.controlnet,
        scheduler=DDIMScheduler.from_config(bench.chain.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure_peer(bench: Bench, pipe: Any, plan: Plan, batch: int) -> dict[str, Any]:
    """s/frame per character of one batched pipeline call over ``batch`` characters (same poses,
    prompt, steps, guidance and size as the engine's rows; it also encodes the prompts and
    prepares the pose images each call, as a diffusers user's loop does)."""
    from PIL import Image

    c = bench.config
    images = [Image.fromarray(m) for m in bench.pose_maps[2 : batch + 2]]

    def call(steps: int) -> Any:
        with common.quiet_tokenizer():
            return pipe(
                prompt=[common.PROMPTS[0]] * batch,
                negative_prompt=[c.negative_prompt] * batch,
                image=images,
                height=c.height,
                width=c.width,
                num_inference_steps=steps,
                guidance_scale=c.sampler.guidance,
                controlnet_conditioning_scale=c.sampler.controlnet_scale,
                generator=[torch.Generator().manual_seed(100 + k) for k in range(batch)],
                output_type="np",
            )

    dev = bench.device
    _, warmup_s = clocked(dev, lambda: call(1))
    row: dict[str, Any] = {}
    with peak_memory(dev, row):
        samples = [clocked(dev, lambda: call(plan.steps))[1] for _ in range(plan.repeats)]
    return {
        "batch": batch,
        "dtype": str(bench.chain.parts.dtype).removeprefix("torch."),
        "s_per_frame": round(min(samples) / batch, 4),
        "samples_s": [round(x, 4) for x in samples],
        "warmup_s": round(warmup_s, 3),
        **row,
    }


# -- LoRA, compile -------------------------------------------------------------------------------


@contextlib.contextmanager
def three_adapters(bench: Bench) -> Iterator[None]:
    """:data:`ADAPTERS` loaded on the UNet (the appearance stage's rank/alpha and targets, random
    non-zero B so every update really runs) for the block, removed after."""
    from engine.appearance.lora import UNET_TARGETS, add_lora, lora_config, remove_lora

    unet = bench.chain.parts.unet
    a = bench.config.appearance
    g = torch.Generator().manual_seed(1)
    for name in ADAPTERS:
        add_lora(unet, lora_config(a.rank, a.alpha, UNET_TARGETS), name)
        for n, p in unet.named_parameters():
            if f"lora_B.{name}." in n:
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    try:
        yield
    finally:
        for name in ADAPTERS:
            remove_lora(unet, name)


@contextlib.contextmanager
def compiled_step(bench: Bench, plan: Plan) -> Iterator[None]:
    """``model.backend: compile``'s step (torch.compile, dynamic shapes, ``plan.compile_backend``)
    as the chain's denoise step for the block, the previous step restored after."""
    from engine.accel import step_for, use_step
    from engine.accel.compile_step import CompileStep

    before = step_for(bench.chain)
    chain = bench.chain
    use_step(chain, CompileStep(chain.parts, chain.context, backend=plan.compile_backend))
    try:
        yield
    finally:
        use_step(chain, before)
