"""The in-process core run of :mod:`benchmarks.gpu`: renders through
:class:`~engine.core.EngineCore` with the :class:`~engine.core.InProcessExecutor` on the benchmark's
resident chain, the Sampler's busy share and the GPU utilisation NVML saw meanwhile."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common
from benchmarks.gpu_cases import Bench, Plan, clocked


class GpuSampler:
    """Samples the GPU's utilisation (NVML, every 50 ms) on a thread while entered."""

    def __init__(self, device: torch.device):
        self.device, self.samples = device, list[int]()
        self.reason: str | None = None
        self._stop = threading.Event()

    def __enter__(self) -> GpuSampler:
        if self.device.type != "cuda":
            self.reason = "not a CUDA device"
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
        except Exception as e:  # NVML missing or refused: say so in the record
            self.reason = f"NVML unavailable: {e!r}"
            return self

        def run() -> None:
            while not self._stop.wait(0.05):
                self.samples.append(int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join(timeout=5)

    def record(self) -> dict[str, Any]:
        if self.reason or not self.samples:
            return {"nvml_gpu_util_pct": None, "nvml": self.reason or "no samples"}
        return {"nvml_gpu_util_pct": round(float(np.mean(self.samples)), 1)}


@contextlib.contextmanager
def without_video(into: dict[str, Any]) -> Iterator[None]:
    """Skip the core's video encoding (renders still write frames, latents, contact sheet and
    manifest) when PyAV is not installed (it stays off the device's wheels: ≈36 MB); records
    which in ``into["video"]``."""
    try:
        import av  # noqa: F401

        into["video"] = "encoded (PyAV present)"
        yield
        return
    except ImportError:
        pass
    from engine.core import live

    into["video"] = "skipped: PyAV is not installed here (frames were written, no video.mp4)"
    encode = live.encode_video
    live.encode_video = lambda out, poses, config: "video.mp4"  # the key it would have written
    try:
        yield
    finally:
        live.encode_video = encode


def measure_core(bench: Bench, plan: Plan, root: Path) -> dict[str, Any]:
    """``plan.core_characters`` × ``plan.core_frames`` renders through the engine core with the
    in-process executor on ``bench``'s chain (preset settings: its inter-frame mode, batch
    ``cluster.max_batch = plan.goal_batch``): wall s/frame, the Sampler's busy share of the wall
    time and the GPU utilisation NVML saw."""
    from engine.core import EngineCore, InProcessExecutor, RenderStore

    c = bench.config
    overrides = [
        f"model.dtype={c.model.dtype}",
        f"model.device={plan.device}",
        f"sampler.steps={plan.steps}",
        f"cluster.max_batch={plan.goal_batch}",
    ]
    characters = common.make_characters(
        plan.preset, plan.core_characters, plan.core_frames, root, overrides
    )
    engine = common.engine_config(plan.preset, overrides)
    executor = InProcessExecutor(engine, bench.chain, overlap=False)
    core = EngineCore(engine, RenderStore(root / "renders"), executor, resume=False)
    record: dict[str, Any] = {"inter_frame": c.alignment.inter_frame}
    try:
        with without_video(record):
            warm = [("warmup", common.warmup_spec(characters[0], root))]
            _, warmup_s = clocked(bench.device, lambda: common.run_core(core, warm, 600))
            record["warmup_s"] = round(warmup_s, 3)
            specs = [(ch.render_id, ch.config) for ch in characters]
            with common.CoreProfile(executor) as profile, GpuSampler(bench.device) as gpu:
                seconds, sizes = common.run_core(core, specs, 900)
    finally:
        core.close()
    frames = plan.core_characters * plan.core_frames
    busy = profile.record()
    return {
        **common.run_record(seconds, frames, batch_sizes=sizes, **busy),
        "sampler_busy_share": round(busy["sampler_busy_s"] / seconds, 4),
        **gpu.record(),
        **record,
    }
