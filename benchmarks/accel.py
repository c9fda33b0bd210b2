"""Denoise-step back-ends, per-row LoRA cost and CPU threads, measured on one machine in one run.

    python -m benchmarks.accel --preset tiny --rows 8 --backends eager,onnx,compile --threads
    python -m benchmarks.accel --preset tiny --no-backends --compile-static   # minutes on 2 cores

Prints a table and writes ``out/bench/accel-<preset>.json``. Step times are the median CPU time
(one thread) of ``--repeats`` interleaved calls after one warm-up (which also exports /
compiles); the first call's wall time is reported apart.
``--threads`` times one whole frame (``--steps`` DDIM steps, CFG) with 1 thread and with torch's
default, each with the machine idle and with a busy-loop process occupying one core.
``--compile-static`` / ``--compile-dynamic`` time torch.compile (``dynamic=False``, one shape;
``dynamic=True``, shape-generic: what ``model.backend: compile`` builds) against eager. The eager
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
