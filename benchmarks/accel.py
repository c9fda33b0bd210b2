"""Denoise-step back-ends, per-row LoRA cost and CPU threads, measured on one machine in one run.

    python -m benchmarks.accel --preset tiny --rows 8 --backends eager,onnx,compile --threads

Prints a table and writes ``out/bench/accel-<preset>.json``. Step times are the mean of the
faster half of ``--repeats`` timed calls after one warm-up (which also exports / compiles).
``--threads`` times one whole frame (``--steps`` DDIM steps, CFG) with 1 thread and with torch's
default, each with the machine idle and with a busy-loop process occupying one core.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from engine.accel import StepInputs, make_step
from engine.appearance.lora import UNET_TARGETS, add_lora, lora_config

ADAPTERS = ("char0", "char1", "char2")


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


def _time(fn, repeats: int) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    times.sort()
    half = times[: max(1, repeats // 2)]
    return sum(half) / len(half)


def _load_adapters(unet: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for name in ADAPTERS:
        add_lora(unet, lora_config(4, 4, UNET_TARGETS), name)
        for n, p in unet.named_parameters():
            if f"lora_B.{name}." in n:
                p.data.normal_(0.0, 0.1, generator=g)


def bench_steps(preset: str, rows: int, backends: list[str], repeats: int) -> list[dict]:
    """ms per step of each back-end, without LoRA and with a mixed batch of 3 adapters + base."""
    from engine.chain import FrameChain
    from engine.config import ModelConfig
    from engine.models.registry import build_components

    parts = build_components(ModelConfig(preset=preset, device="cpu", threads=1))
    chain = FrameChain(parts)
    plain = _inputs(parts, rows, [None] * rows)
    mixed = _inputs(parts, rows, [(*ADAPTERS, None)[i % 4] for i in range(rows)])
    cache = Path(tempfile.mkdtemp(prefix="accel-bench-"))
    steps = {b: make_step(b, parts, chain.context, cache_dir=cache) for b in backends}
    results = []
    for lora in ("no LoRA loaded", "LoRA loaded, no row uses it", "3 adapters + base rows"):
        if lora.startswith("LoRA loaded"):
            _load_adapters(parts.unet)
        batch = mixed if lora.startswith("3") else plain
        for name, step in steps.items():
            start = time.perf_counter()
            with torch.no_grad():
                step(batch)  # export / compile happen here
            first = time.perf_counter() - start
            ms = _time(lambda s=step, b=batch: s(b), repeats) * 1e3
            results.append({"backend": name, "lora": lora, "ms_per_step": ms, "first_s": first})
    base = {r["backend"]: r["ms_per_step"] for r in results if r["lora"] == "no LoRA loaded"}
    eager = base.get("eager")
    for r in results:
        r["vs_same_backend_no_lora"] = r["ms_per_step"] / base[r["backend"]]
        r["vs_eager_no_lora"] = r["ms_per_step"] / eager if eager else None
    return results


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
    chain.denoise(index=0, seed=0, pose=pose, text=text, settings=settings)  # warm-up
    start = time.perf_counter()
    for i in range(frames):
        chain.denoise(index=i, seed=0, pose=pose, text=text, settings=settings)
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
    p.add_argument("--threads", action="store_true", help="also measure CPU threads under load")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    args = p.parse_args()
    machine = (
        f"{platform.node()} {platform.machine()} {mp.cpu_count()} cores, torch {torch.__version__}"
    )
    report: dict = {"machine": machine, "preset": args.preset, "rows": args.rows}
    print(f"# {machine}; preset {args.preset}, {args.rows} rows per step, 1 thread")
    report["steps"] = bench_steps(args.preset, args.rows, args.backends.split(","), args.repeats)
    print(
        f"{'backend':8} {'LoRA':30} {'ms/step':>8} {'vs no LoRA':>10} {'vs eager':>8} {'1st s':>6}"
    )
    for r in report["steps"]:
        ve = f"{r['vs_eager_no_lora']:.2f}" if r["vs_eager_no_lora"] else "-"
        print(
            f"{r['backend']:8} {r['lora']:30} {r['ms_per_step']:8.1f} "
            f"{r['vs_same_backend_no_lora']:10.3f} {ve:>8} {r['first_s']:6.1f}"
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
