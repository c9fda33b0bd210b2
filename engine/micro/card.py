"""The training card's loss-curve figure: ``python -m engine.micro.card [WEIGHTS_DIR]``.

Reads ``train_log.json`` in the weights folder (``{"runs": [record, ...]}``, each the record
:func:`engine.micro.train.run` writes) and draws every stage's loss curve, runs one after the
other on a shared step axis, into ``loss.png`` beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.micro.arch import WEIGHTS_DIR

STAGES = ("vae", "unet", "inpaint", "segmenter")


def plot_losses(folder: Path = WEIGHTS_DIR) -> Path:
    """Write ``folder/loss.png`` from ``folder/train_log.json``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads((folder / "train_log.json").read_text())["runs"]
    fig, axes = plt.subplots(1, len(STAGES), figsize=(4 * len(STAGES), 3))
    for ax, stage in zip(axes, STAGES, strict=True):
        offset = 0
        for i, run in enumerate(runs):
            curve = run["stages"].get(stage, {}).get("curve") or []
            if curve:
                steps = [offset + p[0] for p in curve]
                where = run["machine"].get("gpu") or f"CPU x{run['machine'].get('cpu_threads')}"
                ax.plot(steps, [p[2] for p in curve], label=f"run {i + 1} ({where})")
                offset = steps[-1]
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    path = folder / "loss.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(plot_losses(Path(sys.argv[1]) if len(sys.argv) > 1 else WEIGHTS_DIR))
