"""Memory benchmark: peak RSS against render length, and Sampler memory per active character.

1. ``frames``: one character rendered with N frames (default 16 and 256) through the engine core
   with the in-process executor (as ``avatar render``), each N in a fresh process, since peak
   RSS only grows within a process. A render holds only frames 0 and t-1 in memory and streams
   the video, so peak RSS must not grow with N: the target is peak(256) / peak(16) ≤ 1.1.
2. ``characters``: K characters (default 1 and 4) rendered together with the full method
   (appearance LoRA + background plate, cheap settings), each K in a fresh process. While they
   render, the executor's ``memory()`` reports the bytes its Sampler holds per open render
   (prompt embeddings, plate and its latent, cached pose maps and masks); the LoRA weights each
   character adds to the UNet are counted beside them. The per-character cost is also read from
   peak RSS: (peak(K) - peak(1)) / (K - 1).

Memory does not depend on the number of denoising steps, so the renders use few (``--steps``).
Prints tables and writes ``out/bench/memory-<preset>.json``::

    python -m benchmarks.memory --preset tiny --frames 16 256 --characters 1 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import common

FULL_CHEAP = [
    "alignment.intra_frame=true",
    "alignment.background=true",
    "appearance.steps=2",
    "appearance.references=1",
    "background.mask_source=pose",
    "background.inpaint_steps=2",
]
"""The full method at the least cost: every per-character artefact exists, made cheaply."""


def adapter_bytes(unet: Any) -> dict[str, int]:
    """Bytes of each LoRA adapter's weights loaded on ``unet`` (peft ``lora_A/lora_B.<name>``)."""
    out: dict[str, int] = {}
    for name, param in unet.named_parameters():
        parts = name.split(".")
        for kind in ("lora_A", "lora_B"):
            if kind in parts:
                adapter = parts[parts.index(kind) + 1]
                out[adapter] = out.get(adapter, 0) + param.numel() * param.element_size()
    return out


# -- one measurement (child process) -------------------------------------------------------------


def child(kind: str, count: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Render ``count`` frames of one character (``frames``) or ``count`` characters with the
    full method (``characters``) in this process → peak RSS and the Sampler's bytes."""
    from engine.core import EngineCore, InProcessExecutor, RenderStore
    from engine.core.work import peak_rss_mb

    spec = [f"sampler.steps={args.steps}", f"model.threads={args.threads}"]
    if kind == "frames":
        characters = common.make_characters(args.preset, 1, count, root, spec)
    else:
        characters = common.make_characters(
            args.preset, count, args.character_frames, root, [*spec, *FULL_CHEAP]
        )
    engine = common.engine_config(
        args.preset,
        [
            f"model.threads={args.threads}",
            f"cluster.max_batch={max(1, len(characters))}",
            f"cluster.max_preparing={len(characters)}",
        ],
    )
    executor = InProcessExecutor(engine, overlap=False)
    unet = executor.chain.parts.unet
    built_mb = peak_rss_mb()
    held: dict[str, Any] = {"open": 0}

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] != "frame":
            return
        sessions = executor.memory()["sessions_bytes"]
        if len(sessions) >= held["open"]:
            held.update(open=len(sessions), sessions=dict(sessions), adapters=adapter_bytes(unet))

    core = EngineCore(engine, RenderStore(root / "renders"), executor, on_event=on_event)
    try:
        specs = [(ch.render_id, ch.config) for ch in characters]
        seconds, _ = common.run_core(core, specs, args.timeout)
    finally:
        core.close()
    return {
        "kind": kind,
        "count": count,
        "frames": sum(len(ch.keypoints) for ch in characters),
        "seconds": round(seconds, 3),
        "rss_after_build_mb": built_mb,
        "peak_rss_mb": peak_rss_mb(),
        "max_open_sessions": held["open"],
        "sessions_bytes": held.get("sessions", {}),
        "adapter_bytes": held.get("adapters", {}),
    }


def run_child(kind: str, count: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """:func:`child` in a fresh Python process (its own peak RSS)."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.memory",
        "--child",
        kind,
        str(count),
        "--preset",
        args.preset,
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--character-frames",
        str(args.character_frames),
        "--work",
        str(root / f"{kind}-{count}"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads))}
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=repo
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"memory child {kind}={count} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1].removeprefix("RESULT "))


# -- report --------------------------------------------------------------------------------------


def summarize(frames: list[dict[str, Any]], chars: list[dict[str, Any]]) -> dict[str, Any]:
    """The ratio of peak RSS between the longest and shortest render, and the memory each
    additional active character costs (Sampler bytes, LoRA bytes, peak-RSS slope)."""
    out: dict[str, Any] = {}
    if len(frames) >= 2:
        short, long = frames[0], frames[-1]
        out["peak_ratio"] = round(long["peak_rss_mb"] / short["peak_rss_mb"], 4)
        out["peak_ratio_frames"] = [short["count"], long["count"]]
        out["peak_ratio_met"] = out["peak_ratio"] <= 1.1
    if chars:
        last = chars[-1]
        sessions = list(last["sessions_bytes"].values())
        adapters = list(last["adapter_bytes"].values())
        out["sampler_bytes_per_character"] = round(sum(sessions) / max(1, len(sessions)))
        out["lora_bytes_per_character"] = round(sum(adapters) / max(1, len(adapters)))
    if len(chars) >= 2:
        a, b = chars[0], chars[-1]
        slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["count"] - a["count"])
        out["peak_rss_mb_per_character"] = round(slope, 2)
    return out


def markdown(report: dict[str, Any]) -> str:
    s, fmt = report["summary"], common.fmt
    lines = [
        f"### memory, {report['preset']} ({report['steps']} steps)",
        "",
        "| render | frames | seconds | RSS after model build (MB) | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["frames"]:
        lines.append(
            f"| 1 character, {r['count']} frames | {r['frames']} | {r['seconds']:.1f} | "
            f"{r['rss_after_build_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    for r in report["characters"]:
        per = sum(r["sessions_bytes"].values()) / max(1, len(r["sessions_bytes"]))
        lora = sum(r["adapter_bytes"].values()) / max(1, len(r["adapter_bytes"]))
        lines.append(
            f"| {r['count']} characters, full method | {r['frames']} | "
            f"{r['seconds']:.1f} | {r['rss_after_build_mb']:.0f} | "
            f"{r['peak_rss_mb']:.0f} (open {r['max_open_sessions']}: Sampler "
            f"{per / 1e6:.3f} MB + LoRA {lora / 1e6:.3f} MB each) |"
        )
    lines.append("")
    if "peak_ratio" in s:
        a, b = s["peak_ratio_frames"]
        verdict = "PASS" if s["peak_ratio_met"] else "FAIL"
        lines.append(
            f"peak RSS {b} / {a} frames: {fmt(s['peak_ratio'])} (target ≤ 1.1: {verdict})."
        )
    if "sampler_bytes_per_character" in s:
        slope = s.get("peak_rss_mb_per_character")
        lines.append(
            f"Per additional active character: Sampler {s['sampler_bytes_per_character'] / 1e6:.3f}"
            f" MB (executor memory()) + LoRA {s['lora_bytes_per_character'] / 1e6:.3f} MB; "
            f"peak-RSS slope {fmt(slope, 1)} MB (includes LoRA training transients)."
        )
    lines.append(f"{common.machine_line(report['machine'])}; one process per row.")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.memory", description=__doc__.split("\n")[0]
    )
    p.add_argument("--preset", default="tiny")
    p.add_argument(
        "--frames",
        type=int,
        nargs="*",
        default=[16, 256],
        help="render lengths of one character (default 16 256)",
    )
    p.add_argument(
        "--characters", type=int, nargs="*", default=[1, 4], help="active characters (default 1 4)"
    )
    p.add_argument("--character-frames", type=int, default=4, help="frames per character")
    p.add_argument("--steps", type=int, default=2, help="sampler.steps (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--timeout", type=float, default=3600.0, help="per process, seconds")
    p.add_argument("--out", type=Path, default=None, help="default out/bench/memory-PRESET.json")
    p.add_argument("--child", nargs=2, metavar=("KIND", "COUNT"), help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        with common.torch_threads(args.threads):
            result = child(args.child[0], int(args.child[1]), args, args.work)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    out = args.out or common.OUT / f"memory-{args.preset}.json"
    root = out.parent / f"{out.stem}-work"
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    frames = [run_child("frames", n, args, root) for n in sorted(args.frames)]
    chars = [run_child("characters", k, args, root) for k in sorted(args.characters)]
    report = {
        "machine": common.machine_info(),
        "preset": args.preset,
        "steps": args.steps,
        "threads": args.threads,
        "frames": frames,
        "characters": chars,
        "summary": summarize(frames, chars),
        "wall_s": round(time.perf_counter() - start, 2),
    }
    table = markdown(report)
    common.write_report(report, out, table + "\n")
    print("\n" + table + f"\n\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
