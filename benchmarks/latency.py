"""Latency benchmark: where one character's render time goes, stage by stage, on the engine core.

One character with the full method (appearance LoRA, background plate, the preset's inter-frame
alignment) through :class:`~engine.core.EngineCore` with the in-process executor, as
``avatar render`` runs it. Models are built and every stage warmed up (a 1-frame render with a
1-step LoRA and plate, which also builds the plate models) before the timed render. Stages:

- ``refine``: prompt refinement (template backend: offline, cached by input hash);
- ``references``: the K reference images of the character (``synthesize_references``);
- ``lora_training``: the appearance LoRA (``train_appearance_lora``);
- ``plate``: scene at pose 0, person mask (SAM or pose), inpainting → background plate;
- ``chain``: the F frames (batched denoise, decode, composite, each frame persisted), and its
  per-frame times from the core's progress events;
- ``encode``: video.mp4 and the contact sheet.

The references / training split is measured by wrapping the two engine functions for the run
(diagnostics only). Prints a table and writes ``out/bench/latency-<preset>.json``::

    python -m benchmarks.latency --preset tiny --frames 8
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import timed

STAGES: dict[str, str] = {
    "refine": "refine (prompt)",
    "references": "references (K images)",
    "lora_training": "LoRA training",
    "plate": "background plate",
    "chain": "frame chain (all frames)",
    "encode": "encode (video + contact sheet)",
}


@contextlib.contextmanager
def stage_clock() -> Iterator[dict[str, float]]:
    """Seconds spent in reference synthesis and LoRA training while entered (the module globals
    that ``engine.appearance.cache`` calls are wrapped, then restored)."""
    from engine.appearance import cache

    seconds = {"references": 0.0, "lora_training": 0.0}
    originals = {
        "references": cache.synthesize_references,
        "lora_training": cache.train_appearance_lora,
    }

    def wrap(name: str) -> Any:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start

        return timed_call

    cache.synthesize_references = wrap("references")
    cache.train_appearance_lora = wrap("lora_training")
    try:
        yield seconds
    finally:
        cache.synthesize_references = originals["references"]
        cache.train_appearance_lora = originals["lora_training"]


def method_overrides(args: argparse.Namespace) -> list[str]:
    """The full-method spec overrides of the timed render (None options keep the preset's)."""
    out = [
        "alignment.intra_frame=true",
        "alignment.background=true",
        f"model.threads={args.threads}",
    ]
    optional = {
        "sampler.steps": args.steps,
        "appearance.steps": args.lora_steps,
        "appearance.references": args.references,
        "background.inpaint_steps": args.inpaint_steps,
        "background.mask_source": args.mask_source,
        "alignment.inter_frame": args.inter_frame,
    }
    return out + [f"{k}={v}" for k, v in optional.items() if v is not None]


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Warm up, then render one character and split its time into :data:`STAGES`."""
    from engine.core import EngineCore, InProcessExecutor, RenderStore

    overrides = method_overrides(args)
    (character,) = common.make_characters(args.preset, 1, args.frames, root, overrides)
    engine = common.engine_config(args.preset, [f"model.threads={args.threads}"])
    frame_times: list[float] = []

    def on_event(event: dict[str, Any]) -> None:
        if event["render_id"] == "timed" and event["type"] == "frame":
            frame_times.append(time.perf_counter())

    executor, build_s = timed(lambda: InProcessExecutor(engine, overlap=False))
    core = EngineCore(engine, RenderStore(root / "renders"), executor, on_event=on_event)
    try:
        tiny = ["appearance.steps=1", "appearance.references=1", "background.inpaint_steps=1"]
        warm = common.warmup_spec(character, root, tiny)
        _, warmup_s = timed(lambda: common.run_core(core, [("warmup", warm)], 1800))
        with stage_clock() as split:
            wall, _ = common.run_core(core, [("timed", character.config)], args.timeout)
    finally:
        core.close()
    manifest = json.loads((root / "renders" / "timed" / "manifest.json").read_text())
    t = manifest["timings_s"]
    stages = {
        "refine": t.get("refine", 0.0),
        "references": split["references"],
        "lora_training": split["lora_training"],
        "plate": t.get("background", 0.0),
        # The manifest's chain time runs from the first frame to the end of encoding.
        "chain": t.get("chain", 0.0) - t.get("outputs", 0.0),
        "encode": t.get("outputs", 0.0),
    }
    gaps = [b - a for a, b in itertools.pairwise(frame_times)]
    return {
        "stages_s": {k: round(v, 4) for k, v in stages.items()},
        "appearance_other_s": round(
            t.get("appearance", 0.0) - split["references"] - split["lora_training"], 4
        ),
        "per_frame_s": round(stages["chain"] / args.frames, 4),
        "frame_gaps_s": [round(g, 4) for g in gaps],
        "manifest_timings_s": t,
        "wall_s": round(wall, 3),
        "other_s": round(wall - sum(stages.values()), 4),
        "build_s": round(build_s, 3),
        "warmup_s": round(warmup_s, 3),
        "settings": {
            "overrides": overrides,
            "frames": args.frames,
            "config": character.config.model_dump(mode="json"),
        },
        "peak_rss_mb": manifest.get("peak_rss_mb"),
    }


def markdown(result: dict[str, Any], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    c = result["settings"]["config"]
    wall, fmt = result["wall_s"], common.fmt
    lines = [
        f"### latency, {args.preset}: one character, {args.frames} frames, "
        f"{c['sampler']['steps']} steps, {c['width']}×{c['height']}, inter-frame "
        f"{c['alignment']['inter_frame']}, LoRA {c['appearance']['steps']} steps on "
        f"{c['appearance']['references']} references, plate mask "
        f"{c['background']['mask_source']}, {c['background']['inpaint_steps']} inpaint steps",
        "",
        "| stage | seconds | share of wall |",
        "|---|---:|---:|",
    ]
    for name, label in STAGES.items():
        s = result["stages_s"][name]
        lines.append(f"| {label} | {fmt(s)} | {100 * s / wall:.1f} % |")
    lines += [
        f"| per frame (chain / {args.frames}) | {fmt(result['per_frame_s'])} | |",
        f"| other (core, poses, adapter cache, manifest) | {fmt(result['other_s'])} | "
        f"{100 * result['other_s'] / wall:.1f} % |",
        f"| **wall, submit → done** | **{fmt(wall)}** | 100 % |",
        "",
        f"{common.machine_line(machine)}. torch threads {args.threads}; models built in "
        f"{result['build_s']:.1f} s, warm-up {result['warmup_s']:.1f} s (not in the table); "
        f"peak RSS {result['peak_rss_mb']} MB; load (1 min) {result['load_1min']}. "
        "Shared machine: other processes' load is in the timings.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.latency", description=__doc__.split("\n")[0]
    )
    p.add_argument("--preset", default="tiny")
    p.add_argument("--frames", type=int, default=8, help="frames of the character (default 8)")
    p.add_argument("--steps", type=int, default=None, help="sampler.steps (default: preset's)")
    p.add_argument("--lora-steps", type=int, default=None, help="appearance.steps")
    p.add_argument("--references", type=int, default=None, help="appearance.references")
    p.add_argument("--inpaint-steps", type=int, default=None, help="background.inpaint_steps")
    p.add_argument("--mask-source", choices=("sam", "pose"), default=None)
    p.add_argument("--inter-frame", default=None, help="alignment.inter_frame")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds")
    p.add_argument("--out", type=Path, default=None, help="default out/bench/latency-PRESET.json")
    args = p.parse_args(argv)
    out = args.out or common.OUT / f"latency-{args.preset}.json"
    machine = common.machine_info()
    root = out.parent / f"{out.stem}-work"
    shutil.rmtree(root, ignore_errors=True)
    with common.torch_threads(args.threads):
        load = common.load_avg()
        result = measure(args, root)
    result["load_1min"] = [load, common.load_avg()]
    table = markdown(result, args, machine)
    report = {"machine": machine, "preset": args.preset, **result}
    common.write_report(report, out, table + "\n")
    print("\n" + table + f"\n\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
