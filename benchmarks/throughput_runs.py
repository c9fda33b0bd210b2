"""The variants of :mod:`benchmarks.throughput`: plain diffusers at batch 1 and batched across
characters, the engine core in-process and on Ray, the bare batched loop, the full method.

Each :class:`Variant` warms up when built (first-call costs, never timed); :meth:`Variant.once`
times one pass over the same characters. :mod:`benchmarks.throughput` interleaves the passes of
all variants and keeps each one's fastest (:func:`benchmarks.common.best`); each variant keeps
its first pass's frames, keyed (character id, frame index), for the like-for-like checks.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common
from benchmarks.common import Character, run_core, run_record, timed
from engine.config import RenderConfig, apply_override, build_config, load_config


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
        self.unet, self.rows = unet, list[int]()

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


class Variant(ABC):
    """One benchmarked variant, set up and warmed once; :meth:`once` times one pass over every
    character. The benchmark calls the variants' passes in interleaved rounds (a, a2, b, bare,
    c, a, a2, …) so a slow spell of this shared machine weighs on every variant alike."""

    info: dict[str, Any]
    """Set-up facts of the record (build and warm-up seconds, …)."""
    frames: dict[tuple[str, int], np.ndarray]
    """The first pass's frames, keyed (render id, frame index), for the like-for-like checks."""

    @abstractmethod
    def once(self, k: int) -> dict[str, Any]:
        """Timed pass ``k`` → its record (:func:`benchmarks.common.run_record`)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Free what the variant holds."""


class Plain(Variant):
    """(a) batch 1, or (a2) one pipeline call per frame index across the characters."""

    def __init__(self, pipe: Any, characters: Sequence[Character], batched: bool, build_s: float):
        self.pipe, self.characters = pipe, characters
        self.groups = [list(characters)] if batched else [[ch] for ch in characters]
        self.steps = characters[0].config.sampler.steps
        with common.quiet_tokenizer():
            _, warmup_s = timed(lambda: _plain_call(pipe, self.groups[0], 0, 1))
        batch = len(characters) if batched else 1
        self.info = {"build_s": round(build_s, 3), "warmup_s": round(warmup_s, 3), "batch": batch}
        self.frames = {}

    def once(self, k: int) -> dict[str, Any]:
        def loop() -> dict[tuple[str, int], np.ndarray]:
            out = {}
            for group in self.groups:
                for i in range(len(self.characters[0].keypoints)):
                    frames = _plain_call(self.pipe, group, i, self.steps)
                    for ch, frame in zip(group, frames, strict=True):
                        out[(ch.render_id, i)] = frame
            return dict(sorted(out.items()))

        with common.quiet_tokenizer():
            frames, seconds = timed(loop)
        if k == 0:
            self.frames = frames
        return run_record(seconds, len(frames))


def plain_pipeline(characters: Sequence[Character]) -> tuple[Any, float]:
    """The plain diffusers pipeline (a) and (a2) share → (pipeline, build seconds)."""
    return timed(lambda: _pipeline(characters[0].config))


# -- (b) the in-process core, and the bare batched loop ------------------------------------------


@dataclass
class EngineTrace:
    """What (b)'s first timed run did, for the bare replay and the frame checks."""

    chain: Any
    folder: Path
    batches: list[list[tuple[str, int]]]
    frames: dict[tuple[str, int], np.ndarray]


def _core_pass(
    core: Any, executor: Any, unet: Any, characters: Sequence[Character], k: int, timeout_s: float
) -> tuple[dict[str, Any], list[list[tuple[str, int]]]]:
    """Timed pass ``k`` of every character through ``core`` (fresh ids per pass) → (record,
    the batches the core ran: (render id, frame index) per row)."""
    specs = [(f"{ch.render_id}-r{k}", ch.config) for ch in characters]
    first = len(core.stats["batches"])
    counter = RowCounter(unet) if unet is not None else None
    with common.CoreProfile(executor) as profile, counter or contextlib.nullcontext():
        seconds, sizes = run_core(core, specs, timeout_s)
    frames = sum(len(ch.keypoints) for ch in characters)
    rows = {"unet_rows": counter.rows} if counter else {}
    busy = profile.record()
    outside = {"outside_sampler_s": round(seconds - busy["sampler_busy_s"], 3)}
    record = run_record(seconds, frames, batch_sizes=sizes, **busy, **outside, **rows)
    return record, [list(b) for b in core.stats["batches"][first:]]


def _first_pass_frames(
    folder: Path, characters: Sequence[Character]
) -> dict[tuple[str, int], np.ndarray]:
    """The frames a core persisted in pass 0 (render ids ``<character>-r0``)."""
    ids = [f"{ch.render_id}-r0" for ch in characters]
    return common.load_frames(folder, ids, len(characters[0].keypoints))


class Engine(Variant):
    """(b): the engine core with the in-process executor (models built once, warmed up); with
    ``option`` (:func:`option_overrides`), (b) with one back-end or sampling option on."""

    def __init__(
        self,
        characters: Sequence[Character],
        engine: RenderConfig,
        root: Path,
        timeout_s: float,
        option: str | None = None,
    ):
        from engine.core import EngineCore, InProcessExecutor, RenderStore

        name = "engine" if option is None else f"engine-{option.replace(':', '-')}"
        if option is not None:
            engine_set, spec_set = option_overrides(option)
            data = engine.model_dump(mode="json")
            for override in engine_set:
                apply_override(data, override)
            engine = build_config(data, f"option {option}")
            characters = [_with(ch, spec_set) for ch in characters]
        self.characters, self.timeout_s, self.folder = characters, timeout_s, root / name
        self.executor, build_s = timed(lambda: InProcessExecutor(engine))
        self.core = EngineCore(engine, RenderStore(self.folder), self.executor, resume=False)
        warm = [("warmup", common.warmup_spec(characters[0], root))]
        _, warmup_s = timed(lambda: run_core(self.core, warm, 600))
        self.info = {"build_s": round(build_s, 3), "warmup_s": round(warmup_s, 3)}
        self.frames = {}
        self.trace: EngineTrace | None = None

    def once(self, k: int) -> dict[str, Any]:
        unet = self.executor.chain.parts.unet
        args = (self.core, self.executor, unet, self.characters, k, self.timeout_s)
        record, batches = _core_pass(*args)
        if k == 0:
            self.frames = _first_pass_frames(self.folder, self.characters)
            self.trace = EngineTrace(self.executor.chain, self.folder, batches, self.frames)
        return record

    def close(self) -> None:
        self.core.close()


OPTIONS = ("onnx", "compile", "dpmpp_2m:STEPS", "deep_cache:N")
"""The options ``--options`` takes (each one more (b) column)."""


def option_overrides(option: str) -> tuple[list[str], list[str]]:
    """(engine overrides, spec overrides) of one of :data:`OPTIONS`; ValueError naming the
    choices otherwise."""
    name, _, value = option.partition(":")
    if name in ("onnx", "compile") and not value:
        backend = [f"model.backend={name}"]
        return backend, backend
    if name == "dpmpp_2m" and value.isdigit():
        return [], ["sampler.scheduler=dpmpp_2m", f"sampler.steps={value}"]
    if name == "deep_cache" and value.isdigit():
        return [], [f"sampler.deep_cache={value}"]
    raise ValueError(f"unknown option {option!r}: use one of {', '.join(OPTIONS)}")


def _with(character: Character, overrides: Sequence[str]) -> Character:
    spec = [*character.overrides, *overrides]
    config = load_config(None, preset=character.config.model.preset, overrides=spec)
    return replace(character, config=config, overrides=spec)


def sampler_padding(engine: RenderConfig, inter_frame: str) -> tuple[int, str]:
    """(capacity in rows, padding policy) of the Sampler's forward passes and VAE decodes, as
    ``SamplerState`` sets them from the engine config."""
    from engine.batching import rows_per_frame
    from engine.core.work import padding_policy

    return engine.cluster.max_batch * rows_per_frame(inter_frame), padding_policy(engine)


class Bare(Variant):
    """bare: (b)'s batches replayed with pre-built jobs (references from (b)'s persisted
    latents) through BatchDenoiser + the batched VAE decode only, padded as the Sampler pads
    (:func:`sampler_padding`)."""

    def __init__(self, trace: EngineTrace, characters: Sequence[Character], engine: RenderConfig):
        from engine.batching import BatchDenoiser
        from engine.core.outputs import load_latent
        from engine.session import CharacterChain
        from engine.storage import LocalStorage

        chain = self.chain = trace.chain
        sessions = {
            f"{ch.render_id}-r0": CharacterChain(
                chain, ch.config, ch.keypoints, prompt=ch.prompt, negative=ch.config.negative_prompt
            )
            for ch in characters
        }

        def latent(rid: str, index: int) -> torch.Tensor:
            return torch.from_numpy(load_latent(LocalStorage(trace.folder / rid), index))

        self.batches = [
            [
                sessions[rid].job(
                    i, latent(rid, i - 1) if i else None, latent(rid, 0) if i else None
                )
                for rid, i in batch
            ]
            for batch in trace.batches
        ]
        capacity, self.padding = sampler_padding(engine, characters[0].config.alignment.inter_frame)
        self.denoiser = BatchDenoiser(chain, pad_rows=capacity, padding=self.padding)  # type: ignore[arg-type]
        self.keys = [key for batch in trace.batches for key in batch]
        self.max_batch = engine.cluster.max_batch
        self.info, self.frames = {}, {}

    def once(self, k: int) -> dict[str, Any]:
        from engine.batching import decode_frames

        def loop() -> list[np.ndarray | None]:
            return [
                frame
                for jobs in self.batches
                for frame in decode_frames(
                    self.chain,
                    self.denoiser.denoise(jobs),
                    self.padding,  # type: ignore[arg-type]
                    self.max_batch,
                )
            ]

        with RowCounter(self.chain.parts.unet) as counter:
            decoded, seconds = timed(loop)
        if k == 0:
            self.frames = dict(sorted(zip(self.keys, decoded, strict=True)))
        sizes = [len(b) for b in self.batches]
        return run_record(seconds, len(decoded), batch_sizes=sizes, unet_rows=counter.rows)


# -- (c), (d) the core on Ray --------------------------------------------------------------------


def _sampler_threads(executor: Any) -> int:
    import ray

    actor = executor.samplers.actors[0]
    return int(ray.get(actor.__ray_call__.remote(lambda _: torch.get_num_threads()), timeout=60))


class RayCore(Variant):
    """(c) the core on a local Ray instance (started if none is; actors started and warmed up
    before any timing), and (d) :meth:`full` once."""

    def __init__(
        self, characters: Sequence[Character], engine: RenderConfig, root: Path, timeout_s: float
    ):
        import ray

        from actors.executor import RayExecutor
        from engine.core import EngineCore, RenderStore

        self.characters, self.timeout_s, self.root = characters, timeout_s, root
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        self.executor = RayExecutor(engine)
        self.core = EngineCore(engine, RenderStore(root / "ray"), self.executor, resume=False)
        start = time.perf_counter()
        self.executor.refiners.ensure()
        self.executor.samplers.ensure()
        actors = [*self.executor.refiners.actors.values(), *self.executor.samplers.actors.values()]
        ray.get([a.__ray_ready__.remote() for a in actors], timeout=600)
        self.info = {"actor_start_s": round(time.perf_counter() - start, 3)}
        self.info["sampler_threads"] = _sampler_threads(self.executor)
        warm = [("warmup", common.warmup_spec(characters[0], root))]
        self.info["warmup_s"] = round(timed(lambda: run_core(self.core, warm, 600))[1], 3)
        self.frames = {}

    def once(self, k: int) -> dict[str, Any]:
        args = (self.core, self.executor, None, self.characters, k, self.timeout_s)
        record, _ = _core_pass(*args)
        if k == 0:
            self.frames = _first_pass_frames(self.root / "ray", self.characters)
        return record

    def full(self, full: FullMethod) -> dict[str, Any]:
        """(d), once (a repeat would hit the adapter cache)."""
        return _ray_full(self.core, self.executor, self.characters, self.root, full, self.timeout_s)

    def close(self) -> None:
        import ray

        self.core.close()
        if self.started:
            ray.shutdown()


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
