"""Seconds per denoise step of SDXL + its OpenPose ControlNet (one frame: 2 CFG rows).

    python -m benchmarks.sdxl_step --out DIR --sizes 1024,512 --repeats 5      # GPU, sdxl-random
    python -m benchmarks.sdxl_step --out DIR --preset sdxl-tiny --sizes 64,128  # CPU code path
    python -m benchmarks.sdxl_step --out DIR --dtype bfloat16 --device cpu --sizes 256,512,1024 --repeats 1

``sdxl-random`` builds SDXL's real architectures with random weights (UNet 2.57 G parameters,
ControlNet 1.25 G, text encoders 0.82 G): ≈19 GB in float32, ≈9.5 GB in float16 / bfloat16
(each module is cast as it is built: a CPU run in bfloat16 peaks at ≈13 GiB RSS, measured), so
on a CPU run it with ``--dtype bfloat16 --device cpu`` (float16 is refused on CPUs);
``sdxl-tiny`` (SDXL's structure at toy widths) checks the code path in seconds. A step is the engine's own
eager step (ControlNet + UNet with SDXL's pooled embedding and time_ids, as the chain runs it),
timed after one warm-up call: the median and min of ``--repeats`` calls (CUDA synchronised).
Writes ``DIR/sdxl_step-<preset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from engine.accel import EagerStep, StepInputs
from engine.chain import FrameChain
from engine.config import load_config
from engine.models.registry import build_components


def step_inputs(chain: FrameChain, size: int, rows: int) -> StepInputs:
    """``rows`` rows (pairs of uncond/cond) of one ``size``² frame, seeded."""
    parts = chain.parts
    g = torch.Generator().manual_seed(0)
    f = parts.vae_scale
    text = chain.encode_prompt("a woman in a red dress dancing", "blurry").repeat(rows // 2, 1, 1)
    pose = torch.rand(rows, 3, size, size, generator=g)
    return StepInputs(
        sample=torch.randn(rows, 4, size // f, size // f, generator=g).to(
            parts.device, parts.dtype
        ),
        timestep=torch.full((rows,), 500, device=parts.device),
        text=text,
        pose=pose.to(parts.device, parts.dtype),
        control_scale=torch.ones(rows, 1, 1, 1, device=parts.device, dtype=parts.dtype),
        ref_index=None,
        include_self=True,
        adapters=[None] * rows,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_step(chain: FrameChain, size: int, rows: int, repeats: int) -> dict[str, float]:
    """Warm-up + ``repeats`` timed calls of the eager step at ``size``²."""
    step = EagerStep(chain.parts, chain.context)
    inputs = step_inputs(chain, size, rows)
    device = chain.parts.device
    start = time.perf_counter()
    step(inputs)
    _sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(inputs)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {
        "size": size,
        "rows": rows,
        "first_s": round(first, 4),
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="sdxl-random", choices=("sdxl-random", "sdxl-tiny"))
    p.add_argument("--sizes", default="1024,512", help="frame sizes (pixels, square)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", type=int, default=2, help="batch rows (2 = one frame with CFG)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on a CPU")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    dtype = args.dtype or ("float16" if cuda else "float32")
    sets = [f"model.device={args.device}", f"model.dtype={dtype}"]
    config = load_config(None, preset=args.preset, overrides=sets)
    start = time.perf_counter()
    chain = FrameChain(build_components(config.model))
    build_s = time.perf_counter() - start
    device = chain.parts.device
    rows = [time_step(chain, int(s), args.rows, args.repeats) for s in args.sizes.split(",")]
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "build_s": round(build_s, 2),
        "peak_gib": round(peak, 2),
        "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "steps": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"sdxl_step-{args.preset}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# SDXL step: {args.preset}, {dtype} on {result['device']} ({result['threads']} threads)",
        "",
        "| size | rows | s/step (median) | min | first call |",
        "|---|---|---|---|---|",
        *(
            f"| {r['size']}² | {r['rows']} | {r['median_s']} | {r['min_s']} | {r['first_s']} |"
            for r in rows
        ),
        "",
        f"build {result['build_s']} s; peak {result['peak_gib']} GiB ({result['peak_kind']})",
    ]
    (args.out / f"sdxl_step-{args.preset}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
