"""``metrics.png``: per-frame curves of a scored video (matplotlib, headless Agg backend), and
the aggregate metrics as a text table (:func:`summary_table`).

Drawn on a bare :class:`matplotlib.figure.Figure` (rendered by Agg), without pyplot, so the
process's global matplotlib backend is left alone and no display is needed.

Six panels, two per row: temporal consistency (CLIP consistency, L1 between adjacent frames),
image quality (NIQE, BRISQUE), text and pose fidelity (text alignment, Pose MSE). A render with a
``micro`` section gets a fourth row: figure IoU and garment colour per frame, appearance drift and
background change per pair. Pair metrics are drawn at ``t + 0.5`` between the frames they compare.
A metric without values is named in its panel with the reason instead of a curve.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

REGIONS = (
    ("frame", "whole frame", "C0"),
    ("body", "body", "C1"),
    ("background", "background", "C2"),
)


def _series(ax: Axes, xs: list[float], values: list[float | None], label: str, colour: str) -> bool:
    """Plot the non-null points of one series; False when there were none."""
    pts = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
    if not pts:
        return False
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1.5, color=colour, label=label)
    return True


def _panel(
    ax: Axes,
    result: dict[str, Any],
    keys: list[tuple[str, str, str]],
    *,
    pairs: bool,
    title: str,
    ylabel: str,
) -> None:
    """One panel: the series ``(key, label, colour)`` of ``per_pair`` or ``per_frame``."""
    table = result["per_pair" if pairs else "per_frame"]
    drawn, missing = 0, []
    for key, label, colour in keys:
        values = table.get(key) or []
        xs = [i + 0.5 if pairs else float(i) for i in range(len(values))]
        if _series(ax, xs, values, label, colour):
            drawn += 1
        else:
            reason = result.get("null_reasons", {}).get(key, "no values")
            missing.append(textwrap.fill(f"{label}: n/a ({reason})", 70))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("frame pair (t, t+1) at t + 0.5" if pairs else "frame")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="best")
    if missing:
        text = "\n".join(missing)
        if drawn:  # a note under the curves
            ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=8, va="bottom", color="0.35")
        else:  # an empty panel: the reason in its middle
            ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.35")


def _panels(
    settings: dict[str, Any], aggregate: dict[str, Any]
) -> list[tuple[list[tuple[str, str, str]], bool, str, str]]:
    """``(series, pairs, title, ylabel)`` of the six panels, row by row."""
    upscaled = settings.get("niqe_upscaled")
    note = f", frames upscaled x{settings.get('niqe_upscale_factor')}" if upscaled else ""
    scale = float(settings.get("pose_mse_scale") or 1000.0)
    rate = aggregate.get("pose_detection_rate")
    detected = f" (person detected in {100 * rate:.0f} % of frames)" if rate is not None else ""

    def regions(metric: str) -> list[tuple[str, str, str]]:
        return [(f"{key}_{metric}", label, colour) for key, label, colour in REGIONS]

    return [
        (regions("clip"), True, "CLIP consistency of adjacent frames (higher = steadier)",
         "cosine x 100"),
        (regions("l1"), True, "L1 between adjacent frames (lower = steadier)",
         "mean |a - b| (0..255)"),
        (regions("niqe"), False, f"NIQE (lower = more natural{note})", "NIQE"),
        ([("frame_brisque", "whole frame", "C0")], False, "BRISQUE (lower = better)", "BRISQUE"),
        ([("text_alignment", "frame vs prompt", "C3")], False,
         "Text alignment (CLIP, higher = closer to the prompt)", "cosine x 100"),
        ([("pose_mse", f"estimated vs input pose{detected}", "C4")], False,
         f"Pose MSE (lower = better; estimator: {settings.get('estimator')})",
         f"normalised MSE x {scale:g}"),
    ]  # fmt: skip


def _micro_panels(left: Axes, right: Axes, micro: dict[str, Any]) -> None:
    """The micro row: figure IoU + garment colour right per frame; drift + background per pair."""
    colour = micro["settings"].get("prompt_colour")
    _panel(
        left, micro, [("figure_iou", "figure IoU with the pose body mask", "C0")],
        pairs=False, title=f"micro: pose following; garment colour vs '{colour}'", ylabel="IoU",
    )  # fmt: skip
    right_frames = [
        (float(i), 1.0 if r else 0.0)
        for i, r in enumerate(micro["per_frame"].get("colour_right", []))
        if r is not None
    ]
    if right_frames:
        left.plot(*zip(*right_frames, strict=True), "s", ms=5, color="C3",
                  label="garment colour right (1) / wrong (0)")  # fmt: skip
        left.legend(fontsize=8, loc="best")
    left.set_ylim(-0.05, 1.05)
    _panel(
        right, micro,
        [("torso_texture_change", "torso texture change", "C1"),
         ("background_change", "background change", "C2")],
        pairs=True, title="micro: appearance drift and background change (lower = steadier)",
        ylabel="grey levels (0..255)",
    )  # fmt: skip
    hist = micro["per_pair"].get("body_hist_l1") or []
    if hist:
        twin = right.twinx()
        _series(twin, [i + 0.5 for i in range(len(hist))], hist, "body hist L1 (right axis)", "C0")
        twin.set_ylabel("histogram L1 (0..2)")
        handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        legend = right.get_legend()
        if legend is not None:
            legend.remove()
        twin.legend(handles=handles, fontsize=8, loc="best")


def plot_metrics(result: dict[str, Any], path: Path) -> Path:
    """Draw the per-frame curves of a metrics dict (as :func:`score_render` returns) to ``path``.

    Returns ``path`` (a PNG, 1400 x 1500 px; 1400 x 2000 with a ``micro`` row), written
    atomically.
    """
    settings = result.get("settings", {})
    micro = result.get("micro")
    rows = 4 if micro else 3
    fig = Figure(figsize=(14, 5 * rows), dpi=100)
    axes = fig.subplots(rows, 2)
    for ax, (series, pairs, title, ylabel) in zip(
        axes.flat[:6], _panels(settings, result.get("aggregate", {})), strict=True
    ):
        _panel(ax, result, series, pairs=pairs, title=title, ylabel=ylabel)
    if micro:
        _micro_panels(axes[3, 0], axes[3, 1], micro)
    source = result.get("source", {})
    prompt = settings.get("prompt") or "(no prompt)"
    fig.suptitle(
        f"{source.get('path', '')}: {source.get('frames', '?')} frames "
        f"{source.get('width', '?')}x{source.get('height', '?')}, CLIP {settings.get('clip')}\n"
        f"prompt: {prompt[:110]}{'…' if len(prompt) > 110 else ''}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.15 / rows))
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


LABELS: dict[str, str] = {
    "frame_niqe": "Frame NIQE ↓",
    "body_niqe": "Body NIQE ↓",
    "background_niqe": "Background NIQE ↓",
    "frame_brisque": "Frame BRISQUE ↓",
    "pose_mse": "Pose MSE ↓",
    "pose_detection_rate": "Pose detection rate ↑",
    "text_alignment": "Text alignment ↑",
    "frame_clip": "Frame CLIP ↑",
    "body_clip": "Body CLIP ↑",
    "background_clip": "Background CLIP ↑",
    "frame_l1": "Frame L1 ↓",
    "body_l1": "Body L1 ↓",
    "background_l1": "Background L1 ↓",
    "frame_mse": "Frame MSE ↓",
    "body_mse": "Body MSE ↓",
    "background_mse": "Background MSE ↓",
}


def summary_table(result: dict[str, Any]) -> str:
    """The aggregate metrics as an aligned two-column text table (null → ``n/a`` + reason)."""
    reasons = result.get("null_reasons", {})
    rows = []
    for key, value in result["aggregate"].items():
        label = LABELS.get(key, key)
        if value is None:
            why = reasons.get(key) or reasons.get(key.replace("_detection_rate", "_mse"), "")
            rows.append(f"{label:24s} {'n/a':>9s}  {textwrap.shorten(why, 70)}")
        else:
            rows.append(f"{label:24s} {value:9.3f}")
    settings = result.get("settings", {})
    if settings.get("niqe_upscaled"):
        rows.append(f"(NIQE on frames upscaled x{settings['niqe_upscale_factor']}, bicubic)")
    if settings.get("clip_note"):
        rows.append(f"(CLIP: {settings['clip_note']})")
    if result.get("micro"):
        from engine.metrics.micro_report import micro_summary

        rows.append(micro_summary(result["micro"]))
    return "\n".join(rows)
