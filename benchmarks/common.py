"""Shared helpers of the benchmarks (throughput, latency, memory): the machine, inputs, timing,
CPU threads, driving an engine core, and JSON / markdown output under ``out/bench/``.

Every benchmark runs torch with one intra-op thread per process by default (``model.threads=1``
in this process and in every Ray actor): on a shared 2-core machine two OpenMP threads per
process oversubscribe the cores, which makes runs several times slower and erratic.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
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

OUT = Path("out/bench")
"""Default folder of the benchmarks' JSON and markdown."""

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


# -- inputs --------------------------------------------------------------------------------------


@dataclass
class Character:
    """One benchmark character: its id, render spec, poses at the render size and frame prompt."""

    render_id: str
    config: RenderConfig
    keypoints: np.ndarray
    """(F, 18, 3) float32 poses at the render size (as the core resamples them)."""
    prompt: str
    """The frame prompt: the spec prompt refined by the template backend, as the core does."""
    overrides: list[str] = field(default_factory=list)
    """The ``key=value`` overrides that made ``config`` (reused for variants of the spec)."""


def write_poses(path: Path, frames: int, fps: float, width: int, height: int) -> Path:
    """A synthetic dance of ``frames`` frames as poses.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_poses_json(synthetic_dance(frames=frames, fps=fps, width=width, height=height), path)
    return path


def make_characters(
    preset: str,
    count: int,
    frames: int,
    root: Path,
    overrides: Sequence[str] = (),
) -> list[Character]:
    """``count`` characters with distinct prompts, seeds and dances (``root/poses/cNN.json``),
    their refine and adapter caches under ``root/cache``; ``overrides`` apply to every spec."""
    from engine.core.live import prepare_poses
    from engine.method import refine_prompt

    base = load_config(None, preset=preset)
    characters = []
    for k in range(count):
        fps = FPS[k % len(FPS)]
        poses = write_poses(root / "poses" / f"c{k:02d}.json", frames, fps, base.width, base.height)
        prompt = PROMPTS[k % len(PROMPTS)]
        if k >= len(PROMPTS):
            prompt += f" take {k // len(PROMPTS) + 1}"  # a distinct character (and adapter)
        spec = [
            f"prompt={prompt}",
            f"poses={poses}",
            f"seed={100 + k}",
            f"cache_dir={root / 'cache'}",
            *overrides,
        ]
        config = load_config(None, preset=preset, overrides=spec)
        refined = refine_prompt(config).frame_prompt
        characters.append(
            Character(f"c{k:02d}", config, prepare_poses(config).keypoints, refined, spec)
        )
    return characters


def engine_config(preset: str, overrides: Sequence[str] = ()) -> RenderConfig:
    """The engine settings (``model``, ``cluster``) of a core for ``preset``."""
    return load_config(None, preset=preset, overrides=list(overrides))


# -- timing and threads --------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), wall seconds)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_record(seconds: float, frames: int, **extra: Any) -> dict[str, Any]:
    """A timed run: seconds, frames, frames/s and s/frame, plus ``extra`` fields."""
    return {
        "seconds": round(seconds, 3),
        "frames": frames,
        "frames_per_s": round(frames / seconds, 4) if seconds > 0 else None,
        "s_per_frame": round(seconds / frames, 4) if frames else None,
        **extra,
    }


def best(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs of one variant, with every run's seconds in ``samples_s``."""
    fastest = dict(min(records, key=lambda r: r["seconds"]))
    fastest["samples_s"] = [r["seconds"] for r in records]
    return fastest


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (0 leaves them), then restore."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_avg() -> float:
    """The 1-minute load average (other processes on a shared machine), or -1 if unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


@contextlib.contextmanager
def quiet_tokenizer() -> Iterator[None]:
    """Silence diffusers' per-call "prompt truncated to 77 tokens" warnings (the refined prompts
    are long; the engine truncates the same way, silently)."""
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


# -- driving an engine core ----------------------------------------------------------------------


class CoreProfile:
    """What a core's executor did while this is entered: batches finished and the seconds they
    took (in-process: the denoise + decode; Ray: submit → collected, transfers included).

    Wraps the executor instance's ``poll`` (diagnostics only; the class is untouched).
    """

    def __init__(self, executor: Any):
        self.executor = executor
        self.batch_s: list[float] = []

    def __enter__(self) -> CoreProfile:
        from engine.core.executor import BatchDone

        poll = type(self.executor).poll.__get__(self.executor)

        def counted(timeout: float) -> list[Any]:
            outcomes = poll(timeout)
            self.batch_s += [o.seconds for o in outcomes if isinstance(o, BatchDone)]
            return outcomes

        self.executor.poll = counted
        return self

    def __exit__(self, *exc: object) -> None:
        vars(self.executor).pop("poll", None)

    def record(self) -> dict[str, Any]:
        return {"batches": len(self.batch_s), "sampler_busy_s": round(sum(self.batch_s), 3)}


def run_core(
    core: Any, specs: Sequence[tuple[str, RenderConfig]], timeout_s: float
) -> tuple[float, list[int]]:
    """Submit ``specs`` (render id, spec) to ``core`` and step it until idle →
    (wall seconds from the first submit, the sizes of the batches it ran meanwhile).

    Raises:
        RuntimeError: naming each render that did not end ``done`` and its error.
    """
    first = len(core.stats["batch_sizes"])
    start = time.perf_counter()
    for render_id, spec in specs:
        core.submit(spec, id=render_id)
    core.run_until_idle(timeout_s=timeout_s)
    seconds = time.perf_counter() - start
    failed = {rid: (r.state, r.error) for rid, _ in specs if (r := core.get(rid)).state != "done"}
    if failed:
        raise RuntimeError(f"renders did not finish: {failed}")
    return seconds, list(core.stats["batch_sizes"][first:])


def warmup_spec(character: Character, root: Path, extra: Sequence[str] = ()) -> RenderConfig:
    """A 1-frame, 1-step render of a distinct character (first-call costs, never timed)."""
    c = character.config
    poses = write_poses(root / "poses" / "warmup.json", 1, 8.0, c.width, c.height)
    overrides = [
        *character.overrides,
        "prompt=a warm-up dancer in a plain room",
        f"poses={poses}",
        "sampler.steps=1",
        *extra,
    ]
    return load_config(None, preset=c.model.preset, overrides=overrides)


def load_frames(folder: Path, ids: Sequence[str], frames: int) -> dict[tuple[str, int], np.ndarray]:
    """The persisted frames ``folder/<id>/frames/NNNNNN.png`` of renders ``ids``."""
    from engine.video import load_png

    return {
        (rid, i): load_png(folder / rid / "frames" / f"{i:06d}.png")
        for rid in ids
        for i in range(frames)
    }


def frame_diffs(
    reference: dict[tuple[str, int], np.ndarray], other: dict[tuple[str, int], np.ndarray]
) -> dict[str, float]:
    """Mean and max |Δ| in grey levels between two renders of the same frames (keys of
    ``reference``; ``other`` may key them by another render id with the same frame order)."""
    deltas = [
        np.abs(a.astype(np.int16) - b.astype(np.int16))
        for a, b in zip(reference.values(), other.values(), strict=True)
    ]
    return {
        "mean_abs": round(float(np.mean([d.mean() for d in deltas])), 4),
        "max_abs": int(max(int(d.max()) for d in deltas)),
    }


# -- machine and report --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, torch threads, versions and the git commit (``+dirty`` if edited)."""
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
    with contextlib.suppress(ImportError):
        import ray

        info["ray"] = ray.__version__
    root = Path(__file__).resolve().parent.parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(root)]
        run = lambda *a: subprocess.run(  # noqa: E731
            [*git, *a], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        if commit:
            info["commit"] = commit + ("+dirty" if run("status", "--porcelain") else "")
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line naming the machine, for the printed tables."""
    return (
        f"machine: {info['processor']}, {info['cpu_count']} cores, {info['platform']}; "
        f"torch {info['torch']}, diffusers {info['diffusers']}"
        + (f", ray {info['ray']}" if "ray" in info else "")
        + (f"; commit {info['commit']}" if "commit" in info else "")
    )


def write_report(report: dict[str, Any], out: Path, markdown: str) -> None:
    """``out`` (JSON, atomic) and its tables next to it (``.md``)."""
    from engine.files import atomic_json, atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_json(out, report)
    atomic_write(out.with_suffix(".md"), markdown)


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def run_lengths(sizes: Sequence[int]) -> str:
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
