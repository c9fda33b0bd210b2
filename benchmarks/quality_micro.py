"""Quality benchmark on the ``micro`` preset: the paper's ablations measured in the micro world.

The micro preset draws a figure whose ground truth is known (:mod:`engine.micro.world`), so each
alignment module can be judged by a metric that means something there
(:mod:`engine.metrics.micro_report`): pose following (figure IoU with the pose body mask), prompt
following (garment colour and scene right), appearance drift (body colour-histogram L1 and torso texture
change between adjacent frames) and background change outside the person masks; plus the paper's
Frame L1 (mean |frame t - frame t-1|) for frame-to-frame change.

Held fixed: prompts from the world's grammar (several colours and scenes), one seed per prompt,
the same synthetic dance for every render. Variants: the full method (intra-frame LoRA + plate
with ``background.mask_source=pose`` + ``latent`` inter-frame), the full method without each
module, and the full method with ``kv`` or ``kv+latent`` inter-frame alignment. One line per
module says whether it moved its metric the way the paper reports (intra-frame → appearance
drift down, background → background change down, inter-frame → frame-to-frame change down), with
the number of prompts where it did.

    python -m benchmarks.quality --preset micro --out out/bench-micro     # ~10 min on 2 CPU cores

Writes ``OUT/quality.json`` (machine, preset, suite, settings, per-render metrics, checks) and
``OUT/quality.md``, like the paper-metric benchmark (:mod:`benchmarks.quality`).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks.quality import (
    Case,
    machine_info,
    mean_by_variant,
    pose_sequence,
    render_config,
    render_scored,
)

WORLD_PROMPTS = (
    "a woman in a red dress dancing on a beach",
    "a man in a blue shirt dancing in a forest",
    "a girl in a yellow jacket dancing on a stage",
)
"""Held-fixed prompts from :mod:`engine.micro.world`'s grammar: three colours, three scenes."""
WORLD_POSES = "dance_8fps"
PLATE = ("alignment.background=true", "background.mask_source=pose")
MICRO_VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "full": (
        "Ours (full: intra + plate + latent)",
        ("alignment.intra_frame=true", *PLATE, "alignment.inter_frame=latent"),
    ),
    "no_intra": (
        "w/o intra-frame",
        ("alignment.intra_frame=false", *PLATE, "alignment.inter_frame=latent"),
    ),
    "no_background": (
        "w/o background",
        (
            "alignment.intra_frame=true",
            "alignment.background=false",
            "alignment.inter_frame=latent",
        ),
    ),
    "no_inter": (
        "w/o inter-frame",
        ("alignment.intra_frame=true", *PLATE, "alignment.inter_frame=none"),
    ),
    "inter_kv": (
        "full, inter-frame kv",
        ("alignment.intra_frame=true", *PLATE, "alignment.inter_frame=kv"),
    ),
    "inter_kv_latent": (
        "full, inter-frame kv+latent",
        ("alignment.intra_frame=true", *PLATE, "alignment.inter_frame=kv+latent"),
    ),
}
MICRO_COLUMNS: tuple[tuple[str, str], ...] = (
    ("figure_iou", "Figure IoU ↑"),
    ("colour_accuracy", "Colour right ↑"),
    ("scene_accuracy", "Scene right ↑"),
    ("body_hist_l1", "Body hist L1 ↓"),
    ("torso_texture_change", "Torso texture Δ ↓"),
    ("background_change", "Background Δ ↓"),
    ("frame_l1", "Frame L1 ↓"),
)
CHECKS: tuple[tuple[str, str, str, str], ...] = (
    ("intra-frame LoRA", "full", "no_intra", "body_hist_l1"),
    ("intra-frame LoRA", "full", "no_intra", "torso_texture_change"),
    ("background plate", "full", "no_background", "background_change"),
    ("inter-frame latent", "full", "no_inter", "frame_l1"),
    ("inter-frame latent", "full", "no_inter", "body_hist_l1"),
    ("inter-frame kv", "inter_kv", "no_inter", "frame_l1"),
    ("inter-frame kv", "inter_kv", "no_inter", "body_hist_l1"),
    ("inter-frame kv+latent", "inter_kv_latent", "no_inter", "frame_l1"),
    ("inter-frame kv+latent", "inter_kv_latent", "no_inter", "body_hist_l1"),
)
"""(module, variant with it, variant without it, metric that the paper says goes down)."""
SMALL = 0.05
"""A mean change of at most this fraction of the value without the module counts as none."""
MICRO_NOTES = (
    "Figure IoU: the shipped segmenter's figure mask vs the pose body mask (0..1). Colour right: "
    "share of frames whose torso colour classifies as the prompt's colour word. Scene right: "
    "share of frames whose background (outside the dilated pose mask) classifies as the prompt's "
    "scene (100 % on 3,000 ground-truth world frames). Body hist L1: "
    "adjacent frames' body colour histograms (0..2). Torso texture Δ and Background Δ: grey "
    "levels (0..255). Frame L1: the paper's, mean |frame t - frame t-1| (0..255).",
    "Background Δ is measured outside both frames' dilated pose masks, where the plate composite "
    "holds the pixels: with the plate it is near 0 by construction.",
)


def micro_config(args: argparse.Namespace, case: Case, variant: str) -> Any:
    """The render config of one case and variant on the micro preset."""
    return render_config(args, case, variant, MICRO_VARIANTS[variant][1])  # args.preset: micro


def world_cases(args: argparse.Namespace, width: int, height: int) -> list[Case]:
    """One case per held-fixed prompt, all on the same dance (``OUT/poses/<name>.json``)."""
    from engine.pose import save_poses_json

    (args.out / "poses").mkdir(parents=True, exist_ok=True)
    path = args.out / "poses" / f"{WORLD_POSES}.json"
    save_poses_json(pose_sequence(WORLD_POSES, args.frames, width, height), path)
    prompts = WORLD_PROMPTS[: args.prompts]
    return [Case(f"p{i}", prompt, path, 2000 + i) for i, prompt in enumerate(prompts)]


def _render_and_score(
    args: argparse.Namespace, case: Case, variant: str, chain: Any, clip: Any, estimator: Any
) -> dict[str, Any]:
    """Render one case x variant into ``OUT/renders/<case>/<variant>``; score it (micro section)."""
    from engine.metrics.report import score_render

    record, scored = render_scored(
        args, case, variant, chain, micro_config(args, case, variant),
        lambda out: score_render(out, clip=clip, estimator=estimator, plot=args.plots, micro=True),
    )  # fmt: skip
    metrics = {**scored["micro"]["aggregate"], "frame_l1": scored["aggregate"]["frame_l1"]}
    print(
        f"  {case.name:4s} {variant:16s} render {record['render_s']:6.1f} s  "
        f"score {record['score_s']:4.1f} s  "
        + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None),
        flush=True,
    )
    return {**record, "metrics": metrics, "paper_metrics": scored["aggregate"]}


def check_directions(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each :data:`CHECKS` row: the means with and without the module, and per-prompt wins."""
    table = mean_by_variant(runs)
    out = []
    for module, with_v, without_v, metric in CHECKS:
        if with_v not in table or without_v not in table:
            continue
        a, b = table[with_v].get(metric), table[without_v].get(metric)
        by_case = {(r["case"], r["variant"]): r["metrics"].get(metric) for r in runs}
        cases = sorted({r["case"] for r in runs})
        pairs = [(by_case.get((c, with_v)), by_case.get((c, without_v))) for c in cases]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        out.append({
            "module": module,
            "with": with_v,
            "without": without_v,
            "metric": metric,
            "with_value": a,
            "without_value": b,
            "as_paper": None if a is None or b is None else bool(a < b - SMALL * abs(b)),
            "cases_lower": sum(x < y for x, y in pairs),
            "cases": len(pairs),
        })  # fmt: skip
    return out


def run_micro(args: argparse.Namespace) -> dict[str, Any]:
    """Render and score every case x variant on the micro preset; the benchmark record."""
    from engine.chain import FrameChain
    from engine.metrics.pose_mse import make_estimator
    from engine.metrics.report import clip_for
    from engine.models.registry import build_components

    start = time.perf_counter()
    probe = micro_config(args, Case("probe", "probe", args.out / "poses", 0), "full")
    cases = world_cases(args, probe.width, probe.height)
    chain = FrameChain(build_components(probe.model), probe.model.attention)
    clip, estimator = clip_for(probe, args.clip), make_estimator(args.estimator or "none")
    setup_s = time.perf_counter() - start
    runs = [
        _render_and_score(args, case, variant, chain, clip, estimator)
        for case in cases
        for variant in args.variants
    ]
    return {
        "machine": machine_info(),
        "preset": "micro",
        "suite": {
            "name": "world",
            "prompts": [c.prompt for c in cases],
            "poses": [WORLD_POSES],
            "variants": {v: MICRO_VARIANTS[v][0] for v in args.variants},
            "seeds": [c.seed for c in cases],
        },
        "settings": {
            "frames": args.frames,
            "steps": probe.sampler.steps,
            "guidance": probe.sampler.guidance,
            "appearance_steps": probe.appearance.steps,
            "size": [probe.width, probe.height],
            "estimator": getattr(estimator, "name", "?"),
        },
        "runs": runs,
        "table": mean_by_variant(runs),
        "checks": check_directions(runs),
        "timings_s": {
            "setup": round(setup_s, 2),
            "render": round(sum(r["render_s"] for r in runs), 2),
            "score": round(sum(r["score_s"] for r in runs), 2),
            "total": round(time.perf_counter() - start, 2),
        },
    }


def _cell(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_micro_table(table: dict[str, dict[str, float | None]]) -> str:
    """Markdown: one row per variant, the micro metrics and Frame L1 as columns."""
    lines = [
        "| Variant | " + " | ".join(label for _, label in MICRO_COLUMNS) + " |",
        "|---|" + "---:|" * len(MICRO_COLUMNS),
    ]
    for variant, values in table.items():
        name = MICRO_VARIANTS[variant][0] if variant in MICRO_VARIANTS else variant
        lines.append(
            f"| {name} | " + " | ".join(_cell(values.get(k)) for k, _ in MICRO_COLUMNS) + " |"
        )
    return "\n".join(lines)


def format_checks(checks: list[dict[str, Any]]) -> str:
    """One line per (module, metric): moved the way the paper reports, or plainly not."""
    labels = dict(MICRO_COLUMNS)
    if not checks:
        return (
            "- none: each check needs both of its variants (full and w/o the module) in --variants"
        )
    lines = []
    for c in checks:
        metric = labels.get(c["metric"], c["metric"])
        nums = f"{_cell(c['with_value'])} with vs {_cell(c['without_value'])} without"
        wins = f"lower in {c['cases_lower']}/{c['cases']} prompts"
        a, b = c["with_value"], c["without_value"]
        if a is None or b is None:
            verdict = "NOT MEASURED (a value is missing)"
        elif abs(a - b) <= SMALL * abs(b):
            verdict = f"did NOT move it clearly (|change| <= {SMALL:.0%}): no effect shown"
        elif a < b:
            verdict = f"moved it DOWN by {(b - a) / abs(b):.0%}, as the paper reports"
        else:
            verdict = f"moved it UP by {(a - b) / abs(b):.0%}: NOT as the paper reports"
        lines.append(f"- {c['module']} → {metric}: {nums} ({wins}): {verdict}")
    return "\n".join(lines)


def micro_report(record: dict[str, Any]) -> str:
    """The whole markdown report of a micro run: settings, table, checks, notes, timing."""
    s, t, m = record["settings"], record["timings_s"], record["machine"]
    head = (
        f"Quality benchmark: preset micro, {len(record['suite']['prompts'])} prompt(s) x "
        f"{', '.join(record['suite']['poses'])}, seeds {record['suite']['seeds']}, "
        f"{s['frames']} frames, {s['steps']} steps, guidance {s['guidance']}, appearance "
        f"{s['appearance_steps']} steps, {s['size'][0]}x{s['size'][1]}\n"
        f"Prompts: {'; '.join(record['suite']['prompts'])}"
    )
    notes = "\n".join(f"- {n}" for n in MICRO_NOTES)
    timing = (
        f"Time: {t['total']:.0f} s total (setup {t['setup']:.0f} s, renders {t['render']:.0f} s, "
        f"scoring {t['score']:.0f} s) on {m['cuda'] or 'CPU'} ({m['cpus']} cores, "
        f"{m['platform']}, torch {m['torch']}, {m['torch_threads']} threads)"
    )
    table = format_micro_table(record["table"])
    return f"{head}\n\n{table}\n\nDoes each module move its metric as the paper reports?\n" + (
        f"{format_checks(record['checks'])}\n\n{notes}\n\n{timing}\n"
    )
