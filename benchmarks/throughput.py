"""Throughput benchmark: K characters × F frames through plain diffusers and the engine core.

For each preset, in one run, on the same seeded random-weight models and the same frames
(inter-frame alignment ``none``, no LoRA, no plate: the like-for-like work):

- (a) ``plain``: :class:`~diffusers.StableDiffusionControlNetPipeline` at batch 1, each
  character's frames one after another (its own unpatched components, same prompt, pose maps,
  steps, guidance, seeds and size).
- (a2) ``plain_batched``: the same pipeline batched across characters — one call per frame
  index with the K prompts and K pose maps (the like-for-like peer of cross-character batching).
- (b) ``engine``: the engine core in this process (:class:`~engine.core.EngineCore` +
  :class:`~engine.core.InProcessExecutor`), timed from the first ``submit`` until the core is
  idle: frames, latents and pose maps persisted, videos and manifests written, as in production.
- ``bare``: the batches (b) ran, replayed with pre-built jobs straight through
  :class:`~engine.batching.BatchDenoiser` + decode (padded as the Sampler pads): the limit on this
  machine. (b)/bare is what the core costs on top.
- (c) ``ray``: the same core on a local Ray instance (``actors.executor.RayExecutor``), actors
  started and warmed up before the clock starts.
- (d) ``ray_full``: (c) with the full method (appearance LoRA per character, background plate,
  ``latent`` inter-frame alignment): the cost of the alignment stages.
- ``engine[OPTION]`` (``--options``): (b) again with one back-end or sampling option on
  (``onnx``, ``compile``, ``dpmpp_2m:STEPS``, ``deep_cache:N``), with its frames/s over (b)'s and
  over (a2)'s, and how far its frames are from (b)'s.

Every variant is warmed up (a 1-frame, 1-step call or render) before timing; (a), (a2), (b),
bare and (c) run ``--repeat`` passes in interleaved rounds (a, a2, b, bare, c, a, …; all stay
resident) and each one's fastest pass counts. Each ratio is given twice: of the bests, and as the
median over rounds of the ratio within a round (``paired_ratios``: robust to one lucky pass; the
targets are judged on it). torch runs ``--threads`` intra-op
threads per process, Ray actors included (``model.threads``). Prints a markdown table per preset
and writes JSON (machine, settings, runs, ratios, frame checks, load averages)::

    python -m benchmarks.throughput --presets tiny:8x8x20,small:4x4x10
    python -m benchmarks.throughput --presets tiny --options onnx,dpmpp_2m:14,deep_cache:3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import best, timed
from benchmarks.throughput_runs import (
    OPTIONS,
    Bare,
    Engine,
    EngineTrace,
    FullMethod,
    Plain,
    RayCore,
    Variant,
    option_overrides,
    plain_pipeline,
    sampler_padding,
)

RUN_LABELS: dict[str, str] = {
    "plain": "(a) plain diffusers, batch 1",
    "plain_batched": "(a2) plain diffusers, batched across characters",
    "engine": "(b) engine core, in-process",
    "bare": "bare batched loop (BatchDenoiser + decode)",
    "ray": "(c) engine core on Ray",
    "ray_full": "(d) Ray, full method",
}
RATIOS: dict[str, tuple[str, str, str]] = {
    "ray_over_plain_batched": ("ray", "plain_batched", "(c)/(a2) Ray core vs batched diffusers"),
    "engine_over_ray": ("engine", "ray", "(b)/(c) in-process vs Ray core"),
    "engine_over_bare": ("engine", "bare", "(b)/bare what the core costs"),
    "engine_over_plain_batched": ("engine", "plain_batched", "(b)/(a2) vs batched diffusers"),
    "plain_batched_over_plain": ("plain_batched", "plain", "(a2)/(a) batching alone"),
    "engine_over_plain": ("engine", "plain", "(b)/(a) vs diffusers at batch 1"),
    "full_over_ray": ("ray_full", "ray", "(d)/(c) full method vs like-for-like"),
}
"""name → (numerator run, denominator run, label); each ratio is of frames/s."""
TARGETS: dict[str, tuple[float, bool]] = {
    "engine_over_plain_batched": (1.0, True),
    "ray_over_plain_batched": (1.0, True),
    "engine_over_bare": (0.95, True),
    "engine_over_ray": (1.10, False),
}
"""ratio → (bound, at least): issue 11 (≥ 1.0× batched diffusers, ≥ 0.95× bare) and issue 5
(Ray overhead ≤ 10 %)."""


@dataclass(frozen=True)
class Case:
    """One preset's benchmark size."""

    preset: str
    characters: int
    frames: int
    steps: int

    @property
    def label(self) -> str:
        return f"{self.preset} {self.characters}x{self.frames}x{self.steps}"


# -- one preset ----------------------------------------------------------------------------------


def compute_ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Every ratio of :data:`RATIOS` whose two runs are present (frames/s over frames/s)."""
    out: dict[str, float | None] = {}
    for name, (top, bottom, _) in RATIOS.items():
        a = runs.get(top, {}).get("frames_per_s")
        b = runs.get(bottom, {}).get("frames_per_s")
        out[name] = round(a / b, 4) if a and b else None
    return out


def paired_ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Every ratio of :data:`RATIOS` as the median over rounds of the two runs' ratio in the
    same round (``samples_s`` are in round order; the passes of a round ran back to back), so a
    lucky pass of one side cannot carry it the way it carries a ratio of bests. None when a run
    is missing or ran once (the full method)."""
    out: dict[str, float | None] = {}
    for name, (top, bottom, _) in RATIOS.items():
        a, b = runs.get(top, {}), runs.get(bottom, {})
        pairs = list(zip(a.get("samples_s", []), b.get("samples_s", []), strict=False))
        if len(pairs) < 2 or not a.get("frames") or a.get("frames") != b.get("frames"):
            out[name] = None
            continue
        out[name] = round(statistics.median(sb / sa for sa, sb in pairs), 4)  # fr/s over fr/s
    return out


def check_targets(
    ratios: dict[str, float | None], paired: dict[str, float | None] | None = None
) -> list[dict[str, Any]]:
    """Each target of :data:`TARGETS` with its value and whether it is met (None: not run),
    judged on the paired median (:func:`paired_ratios`) where there is one, else the ratio of
    bests."""
    out = []
    for name, (bound, at_least) in TARGETS.items():
        value = (paired or {}).get(name)
        value = ratios.get(name) if value is None else value
        met = None if value is None else value >= bound if at_least else value <= bound
        text = f"{'≥' if at_least else '≤'} {bound:g}"
        out.append(
            {"ratio": name, "label": RATIOS[name][2], "target": text, "value": value, "met": met}
        )
    return out


def like_for_like(case: Case, threads: int) -> list[str]:
    """The spec overrides of the like-for-like runs."""
    return [
        f"sampler.steps={case.steps}",
        "alignment.inter_frame=none",
        "output.contact_sheet=false",
        f"model.threads={threads}",
    ]


def option_run(option: str) -> str:
    """The run name of (b) with ``option`` on (a key of the JSON's runs)."""
    return f"engine[{option}]"


def bench_case(
    case: Case,
    root: Path,
    *,
    full: FullMethod | None,
    threads: int,
    repeat: int,
    timeout_s: float,
    ray: bool = True,
    options: Sequence[str] = (),
) -> dict[str, Any]:
    """Run every variant for one preset → the preset's result dict of the JSON."""
    shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter()
    characters = common.make_characters(
        case.preset, case.characters, case.frames, root, like_for_like(case, threads)
    )
    engine = common.engine_config(
        case.preset,
        [
            f"cluster.max_batch={case.characters}",
            f"cluster.max_preparing={case.characters}",  # refine only: nothing to hold them back
            f"model.threads={threads}",
        ],
    )
    loads = {"start": common.load_avg()}
    phases: dict[str, float] = {}

    def phase(name: str, fn: Any) -> Any:
        print(f"[{case.label}] {name} …", flush=True)
        result, seconds = timed(fn)
        phases[name], loads[f"after_{name}"] = round(seconds, 2), common.load_avg()
        return result

    pipe, build_s = plain_pipeline(characters)
    variants: dict[str, Variant] = {}

    def engine_trace() -> EngineTrace:  # bare replays (b)'s first pass: built after it
        core = variants["engine"]
        assert isinstance(core, Engine) and core.trace is not None
        return core.trace

    builders: dict[str, Any] = {
        "plain": lambda: Plain(pipe, characters, False, build_s),
        "plain_batched": lambda: Plain(pipe, characters, True, build_s),
        "engine": lambda: Engine(characters, engine, root, timeout_s),
        "bare": lambda: Bare(engine_trace(), characters, engine),
    }
    for option in options:
        builders[option_run(option)] = lambda o=option: Engine(
            characters, engine, root, timeout_s, option=o
        )
    if ray:
        builders["ray"] = lambda: RayCore(characters, engine, root, timeout_s)
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in builders}
    try:
        for k in range(repeat):  # interleaved rounds: machine drift weighs on every variant alike
            for name, build in builders.items():
                if name not in variants:
                    variants[name] = phase(f"{name} set-up", build)
                variant = variants[name]
                label = f"{name} pass {k + 1}/{repeat}"
                records[name].append(phase(label, lambda v=variant, k=k: v.once(k)))
        runs = {name: {**best(rs), **variants[name].info} for name, rs in records.items()}
        if ray and full is not None:
            ray_core = variants["ray"]
            assert isinstance(ray_core, RayCore)
            runs["ray_full"] = phase("ray_full", lambda: ray_core.full(full))
    finally:
        for variant in variants.values():
            variant.close()
    reference = variants["engine"].frames
    checks = {
        f"{name}_vs_engine": common.frame_diffs(reference, variants[name].frames)
        for name in ("plain", "plain_batched", "bare", "ray", *map(option_run, options))
        if name in variants
    }
    ratios, paired = compute_ratios(runs), paired_ratios(runs)
    for option in options:  # each option's frames/s over (b)'s and over the batched peer's
        mine = runs[option_run(option)]["frames_per_s"]
        ratios[f"{option_run(option)}_over_engine"] = round(
            mine / runs["engine"]["frames_per_s"], 4
        )
        ratios[f"{option_run(option)}_over_plain_batched"] = round(
            mine / runs["plain_batched"]["frames_per_s"], 4
        )
    c = characters[0].config
    return {
        "preset": case.preset,
        "characters": case.characters,
        "frames": case.frames,
        "steps": case.steps,
        "size": [c.width, c.height],
        "guidance": c.sampler.guidance,
        "max_batch": engine.cluster.max_batch,
        "threads": threads,
        "repeat": repeat,
        "options": list(options),
        "padding": sampler_padding(engine, c.alignment.inter_frame),
        "cluster": engine.cluster.model_dump(mode="json"),
        "runs": runs,
        "ratios": ratios,
        "paired_ratios": paired,
        "targets": check_targets(ratios, paired),
        "checks": checks,
        "load_1min": loads,
        "phase_wall_s": phases,
        "wall_s": round(time.perf_counter() - wall, 2),
    }


# -- report and CLI ------------------------------------------------------------------------------


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    """One preset's runs, ratios and targets as markdown."""
    w, h = result["size"]
    runs, fmt = result["runs"], common.fmt
    lines = [
        f"### {result['preset']}: {result['characters']} characters × {result['frames']} frames, "
        f"{result['steps']} steps, {w}×{h}, max_batch {result['max_batch']}",
        "",
        "| run | seconds (best) | frames/s | s/frame | all runs (s) | batch sizes |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, label in RUN_LABELS.items():
        if name in runs:
            r = runs[name]
            sizes = r.get("batch_sizes")
            shown = common.run_lengths(sizes) if sizes else str(r.get("batch", ""))
            samples = ", ".join(f"{x:.1f}" for x in r.get("samples_s", [r["seconds"]]))
            lines.append(
                f"| {label} | {fmt(r['seconds'], 1)} | {fmt(r['frames_per_s'])} | "
                f"{fmt(r['s_per_frame'])} | {samples} | {shown} |"
            )
    options = result.get("options", [])
    if options:
        lines += [
            "",
            "| (b) with option | frames/s | vs (b) | vs (a2) | frames vs (b): max \\|Δ\\| |",
            "|---|---:|---:|---:|---:|",
        ]
        for option in options:
            name = option_run(option)
            diff = result["checks"].get(f"{name}_vs_engine", {}).get("max_abs", "—")
            lines.append(
                f"| {option} | {fmt(runs[name]['frames_per_s'])} | "
                f"{fmt(result['ratios'][f'{name}_over_engine'])} | "
                f"{fmt(result['ratios'][f'{name}_over_plain_batched'])} | {diff} |"
            )
    lines += [
        "",
        "| ratio (of frames/s) | of bests | paired median | target | result |",
        "|---|---:|---:|---:|---|",
    ]
    targets = {t["ratio"]: t for t in result["targets"]}
    paired = result.get("paired_ratios", {})
    for name, (_, _, label) in RATIOS.items():
        value, t = result["ratios"].get(name), targets.get(name)
        if value is not None:
            verdict = "—" if t is None else "PASS" if t["met"] else "FAIL"
            median = fmt(paired[name]) if paired.get(name) is not None else "—"
            lines.append(
                f"| {label} | {fmt(value)} | {median} | {t['target'] if t else ''} | {verdict} |"
            )
    checks = ", ".join(f"{k} max {v['max_abs']}" for k, v in result["checks"].items())
    loads = " → ".join(f"{v:.2f}" for v in result["load_1min"].values())
    ray = runs.get("ray", {})
    outside = "; ".join(
        f"{name} {runs[name]['outside_sampler_s']:.2f} s of {runs[name]['seconds']:.1f} s"
        for name in ("engine", "ray")
        if name in runs
    )
    lines += [
        "",
        f"{common.machine_line(machine)}. torch threads {result['threads']} per process "
        f"(Sampler actor: {ray.get('sampler_threads', '—')}); batches padded "
        f"({result['padding'][1]}) within {result['padding'][0]} rows. "
        f"Core time outside the Sampler's batches: {outside}. "
        f"Frames vs (b), |Δ| grey levels: {checks}. Load (1 min) {loads}; "
        f"wall {result['wall_s']:.0f} s. Shared machine: other processes' load is in the timings.",
    ]
    return "\n".join(lines)


def parse_cases(spec: str, characters: int, frames: int, steps: int) -> list[Case]:
    """``tiny,small:4x4x10`` → cases; a bare name uses the default K, F and steps."""
    cases = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, size = item.partition(":")
        k, f, s = characters, frames, steps
        if size:
            numbers = [int(n) for n in size.lower().split("x")]
            if len(numbers) not in (2, 3) or min(numbers) < 1:
                raise argparse.ArgumentTypeError(f"bad preset item {item!r}: use NAME:KxF[xS]")
            k, f = numbers[:2]
            s = numbers[2] if len(numbers) == 3 else steps
        cases.append(Case(name, k, f, s))
    return cases


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--presets",
        default="tiny:8x8x20,small:4x4x10",
        help="comma list NAME[:KxF[xS]] (default tiny:8x8x20,small:4x4x10)",
    )
    p.add_argument("--characters", type=int, default=8, help="K for a bare NAME (default 8)")
    p.add_argument("--frames", type=int, default=8, help="F for a bare NAME (default 8)")
    p.add_argument("--steps", type=int, default=20, help="steps for a bare NAME (default 20)")
    p.add_argument("--skip-ray", action="store_true", help="skip (c) and (d)")
    p.add_argument("--skip-full", action="store_true", help="skip (d), the full method")
    p.add_argument("--full-inter", default="latent", help="(d) inter-frame alignment")
    p.add_argument("--lora-steps", type=int, default=20, help="(d) appearance.steps")
    p.add_argument("--references", type=int, default=2, help="(d) appearance.references")
    p.add_argument("--inpaint-steps", type=int, default=20, help="(d) inpainting steps")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process, Ray actors included (default 1)",
    )
    p.add_argument(
        "--options",
        default="",
        help="(b) again with each of these on, comma list of "
        f"{', '.join(OPTIONS)} (e.g. onnx,dpmpp_2m:14,deep_cache:3; compile takes minutes)",
    )
    p.add_argument("--repeat", type=int, default=2, help="runs per variant, fastest kept")
    p.add_argument("--timeout", type=float, default=3600.0, help="per core run, seconds")
    p.add_argument("--out", type=Path, default=common.OUT / "throughput.json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cases = parse_cases(args.presets, args.characters, args.frames, args.steps)
    options = [o for o in (x.strip() for x in args.options.split(",")) if o]
    for option in options:
        try:
            option_overrides(option)
        except ValueError as e:
            _parser().error(str(e))
    full = (
        None
        if args.skip_full
        else FullMethod(args.full_inter, args.lora_steps, args.references, args.inpaint_steps)
    )
    report: dict[str, Any] = {
        "machine": common.machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "full_method": asdict(full) if full else None,
            "threads": args.threads,
            "repeat": args.repeat,
            "options": options,
        },
        "presets": {},
    }
    start, tables = time.perf_counter(), []
    with common.torch_threads(args.threads):  # restored: main() may run inside another program
        for case in cases:
            result = bench_case(
                case,
                args.out.parent / f"{args.out.stem}-work" / case.preset,
                full=full,
                threads=args.threads,
                repeat=max(1, args.repeat),
                timeout_s=args.timeout,
                ray=not args.skip_ray,
                options=options,
            )
            report["presets"][case.preset] = result
            tables.append(markdown(result, report["machine"]))
            print("\n" + tables[-1] + "\n", flush=True)
    report["wall_s"] = round(time.perf_counter() - start, 2)
    common.write_report(report, args.out, "\n\n".join(tables) + "\n")
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
