"""The report of :mod:`benchmarks.gpu`: its sections, the ratios against the goal and the peer,
and the markdown tables."""

from __future__ import annotations

from typing import Any

from benchmarks.common import fmt

SECTIONS: tuple[str, ...] = (
    "batches",
    "diffusers_peer",
    "other_dtype",
    "lora",
    "vae_share",
    "core_utilisation",
    "deep_cache",
    "compile",
)
"""Every section of gpu.json, each measured, partial, skipped (with reasons) or error."""


def _rows(report: dict[str, Any], section: str) -> list[dict[str, Any]]:
    return [r for r in report["sections"][section]["rows"] if "s_per_frame" in r]


def comparisons(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each engine row (main and other dtype, DeepCache, compile) against the goal (s/frame over
    the goal's: ≤ 1 meets it; the goal is stated at its batch) and against the peer's s/frame at
    the same batch and dtype (< 1: the engine is faster)."""
    goal = report["plan"]["goal_s_per_frame"]
    peer = {(r["batch"], r["dtype"]): r["s_per_frame"] for r in _rows(report, "diffusers_peer")}
    out = []
    for section in ("batches", "other_dtype", "deep_cache", "compile"):
        for r in _rows(report, section):
            theirs = peer.get((r["batch"], r["dtype"]))
            out.append(
                {
                    "section": section,
                    "item": r["item"],
                    "s_per_frame": r["s_per_frame"],
                    "vs_goal": round(r["s_per_frame"] / goal, 3),
                    "meets_goal": r["batch"] == report["plan"]["goal_batch"]
                    and r["s_per_frame"] <= goal,
                    "vs_peer": round(r["s_per_frame"] / theirs, 3) if theirs else None,
                }
            )
    return out


def _machine_line(m: dict[str, Any]) -> str:
    gpu = f"{m['gpu']} ({m.get('gpu_memory_gib')} GiB), CUDA {m.get('cuda')}" if "gpu" in m else ""
    driver = f", nvidia-smi: {m['nvidia_smi']}" if m.get("nvidia_smi") else ""
    return (
        f"machine: {gpu or m['device']}{driver}; {m['cpu_count']} CPU cores; "
        f"torch {m['torch']}, diffusers {m['diffusers']}"
        + (f"; commit {m['commit']}" if "commit" in m else "")
    )


def _batch_table(report: dict[str, Any]) -> list[str]:
    ratios = {(c["section"], c["item"]): c for c in report["comparisons"]}
    lines = [
        "| section | dtype | inter_frame | batch | s/frame | ×goal | ×peer | decode share | "
        "weights GiB | peak GiB over resident | warm-up s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for section in ("batches", "other_dtype", "deep_cache", "compile"):
        for r in _rows(report, section):
            c = ratios.get((section, r["item"]), {})
            lines.append(
                f"| {section} | {r['dtype']} | {r['mode']} | {r['batch']} | "
                f"{fmt(r['s_per_frame'])} | {fmt(c.get('vs_goal'), 2)} | "
                f"{fmt(c.get('vs_peer'), 2)} | {fmt(r['decode_share'], 2)} | "
                f"{fmt(r['weights_gib'], 2)} | {fmt(r.get('peak_over_resident_gib'), 2)} | "
                f"{fmt(r['warmup_s'], 1)} |"
            )
    return lines


def _peer_table(report: dict[str, Any]) -> list[str]:
    lines = ["| dtype | batch | s/frame | peak GiB over resident |", "|---|---:|---:|---:|"]
    for r in _rows(report, "diffusers_peer"):
        lines.append(
            f"| {r['dtype']} | {r['batch']} | {fmt(r['s_per_frame'])} | "
            f"{fmt(r.get('peak_over_resident_gib'), 2)} |"
        )
    return lines


def _extras(report: dict[str, Any]) -> list[str]:
    s = report["sections"]
    lines = []
    for r in s["lora"]["rows"]:
        unused, mixed = r["loaded_unused"], r["mixed_3_adapters_and_base"]
        lines.append(
            f"- LoRA ({r['item']}): 3 adapters loaded, no row uses them "
            f"{fmt(unused['s_per_frame'])} s/frame; rows cycling 3 adapters + base "
            f"{fmt(mixed['s_per_frame'])} s/frame ({mixed['s_per_frame'] / unused['s_per_frame']:.2f}×)"
        )
    for r in s["core_utilisation"]["rows"]:
        lines.append(
            f"- in-process core ({r['item']}, inter_frame {r['inter_frame']}): "
            f"{fmt(r['s_per_frame'])} s/frame wall, Sampler busy {r['sampler_busy_share']:.0%} "
            f"of the wall, NVML GPU utilisation {fmt(r['nvml_gpu_util_pct'], 0)} % "
            f"({r.get('nvml', 'sampled every 50 ms')}); batches {r['batch_sizes']}; video: {r['video']}"
        )
    for r in s["other_dtype"]["rows"]:
        if "build_s" in r:
            lines.append(f"- {r['item']}: {r['build_s']:.1f} s (converted from the main dtype)")
    return lines


def _not_measured(report: dict[str, Any]) -> list[str]:
    lines = []
    for name, section in report["sections"].items():
        for s in section["skipped"]:
            lines.append(f"- skipped: {name} {s['item']}: {s['reason']}")
        for e in section["errors"]:
            lines.append(f"- FAILED: {name} {e['item']}: {e['error']}")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: machine, engine rows with ratios, peer, extras, what was not run."""
    plan = report["plan"]
    head = [
        f"# GPU benchmark: {plan['preset']}, {plan['steps']} steps with CFG",
        "",
        _machine_line(report["machine"]),
        "",
        f"Goal: ≤ {plan['goal_s_per_frame']} s/frame per character at batch {plan['goal_batch']}"
        f" (×goal ≤ 1 meets it). Elapsed {report['elapsed_s']} s of a "
        f"{report['budget_s']:.0f} s budget. Status: {report['status']}",
        "",
        "Memory: the models' weights, and the peak GPU memory torch allocated in the timed calls "
        "over what was resident when they started (activations and workspaces of that batch; "
        "every row's `resident_gib` in gpu.json also counts the run's other resident copies).",
        "",
    ]
    body = [*_batch_table(report), "", "Plain diffusers (batched pipeline call):", ""]
    body += [*_peer_table(report), "", *_extras(report), "", *_not_measured(report)]
    return "\n".join(head + body) + "\n"
