"""Memory per GPU of the full method: three actors with a model copy each vs one shared set.

Before (``cluster.shared_models=false``): on one GPU the Sampler, the AppearanceTrainer and the
BackgroundWorker each hold the UNet + ControlNet + VAE + text encoder; the background worker adds
the inpainting UNet and SAM. After (``true``): one DeviceWorker holds them once
(engine/resident.py).

1. ``weights``: bytes of every resident module of ``sd15-random`` built on the meta device (no
   memory, exact parameter counts) in float32 and float16 (SAM is always float32), summed per
   GPU for both layouts.
2. ``rss``: real peak RSS of the full method (LoRA + SAM plate + 2-frame chain) on a small
   preset, each process fresh: the trainer, the background worker and the Sampler as three
   processes (what three actors hold, the Python/torch runtime included), against one process
   running all three stages on :class:`~engine.resident.ResidentModels`.

Writes ``out/bench/shared-memory.json`` (+ ``.md``)::

    python -m benchmarks.shared_memory --rss-preset small
    python -m benchmarks.shared_memory --skip-weights --rss-preset sd15-random \
        --set model.device=cpu --set model.dtype=float32 --set width=64 --set height=64 \
        --out out/bench/shared-memory-sd15.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common

BASE = ("unet", "controlnet", "vae", "text_encoder")
FULL = [
    "prompt=a woman in a red dress dancing on a beach",
    "alignment.intra_frame=true",
    "alignment.background=true",
    "background.mask_source=sam",
    "appearance.references=2",
    "appearance.steps=2",
    "background.inpaint_steps=1",
    "sampler.steps=2",
]
"""The full method with SAM (every model resident), at the least compute."""
ROLES = ("trainer", "background", "sampler", "device")


# -- 1. weights on the meta device ----------------------------------------------------------------


def weights(preset: str, dtype: str) -> dict[str, Any]:
    """GB of each resident module of ``preset`` in ``dtype``, and the per-GPU totals of both
    layouts (built on the meta device: nothing allocated)."""
    import torch

    from engine.config import ModelConfig
    from engine.models.inpaint import build_inpaint_unet
    from engine.models.registry import build_components
    from engine.models.sam import build_sam
    from engine.resident import module_bytes

    config = ModelConfig(preset=preset, device="meta", dtype=dtype)  # type: ignore[arg-type]
    with torch.device("meta"), common.quiet_tokenizer():
        parts = build_components(config)
        gb = {name: module_bytes(getattr(parts, name)) / 1e9 for name in BASE}
        gb["inpaint_unet"] = module_bytes(build_inpaint_unet(config, parts)) / 1e9
        gb["sam"] = module_bytes(build_sam(config)) / 1e9
    base = sum(gb[name] for name in BASE)
    plates = gb["inpaint_unet"] + gb["sam"]
    return {
        "dtype": dtype,
        "modules_gb": {k: round(v, 3) for k, v in gb.items()},
        "before_gb": round(3 * base + plates, 2),  # Sampler + trainer + background worker
        "after_gb": round(base + plates, 2),  # one DeviceWorker
    }


# -- 2. peak RSS of real processes ----------------------------------------------------------------


def child(role: str, preset: str, work: Path, extra: list[str]) -> dict[str, Any]:
    """Run ``role``'s share of one full-method render in this process → its peak RSS. The
    three-actor roles hand the adapter and plate on through pickles in ``work``."""
    from engine.config import load_config
    from engine.core.work import (
        FrameWork,
        SamplerState,
        SessionSpec,
        appearance_stage,
        background_stage,
        build_chain,
        peak_rss_mb,
        refine_stage,
    )
    from engine.pose import synthetic_dance
    from engine.resident import ResidentModels

    config = load_config(
        None, preset=preset, overrides=[*FULL, *extra, f"cache_dir={work / role / 'cache'}"]
    )
    keypoints = synthetic_dance(frames=2, fps=8, width=config.width, height=config.height).keypoints
    refined = refine_stage(config)
    start = time.perf_counter()
    resident = ResidentModels(config.model, 1, "none") if role == "device" else None
    chain = resident.chain if resident is not None else build_chain(config.model)
    built = peak_rss_mb()
    if role in ("trainer", "device"):
        adapter = appearance_stage(chain, config, refined) if resident is None else (
            resident.adapter(config, refined))  # fmt: skip
        (work / "adapter.pkl").write_bytes(pickle.dumps(adapter))
    adapter = pickle.loads((work / "adapter.pkl").read_bytes())
    if role in ("background", "device"):
        plate = (background_stage(chain, {}, config, refined, keypoints[0], adapter)
                 if resident is None else resident.plate(config, refined, keypoints[0], adapter))  # fmt: skip
        (work / "plate.pkl").write_bytes(pickle.dumps(plate.plate))
    if role in ("sampler", "device"):
        sampler = resident.sampler if resident is not None else SamplerState(chain, 1, "none")
        spec = SessionSpec(config.model_dump(mode="json"), keypoints, refined["full"],
                           config.negative_prompt, pickle.loads((work / "plate.pkl").read_bytes()),
                           adapter)  # fmt: skip
        [first] = sampler.denoise([FrameWork("r", 0, None, None)], lambda _: spec)
        [second] = sampler.denoise([FrameWork("r", 1, first.latent, first.latent)], lambda _: spec)
        assert second.error is None, second.error
    return {"role": role, "rss_after_build_mb": built, "peak_rss_mb": peak_rss_mb(),
            "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def run_child(
    role: str, preset: str, work: Path, extra: list[str], timeout: float
) -> dict[str, Any]:
    """:func:`child` in a fresh Python process (its own peak RSS)."""
    cmd = [sys.executable, "-m", "benchmarks.shared_memory", "--child", role,
           "--rss-preset", preset, "--work", str(work), *(f"--set={s}" for s in extra)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=repo)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{role} child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def rss(preset: str, work: Path, extra: list[str], timeout: float) -> dict[str, Any]:
    """Peak RSS of the three actors' processes (summed: one GPU holds them all) vs one."""
    work.mkdir(parents=True, exist_ok=True)
    runs = {role: run_child(role, preset, work, extra, timeout) for role in ROLES}
    before = sum(runs[r]["peak_rss_mb"] for r in ROLES[:3])
    return {"preset": preset, "set": extra, "runs": runs, "before_mb": round(before, 1),
            "after_mb": runs["device"]["peak_rss_mb"]}  # fmt: skip


# -- report ---------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = ["### shared models: memory per GPU"]
    if report["weights"]:
        lines += ["", f"weights of {report['weights_preset']} (GB):", "",
                  "| dtype | UNet | ControlNet | VAE | text | inpaint UNet | SAM | three actors | "
                  "one DeviceWorker |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for w in report["weights"]:
        m = w["modules_gb"]
        lines.append(
            f"| {w['dtype']} | {m['unet']} | {m['controlnet']} | {m['vae']} | "
            f"{m['text_encoder']} | {m['inpaint_unet']} | {m['sam']} | {w['before_gb']} GB | "
            f"{w['after_gb']} GB |"
        )
    if report.get("rss"):
        r = report["rss"]
        lines += ["", f"peak RSS, full method on {r['preset']} {' '.join(r['set'])} (one process per actor):", "",
                  "| process | after build (MB) | peak (MB) | s |", "|---|---|---|---|"]  # fmt: skip
        for role, run in r["runs"].items():
            lines.append(f"| {role} | {run['rss_after_build_mb']} | {run['peak_rss_mb']} | "
                         f"{run['seconds']} |")  # fmt: skip
        lines.append(f"\nthree actors {r['before_mb']} MB → one DeviceWorker {r['after_mb']} MB")
    lines.append("\n" + common.machine_line(report["machine"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-preset", default="sd15-random")
    parser.add_argument("--rss-preset", default="small", help="'' skips the RSS runs")
    parser.add_argument("--work", type=Path, default=Path("out/bench/shared-memory-work"))
    parser.add_argument("--out", type=Path, default=Path("out/bench/shared-memory.json"))
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for the RSS runs")
    parser.add_argument("--skip-weights", action="store_true")
    parser.add_argument("--child", choices=ROLES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.child, args.rss_preset, args.work, args.set)
        print("RESULT " + json.dumps(result), flush=True)
        return result
    report: dict[str, Any] = {
        "weights_preset": args.weights_preset,
        "weights": []
        if args.skip_weights
        else [weights(args.weights_preset, d) for d in ("float32", "float16")],
        "rss": rss(args.rss_preset, args.work, args.set, args.timeout) if args.rss_preset else None,
        "machine": common.machine_info(),
        "load_avg": common.load_avg(),
    }
    common.write_report(report, args.out, markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
