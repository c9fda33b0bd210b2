"""Denoise-step back-ends, per-row LoRA cost and CPU threads, measured on one machine in one run.

    python -m benchmarks.accel --preset tiny --rows 8 --backends eager,onnx,compile --threads
    python -m benchmarks.accel --preset tiny --no-backends --compile-static   # minutes on 2 cores
    python -m benchmarks.accel --preset tiny --no-backends --deep-cache 2,3,5

Prints a table and writes ``out/bench/accel-<preset>.json``. Step times are the median CPU time
(one thread) of ``--repeats`` interleaved calls after one warm-up (which also exports /
compiles); the first call's wall time is reported apart.
``--threads`` times one whole frame (``--steps`` DDIM steps, CFG) with 1 thread and with torch's
default, each with the machine idle and with a busy-loop process occupying one core.
``--deep-cache 2,3,5`` times DeepCache at those intervals against off, with what it changes in
the frames and in how much the pose steers them. ``--compile-static`` / ``--compile-dynamic``
time torch.compile (``dynamic=False``, one shape; ``dynamic=True``, shape-generic: what
``model.backend: compile`` builds) against eager. The eager
rows include the pre-runtime-LoRA path (peft's per-row ``adapter_names``) for comparison.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.accel import StepInputs, make_step
from engine.accel.graph import controlnet_unet
from engine.appearance.lora import UNET_TARGETS, add_lora, lora_config, per_row_adapters
from engine.batching import denoise_frame

ADAPTERS = ("char0", "char1", "char2")
MIXED = "3 adapters + base rows"


def _inputs(parts, rows: int, adapters: list[str | None]) -> StepInputs:
    g = torch.Generator().manual_seed(0)
    size = 64 if parts.name.startswith("tiny") else 128 if "small" in parts.name else 512
    d = parts.unet.config.cross_attention_dim
    refs = torch.arange(rows)[:, None].repeat(1, 2)
    refs[::4] = (refs[::4] + 2) % rows  # every 4th row (a cond row) attends to two later rows
    return StepInputs(
        sample=torch.randn(rows, 4, size // 8, size // 8, generator=g),
        timestep=torch.full((rows,), 500),
        text=torch.randn(rows, 77, d, generator=g),
        pose=torch.rand(rows, 3, size, size, generator=g),
        control_scale=torch.ones(rows, 1, 1, 1),
        ref_index=refs,
        include_self=True,
        adapters=adapters,
    )


def _time(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds per call of each of ``fns``: the median of ``repeats`` calls, taken in interleaved
    rounds (a, b, a, b, …) and timed in CPU time of this thread (every step here runs on one
    thread), so other processes competing for the cores do not inflate one side of a ratio."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for key, fn in fns.items():
                start = time.thread_time()
                fn()
                times[key].append(time.thread_time() - start)
    return {key: statistics.median(ts) for key, ts in times.items()}


def _peft_per_row(parts, chain) -> Callable[[StepInputs], torch.Tensor]:
    """The eager step as it was before runtime LoRA: peft's per-row ``adapter_names`` path."""

    def run(i: StepInputs) -> torch.Tensor:
        chain.context.ref_index, chain.context.include_self = i.ref_index, i.include_self
        try:
            with per_row_adapters(parts.unet, i.adapters):
                args = (i.sample, i.timestep, i.text, i.pose, i.control_scale)
                return controlnet_unet(parts.unet, parts.controlnet, *args)
        finally:
            chain.context.ref_index = None

    return run


def _load_adapters(unet: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for name in ADAPTERS:
        add_lora(unet, lora_config(4, 4, UNET_TARGETS), name)
        for n, p in unet.named_parameters():
            if f"lora_B.{name}." in n:
                p.data.normal_(0.0, 0.1, generator=g)


def bench_steps(preset: str, rows: int, backends: list[str], repeats: int) -> list[dict]:
    """ms per step of each back-end: a UNet without LoRA, one with 3 adapters loaded running a
    batch without adapters, and a mixed batch of 3 adapters + base rows, timed interleaved."""
    from engine.chain import FrameChain
    from engine.config import ModelConfig
    from engine.models.registry import build_components

    config = ModelConfig(preset=preset, device="cpu", threads=1)
    parts, bare = build_components(config), build_components(config)  # bare: never gets LoRA
    chain, bare_chain = FrameChain(parts), FrameChain(bare)
    plain = _inputs(parts, rows, [None] * rows)
    mixed = _inputs(parts, rows, [(*ADAPTERS, None)[i % 4] for i in range(rows)])
    cache = Path(tempfile.mkdtemp(prefix="accel-bench-"))
    steps = {b: make_step(b, parts, chain.context, cache_dir=cache) for b in backends}
    bare_steps = {b: make_step(b, bare, bare_chain.context, cache_dir=cache) for b in backends}
    _load_adapters(parts.unet)
    results = []
    for name, step in steps.items():
        first = {}
        for key, s, batch in (("bare", bare_steps[name], plain), ("mixed", step, mixed)):
            start = time.perf_counter()
            with torch.no_grad():
                s(batch)  # export / compile happen here
            first[key] = time.perf_counter() - start
        fns = {
            "bare": lambda s=bare_steps[name]: s(plain),
            "plain": lambda s=step: s(plain),
            "mixed": lambda s=step: s(mixed),
        }
        labels = [("bare", "no LoRA loaded"), ("plain", "LoRA loaded, no row uses it")]
        labels.append(("mixed", MIXED))
        if name == "eager":
            peft = _peft_per_row(parts, chain)
            fns["peft"] = lambda run=peft: run(mixed)
            labels.append(("peft", MIXED + " (peft per-row)"))
        ms = _time(fns, repeats)
        for key, label in labels:
            row = {"backend": name, "lora": label, "ms_per_step": ms[key] * 1e3}
            results.append({**row, "first_s": first.get(key, 0.0)})
    base = {r["backend"]: r["ms_per_step"] for r in results if r["lora"] == "no LoRA loaded"}
    loaded = {r["backend"]: r["ms_per_step"] for r in results if r["lora"].startswith("LoRA")}
    eager = base.get("eager")
    for r in results:
        r["vs_same_backend_no_lora"] = r["ms_per_step"] / base[r["backend"]]
        r["vs_same_backend_loaded_unused"] = r["ms_per_step"] / loaded[r["backend"]]
        r["vs_eager_no_lora"] = r["ms_per_step"] / eager if eager else None
    return results


def bench_compile(preset: str, rows: int, repeats: int, dynamic: bool = False) -> dict:
    """torch.compile (inductor, ``dynamic`` shapes or one static shape, no CUDA graphs) against
    eager on one ``kv`` batch without LoRA: compile wall time, ms per step (CPU time), max abs
    error; then what a second batch size costs (a recompile unless ``dynamic``)."""
    from engine.accel.compile_step import CompileStep
    from engine.chain import FrameChain
    from engine.config import ModelConfig
    from engine.models.registry import build_components

    parts = build_components(ModelConfig(preset=preset, device="cpu", threads=1))
    chain = FrameChain(parts)
    batch, other = (
        _inputs(parts, rows, [None] * rows),
        _inputs(parts, rows // 2, [None] * (rows // 2)),
    )
    eager, compiled = (
        make_step("eager", parts, chain.context),
        CompileStep(parts, chain.context, dynamic=dynamic),
    )
    start = time.perf_counter()
    with torch.no_grad():
        err = (compiled(batch) - eager(batch)).abs().max().item()
    compile_s = time.perf_counter() - start
    ms = _time({"eager": lambda: eager(batch), "compile": lambda: compiled(batch)}, repeats)
    start = time.perf_counter()
    with torch.no_grad():
        err2 = (compiled(other) - eager(other)).abs().max().item()
    return {
        "dynamic": dynamic,
        "rows": rows,
        "compile_s": compile_s,
        "eager_ms": ms["eager"] * 1e3,
        "compile_ms": ms["compile"] * 1e3,
        "speedup": ms["eager"] / ms["compile"],
        "max_abs_err": max(err, err2),
        "recompile_s_other_batch": time.perf_counter() - start,
    }


def bench_deep_cache(
    preset: str, characters: int, steps: int, intervals: list[int], repeats: int
) -> list[dict]:
    """DeepCache (``sampler.deep_cache``) at each of ``intervals`` (0 = off) on one batch of
    ``characters`` frames (CFG, ``steps`` DDIM steps, inter-frame ``none``): seconds per batch
    (CPU time of this thread, interleaved), the frames' mean |Δ| and PSNR against interval 0,
    and how much the pose still steers the image: the same frames drawn at other poses, and the
    cosine and norm ratio of (frame at pose A − frame at pose B) against interval 0's."""
    import numpy as np

    from engine.batching import BatchDenoiser, FrameJob, decode_frames
    from engine.chain import FrameChain, FrameSettings
    from engine.config import ModelConfig, load_config
    from engine.models.registry import build_components
    from engine.pose import render_pose_map, synthetic_dance

    parts = build_components(ModelConfig(preset=preset, device="cpu", threads=1))
    chain = FrameChain(parts)
    size = 64 if preset.startswith("tiny") else 128 if "small" in preset else 512
    keypoints = synthetic_dance(frames=2 * characters, fps=8, width=size, height=size).keypoints
    pose = [chain.image_tensor(render_pose_map(k, size, size)) for k in keypoints]
    text = chain.encode_prompt("a woman in a red dress dancing on a beach", "blurry")
    denoiser = BatchDenoiser(chain)

    def jobs(interval: int, other_pose: bool) -> list:
        overrides = [f"sampler.steps={steps}", "alignment.inter_frame=none"]
        config = load_config(
            None, preset=preset, overrides=[*overrides, f"sampler.deep_cache={interval}"]
        )
        settings = FrameSettings.from_config(config)
        shift = characters if other_pose else 0
        return [FrameJob(0, 100 + k, pose[k + shift], text, settings) for k in range(characters)]

    def images(interval: int, other_pose: bool) -> np.ndarray:
        latents = denoiser.denoise(jobs(interval, other_pose))
        frames = decode_frames(chain, latents, "none", len(latents))
        return np.stack([f for f in frames if f is not None]).astype(np.float64)

    work = {n: jobs(n, False) for n in intervals}
    seconds = _time({n: lambda j=work[n]: denoiser.denoise(j) for n in intervals}, repeats)
    with torch.no_grad():
        ref_a, ref_b = images(0, False), images(0, True)
        steer = ref_a - ref_b
        out = []
        for n in intervals:
            a, b = images(n, False), images(n, True)
            mse = float(((a - ref_a) ** 2).mean())
            d = a - b
            cosine = float((d * steer).sum() / (np.linalg.norm(d) * np.linalg.norm(steer)))
            out.append(
                {
                    "interval": n,
                    "s_per_batch": seconds[n],
                    "speedup": seconds[intervals[0]] / seconds[n],
                    "mean_abs_vs_off": float(np.abs(a - ref_a).mean()),
                    "psnr_vs_off_db": 10 * np.log10(255.0**2 / mse) if mse else float("inf"),
                    "pose_effect_cosine": cosine,
                    "pose_effect_norm_ratio": float(np.linalg.norm(d) / np.linalg.norm(steer)),
                }
            )
    return out


def _busy(stop) -> None:
    torch.set_num_threads(1)
    x = 0
    while not stop.is_set():
        x = (x * 7 + 1) % 1_000_003


def _frame_seconds(threads: int, steps: int, frames: int) -> float:
    from engine.chain import FrameChain, FrameSettings
    from engine.config import ModelConfig, load_config
    from engine.models.registry import build_components

    parts = build_components(ModelConfig(preset="tiny", device="cpu", threads=threads))
    chain = FrameChain(parts)
    config = load_config(None, preset="tiny", overrides=[f"sampler.steps={steps}"])
    settings = FrameSettings.from_config(config)
    text = chain.encode_prompt("a dancer", "")
    pose = torch.rand(1, 3, 64, 64)
    denoise_frame(chain, index=0, seed=0, pose=pose, text=text, settings=settings)  # warm-up
    start = time.perf_counter()
    for i in range(frames):
        denoise_frame(chain, index=i, seed=0, pose=pose, text=text, settings=settings)
    return (time.perf_counter() - start) / frames


def bench_threads(steps: int, frames: int) -> list[dict]:
    """s/frame (tiny, ``steps`` steps) with 1 thread vs torch's default, idle and one core busy."""
    default = os.cpu_count() or 1  # torch's default: every core
    out = []
    for load in (False, True):
        stop = mp.Event()
        busy = mp.Process(target=_busy, args=(stop,), daemon=True) if load else None
        if busy:
            busy.start()
        try:
            for threads in (1, default):
                s = _frame_seconds(threads, steps, frames)
                out.append({"threads": threads, "one_core_busy": load, "s_per_frame": s})
        finally:
            if busy:
                stop.set()
                busy.join()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--backends", default="eager,onnx")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile-static", action="store_true", help="also torch.compile static")
    p.add_argument(
        "--compile-dynamic", action="store_true", help="also torch.compile dynamic (the default)"
    )
    p.add_argument("--no-backends", action="store_true", help="skip the back-end table")
    p.add_argument("--threads", action="store_true", help="also measure CPU threads under load")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--deep-cache", default="", metavar="N,N", help="also DeepCache at these intervals (2,3,5)"
    )
    p.add_argument("--characters", type=int, default=4, help="frames per DeepCache batch")
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    args = p.parse_args()
    machine = (
        f"{platform.node()} {platform.machine()} {mp.cpu_count()} cores, torch {torch.__version__}"
    )
    report: dict = {"machine": machine, "preset": args.preset, "rows": args.rows}
    print(f"# {machine}; preset {args.preset}, {args.rows} rows per step, 1 thread")
    backends = [] if args.no_backends else args.backends.split(",")
    report["steps"] = (
        bench_steps(args.preset, args.rows, backends, args.repeats) if backends else []
    )
    print(
        f"{'backend':8} {'LoRA':30} {'ms/step':>8} {'vs no LoRA':>10} {'vs unused':>9} "
        f"{'vs eager':>8} {'1st s':>6}"
    )
    for r in report["steps"]:
        ve = f"{r['vs_eager_no_lora']:.2f}" if r["vs_eager_no_lora"] else "-"
        print(
            f"{r['backend']:8} {r['lora']:30} {r['ms_per_step']:8.1f} "
            f"{r['vs_same_backend_no_lora']:10.3f} {r['vs_same_backend_loaded_unused']:9.3f} "
            f"{ve:>8} {r['first_s']:6.1f}"
        )
    for dynamic, wanted in ((False, args.compile_static), (True, args.compile_dynamic)):
        if not wanted:
            continue
        key = "compile_dynamic" if dynamic else "compile_static"
        report[key] = c = bench_compile(args.preset, args.rows, args.repeats, dynamic)
        second = "same graph" if dynamic else "recompile"
        print(
            f"\n# torch.compile, dynamic={dynamic}, {c['rows']} rows: compile "
            f"{c['compile_s']:.0f} s, {c['compile_ms']:.1f} vs eager {c['eager_ms']:.1f} ms/step "
            f"({c['speedup']:.2f}x), max abs err {c['max_abs_err']:.1e}; {c['rows'] // 2} rows "
            f"({second}) {c['recompile_s_other_batch']:.0f} s"
        )
    if args.deep_cache:
        intervals = [0, *(int(n) for n in args.deep_cache.split(","))]
        report["deep_cache"] = rows = bench_deep_cache(
            args.preset, args.characters, args.steps, intervals, max(3, args.repeats // 3)
        )
        print(
            f"\n# DeepCache, {args.characters} frames x {args.steps} steps with CFG per batch "
            "(interval 0 = off)"
        )
        print(
            f"{'interval':>8} {'s/batch':>8} {'speedup':>7} {'|Δ| grey':>8} {'PSNR dB':>7} "
            f"{'pose cos':>8} {'pose norm':>9}"
        )
        for r in rows:
            print(
                f"{r['interval']:8d} {r['s_per_batch']:8.2f} {r['speedup']:7.2f} "
                f"{r['mean_abs_vs_off']:8.2f} {r['psnr_vs_off_db']:7.1f} "
                f"{r['pose_effect_cosine']:8.3f} {r['pose_effect_norm_ratio']:9.3f}"
            )
    if args.threads:
        report["threads"] = bench_threads(args.steps, frames=2)
        print(f"\n# tiny, one frame of {args.steps} steps with CFG")
        for r in report["threads"]:
            busy = "one core busy" if r["one_core_busy"] else "idle"
            print(f"threads={r['threads']:<3} {busy:14} {r['s_per_frame']:.2f} s/frame")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"accel-{args.preset}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
