"""Quality benchmark: the paper's metrics for the full method and each alignment module switched off.

Renders a fixed suite (prompts x synthetic pose sequences, fixed seeds) four times — the full
method (intra-frame appearance LoRA + background plate + ``latent`` inter-frame alignment), and
without intra-frame, without background, without inter-frame (``inter_frame: none``) alignment —
scores every render with :func:`engine.metrics.report.score_render`, and prints one markdown
table in the paper's layout with the paper's published numbers as reference rows, plus the
temporal-consistency deltas of the ablations. Writes ``OUT/quality.json`` (machine, preset,
suite, settings, per-render metrics and timings) and ``OUT/quality.md``.

    python -m benchmarks.quality --preset tiny --out out/bench-quality          # ~1 min on 2 CPU cores
    python -m benchmarks.quality --preset sd15 --frames 16 --out out/bench-sd15 \\
        --set model.sam_checkpoint=weights/sam_vit_h_4b8939.pth                  # on a GPU
    python -m benchmarks.quality --preset micro --out out/bench-micro         # ~10 min on 2 CPU cores

``--preset micro`` measures the ablations with the micro world's own metrics instead (prompts,
variants and table in :mod:`benchmarks.quality_micro`).

One resident :class:`~engine.chain.FrameChain` serves all renders; appearance adapters are cached
under ``OUT/cache`` (trained once per prompt). On the random-weight presets absolute numbers mean
nothing; only the ablation deltas of the temporal metrics say whether the mechanisms work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS: dict[str, tuple[str, ...]] = {
    "micro": ("a woman in a red dress dancing on a beach",),
    "small": (
        "a woman in a red dress dancing on a beach",
        "a man in a black suit dancing in a city street at night",
    ),
    "full": (
        "a woman in a red dress dancing on a beach",
        "a man in a black suit dancing in a city street at night",
        "an astronaut in a white spacesuit dancing on the moon",
        "a girl in a yellow raincoat dancing in a park in autumn",
    ),
}
POSES: dict[str, tuple[str, ...]] = {
    "micro": ("dance_8fps",),
    "small": ("dance_8fps", "mirrored_12fps"),
    "full": ("dance_8fps", "mirrored_12fps", "dance_4fps"),
}
FULL_METHOD = ("alignment.intra_frame=true", "alignment.background=true")
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "full": ("Ours (full)", ("alignment.inter_frame=latent",)),
    "no_intra": ("w/o intra-frame", ("alignment.intra_frame=false",)),
    "no_background": ("w/o background", ("alignment.background=false",)),
    "no_inter": ("w/o inter-frame", ("alignment.inter_frame=none",)),
}
COLUMNS: tuple[tuple[str, str], ...] = (
    ("frame_niqe", "Frame NIQE ↓"),
    ("body_niqe", "Body NIQE ↓"),
    ("background_niqe", "Background NIQE ↓"),
    ("frame_brisque", "Frame BRISQUE ↓"),
    ("pose_mse", "Pose MSE ↓"),
    ("text_alignment", "Text alignment ↑"),
    ("frame_clip", "Frame CLIP ↑"),
    ("body_clip", "Body CLIP ↑"),
    ("background_clip", "Background CLIP ↑"),
    ("frame_l1", "Frame L1 ↓"),
)
# The paper's published numbers (../shared/DESIGN.md, "Metrics"); absent cells were not reported
# there. "best baseline" is the better of ControlVideo / Follow-Your-Pose per CLIP column.
PAPER_ROWS: dict[str, dict[str, float]] = {
    "Paper: Dancing Avatar": {
        "frame_niqe": 2.99,
        "background_niqe": 2.44,
        "pose_mse": 1.48,
        "text_alignment": 31.92,
        "frame_clip": 80.63,
        "body_clip": 77.43,
        "background_clip": 81.82,
        "frame_l1": 270.31,
    },
    "Paper: ControlVideo": {"frame_niqe": 3.32, "pose_mse": 30.57, "text_alignment": 27.14},
    "Paper: Follow-Your-Pose": {"frame_niqe": 5.27, "pose_mse": 10.76, "text_alignment": 27.63},
    "Paper: best baseline (CLIP)": {
        "frame_clip": 74.64,
        "body_clip": 73.29,
        "background_clip": 76.46,
    },
    "Paper: w/o intra-frame": {"body_clip": 75.66, "frame_niqe": 3.15},
    "Paper: w/o background": {"background_clip": 79.92, "background_niqe": 2.67},
    "Paper: w/o inter-frame": {"frame_clip": 78.17, "frame_l1": 287.56},
}
DELTAS: tuple[tuple[str, str, str], ...] = (
    ("frame_l1", "no_inter", "Frame L1 ↓: full vs w/o inter-frame"),
    ("frame_clip", "no_inter", "Frame CLIP ↑: full vs w/o inter-frame"),
    ("background_l1", "no_background", "Background L1 ↓: full vs w/o background (plate)"),
    ("background_clip", "no_background", "Background CLIP ↑: full vs w/o background (plate)"),
    ("body_clip", "no_intra", "Body CLIP ↑: full vs w/o intra-frame"),
)
NOTES = (
    "Scales: CLIP = cosine x 100; Frame L1 = mean |a - b| per pixel and channel on 0..255 (the "
    "paper's Frame L1 scale is not stated; 270 cannot be a per-pixel mean); Pose MSE = squared "
    "normalised joint error x 1000 (the paper's scale is unknown).",
    "Random-weight presets (tiny/small): the CLIP model is random too; NIQE is computed on frames "
    "upscaled to >= 384 px. Only the ablation deltas are meaningful.",
)


@dataclass(frozen=True)
class Case:
    """One prompt x pose sequence of the suite, with its fixed seed."""

    name: str
    prompt: str
    poses: Path
    seed: int


def mirrored(keypoints: np.ndarray, width: int, shift: float) -> np.ndarray:
    """Left-right mirrored keypoints (F, 18, 3), shifted right by ``shift`` x width; joints
    swap sides (COCO-18 left <-> right) so the skeleton stays anatomically labelled."""
    from engine.pose.skeleton import JOINT_NAMES

    names = list(JOINT_NAMES)

    def partner(name: str) -> str:
        if name.startswith("left_"):
            return "right_" + name[5:]
        return "left_" + name[6:] if name.startswith("right_") else name

    order = [names.index(partner(n)) for n in names]
    out = keypoints[:, order].copy()
    present = out[..., 2] > 0
    out[..., 0] = np.where(present, width - out[..., 0] + shift * width, 0.0)
    return out


def pose_sequence(name: str, frames: int, width: int, height: int) -> Any:
    """The suite's pose sequences: synthetic dances at 8 or 4 fps, or mirrored + shifted at 12."""
    from engine.pose import PoseSequence, synthetic_dance

    if name == "mirrored_12fps":
        seq = synthetic_dance(frames=frames, fps=12, width=width, height=height)
        kp = mirrored(seq.keypoints, width, shift=0.08)
        return PoseSequence(kp, fps=12.0, width=width, height=height, source=name)
    fps = {"dance_8fps": 8.0, "dance_4fps": 4.0}[name]
    return synthetic_dance(frames=frames, fps=fps, width=width, height=height)


def build_cases(suite: str, frames: int, width: int, height: int, out: Path) -> list[Case]:
    """The suite's cases; their poses.json files are written under ``out/poses``."""
    from engine.pose import save_poses_json

    (out / "poses").mkdir(parents=True, exist_ok=True)
    cases = []
    for p, prompt in enumerate(PROMPTS[suite]):
        for pose_name in POSES[suite]:
            path = out / "poses" / f"{pose_name}.json"
            save_poses_json(pose_sequence(pose_name, frames, width, height), path)
            seed = 1000 + len(cases)
            cases.append(Case(f"p{p}-{pose_name}", prompt, path, seed))
    return cases


def render_config(
    args: argparse.Namespace, case: Case, variant: str, method: Sequence[str] | None = None
) -> Any:
    """The render config of one case and variant (the preset plus the benchmark's overrides);
    ``method``: the variant's settings (default: the full method with ``VARIANTS[variant]``)."""
    from engine.config import load_config

    overrides = [
        f"poses={case.poses}",
        f"prompt={case.prompt}",
        f"seed={case.seed}",
        f"cache_dir={args.out / 'cache'}",
        "output.contact_sheet=false",
        *((*FULL_METHOD, *VARIANTS[variant][1]) if method is None else method),
        *args.set,
    ]
    if args.steps is not None:
        overrides.append(f"sampler.steps={args.steps}")
    if args.appearance_steps is not None:
        overrides.append(f"appearance.steps={args.appearance_steps}")
    return load_config(None, preset=args.preset, overrides=overrides)


def machine_info() -> dict[str, Any]:
    """Where the benchmark ran: platform, CPU count, torch and the accelerator."""
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def render_scored(
    args: argparse.Namespace,
    case: Case,
    variant: str,
    chain: Any,
    config: Any,
    score: Callable[[Path], dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Render ``config`` into a fresh ``OUT/renders/<case>/<variant>`` and ``score`` it: the
    run's record (case, variant, folder, timings) and the scores."""
    from engine.render import render

    out = args.out / "renders" / case.name / variant
    shutil.rmtree(out, ignore_errors=True)  # a fresh render, never a resume
    t0 = time.perf_counter()
    result = render(config, out, chain=chain, progress=False)
    t1 = time.perf_counter()
    scored = score(out)
    t2 = time.perf_counter()
    record = {
        "case": case.name,
        "prompt": case.prompt,
        "poses": case.poses.name,
        "seed": case.seed,
        "variant": variant,
        "dir": str(out),
        "render_s": round(t1 - t0, 3),
        "score_s": round(t2 - t1, 3),
        "render_timings_s": {k: round(v, 3) for k, v in result.timings.items()},
    }
    return record, scored


def _render_and_score(
    args: argparse.Namespace, case: Case, variant: str, chain: Any, clip: Any, estimator: Any
) -> dict[str, Any]:
    """Render one case x variant into ``OUT/renders/<case>/<variant>`` and score it."""
    from engine.metrics.report import score_render

    record, metrics = render_scored(
        args, case, variant, chain, render_config(args, case, variant),
        lambda out: score_render(out, clip=clip, estimator=estimator, plot=args.plots),
    )  # fmt: skip
    print(
        f"  {case.name:24s} {variant:14s} render {record['render_s']:6.1f} s  "
        f"score {record['score_s']:5.1f} s"
    )
    return {
        **record,
        "metrics": metrics["aggregate"],
        "null_reasons": metrics["null_reasons"],
        "settings": metrics["settings"],
    }


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    """Render and score every case x variant; returns the benchmark record (see module doc)."""
    from engine.chain import FrameChain
    from engine.metrics.pose_mse import make_estimator
    from engine.metrics.report import clip_for
    from engine.models.registry import build_components

    start = time.perf_counter()
    probe = render_config(args, Case("probe", "probe", args.out / "poses", 0), "full")
    cases = build_cases(args.suite, args.frames, probe.width, probe.height, args.out)
    chain = FrameChain(build_components(probe.model), probe.model.attention)
    clip, estimator = clip_for(probe, args.clip), make_estimator(args.estimator)
    setup_s = time.perf_counter() - start
    runs = [
        _render_and_score(args, case, variant, chain, clip, estimator)
        for case in cases
        for variant in args.variants
    ]
    return {
        "machine": machine_info(),
        "preset": args.preset,
        "suite": {
            "name": args.suite,
            "prompts": list(PROMPTS[args.suite]),
            "poses": list(POSES[args.suite]),
            "variants": {v: VARIANTS[v][0] for v in args.variants},
            "seeds": [c.seed for c in cases],
        },
        "settings": {
            "frames": args.frames,
            "steps": probe.sampler.steps,
            "appearance_steps": probe.appearance.steps,
            "size": [probe.width, probe.height],
            "clip": runs[0]["settings"]["clip"] if runs else None,
            "estimator": getattr(estimator, "name", "?"),
        },
        "runs": runs,
        "table": mean_by_variant(runs),
        "timings_s": {
            "setup": round(setup_s, 2),
            "render": round(sum(r["render_s"] for r in runs), 2),
            "score": round(sum(r["score_s"] for r in runs), 2),
            "total": round(time.perf_counter() - start, 2),
        },
    }


def mean_by_variant(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean over the suite's cases of every aggregate metric, per variant (nulls skipped)."""
    table: dict[str, dict[str, float | None]] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rows = [r["metrics"] for r in runs if r["variant"] == variant]
        table[variant] = {}
        for key in rows[0]:
            values = [row[key] for row in rows if row.get(key) is not None]
            table[variant][key] = float(np.mean(values)) if values else None
    return table


def _cell(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_table(table: dict[str, dict[str, float | None]], *, paper: bool = True) -> str:
    """The paper-layout markdown table: our variants, then (optionally) the paper's rows."""
    header = "| Method | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [header, "|---|" + "---:|" * len(COLUMNS)]
    for variant, values in table.items():
        name = VARIANTS[variant][0] if variant in VARIANTS else variant
        lines.append(f"| {name} | " + " | ".join(_cell(values.get(k)) for k, _ in COLUMNS) + " |")
    if paper:
        for name, values in PAPER_ROWS.items():
            cells = " | ".join(_cell(values.get(k)) for k, _ in COLUMNS)
            lines.append(f"| *{name}* | {cells} |")
    return "\n".join(lines)


def format_deltas(table: dict[str, dict[str, float | None]]) -> str:
    """Markdown table of the ablation deltas (full vs the variant without the module)."""
    lines = ["| Mechanism check | full | without | delta |", "|---|---:|---:|---:|"]
    for key, variant, label in DELTAS:
        full, without = table.get("full", {}).get(key), table.get(variant, {}).get(key)
        delta = None if full is None or without is None else full - without
        cells = " | ".join(_cell(v, 3) for v in (full, without, delta))
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def report(record: dict[str, Any]) -> str:
    """The whole markdown report: settings line, main table, deltas, notes, timings."""
    s, t = record["settings"], record["timings_s"]
    head = (
        f"Quality benchmark: preset {record['preset']}, suite {record['suite']['name']} "
        f"({len(record['suite']['prompts'])} prompts x {len(record['suite']['poses'])} pose "
        f"sequences), {s['frames']} frames, {s['steps']} steps, appearance {s['appearance_steps']} "
        f"steps, {s['size'][0]}x{s['size'][1]}, CLIP {s['clip']}, pose estimator {s['estimator']}"
    )
    timing = (
        f"Time: {t['total']:.0f} s total (setup {t['setup']:.0f} s, renders {t['render']:.0f} s, "
        f"scoring {t['score']:.0f} s) on {record['machine']['cuda'] or 'CPU'} "
        f"({record['machine']['cpus']} cores)"
    )
    notes = "\n".join(f"- {n}" for n in NOTES)
    table, deltas = format_table(record["table"]), format_deltas(record["table"])
    return f"{head}\n\n{table}\n\n{deltas}\n\n{notes}\n\n{timing}\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    from benchmarks.quality_micro import MICRO_VARIANTS, WORLD_PROMPTS

    parser.add_argument("--preset", default="tiny", choices=("tiny", "small", "sd15", "micro"))
    parser.add_argument("--suite", default="small", choices=tuple(PROMPTS))
    parser.add_argument("--frames", type=int, default=8, help="Frames per render (default 8).")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Denoising steps (default: tiny/small 10, sd15 preset).",
    )
    parser.add_argument(
        "--appearance-steps",
        type=int,
        default=None,
        help="Appearance LoRA steps (default: tiny/small 10, sd15 the preset's).",
    )
    parser.add_argument("--clip", default=None, help="CLIP model (default: the preset's).")
    parser.add_argument(
        "--estimator",
        default=None,
        choices=("auto", "none", "mediapipe"),
        help="Pose MSE estimator (default: auto; none for micro).",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=tuple(dict.fromkeys([*VARIANTS, *MICRO_VARIANTS])),
        help=f"Default: {', '.join(VARIANTS)}; micro: {', '.join(MICRO_VARIANTS)}.",
    )
    parser.add_argument(
        "--prompts",
        type=int,
        default=len(WORLD_PROMPTS),
        help=f"micro: how many of the {len(WORLD_PROMPTS)} world prompts (default all).",
    )
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="No metrics.png.")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Config override for every render, e.g. model.sam_checkpoint=weights/sam_vit_h.pth "
        "or background.mask_source=pose (sd15 needs one of them); repeatable.",
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench-quality"))
    args = parser.parse_args(argv)
    if args.frames < 2:
        parser.error(f"--frames {args.frames}: the temporal metrics need at least 2 frames")
    micro = args.preset == "micro"
    names = MICRO_VARIANTS if micro else VARIANTS
    args.variants = args.variants or list(names)
    unknown = [v for v in args.variants if v not in names]
    if unknown:
        parser.error(
            f"--variants {unknown} do not apply to --preset {args.preset}: use {list(names)}"
        )
    if not 1 <= args.prompts <= len(WORLD_PROMPTS):
        parser.error(f"--prompts {args.prompts}: give 1..{len(WORLD_PROMPTS)}")
    args.estimator = args.estimator or ("none" if micro else "auto")
    random_weights = args.preset in ("tiny", "small")
    if args.steps is None and (random_weights or micro):
        args.steps = 10
    if args.appearance_steps is None and random_weights:
        args.appearance_steps = 10
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the markdown report, write quality.json / quality.md."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # SAM-fallback warnings would flood the table
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the refined prompts exceed CLIP's 77 tokens
    args.out.mkdir(parents=True, exist_ok=True)
    from benchmarks import quality_micro
    from engine.config import ConfigError
    from engine.metrics.inputs import MetricsError
    from engine.models.registry import WeightsNotFoundError

    micro = args.preset == "micro"
    try:
        record = quality_micro.run_micro(args) if micro else run_suite(args)
    except (ConfigError, WeightsNotFoundError, MetricsError) as exc:
        raise SystemExit(f"error: {exc}") from None
    text = quality_micro.micro_report(record) if micro else report(record)
    record["markdown"] = text
    (args.out / "quality.json").write_text(json.dumps(record, indent=2))
    (args.out / "quality.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'quality.json'} and {args.out / 'quality.md'}")
    return record


if __name__ == "__main__":
    main()
