"""One render in this process (``avatar render``): the engine core with the in-process executor,
its store in the output folder itself.

The folder holds the render's files (see :mod:`engine.core.outputs`) and ``.renders.sqlite``,
the core's index. An interrupted render continues with ``resume=True`` from its last persisted
frame and produces the frames an uninterrupted run would have (bit-identical on the same machine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from engine.chain import FrameChain
from engine.config import ConfigError, RenderConfig
from engine.core import EngineCore, InProcessExecutor, RenderStore
from engine.core.outputs import frames_persisted

__all__ = ["RenderError", "RenderResult", "render"]

log = logging.getLogger(__name__)

RENDER_ID = "render"
"""The id of the one render in an ``avatar render`` output folder."""


class RenderError(RuntimeError):
    """A render ended FAILED; ``kind`` is ``input`` (fix the spec) or ``infra``."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class RenderResult:
    """Where a finished render's outputs are."""

    out_dir: Path
    video: Path
    manifest: Path
    frames: int
    resumed_from: int
    timings: dict[str, float] = field(default_factory=dict)


def render(
    config: RenderConfig,
    out_dir: Path,
    *,
    chain: FrameChain | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RenderResult:
    """Render ``config`` into ``out_dir``; with ``resume`` continue after the last finished frame.

    Raises:
        ConfigError: a spec without prompt or poses, or a folder holding another render's frames
            without ``resume``.
        RenderError: the render failed (the message names the file, frame or key).
    """
    config.require_spec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = RenderStore(out, folder=out)
    previous = store.get(RENDER_ID)
    persisted = frames_persisted(store.files(RENDER_ID), config.limits.max_frames)
    if persisted and not resume:
        store.close()
        raise ConfigError(
            f"{out} already holds {persisted} rendered frames; pass --resume to continue that "
            "render or choose an empty --out folder"
        )
    if previous is not None:  # a new attempt: the folder's inputs.json guards what changed
        store.delete(RENDER_ID)
    bar = tqdm(disable=not progress, desc="frames", unit="frame")

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "frame":
            bar.total = event["frames_total"]
            bar.update(1)
        elif event["type"] == "state" and progress:
            bar.set_postfix_str(event["state"])

    executor = InProcessExecutor(config, chain, overlap=False)
    core = EngineCore(config, store, executor, on_event=on_event, resume=False)
    try:
        core.submit(config, id=RENDER_ID)
        core.run_until_idle(timeout_s=float("inf"))
        record = core.get(RENDER_ID)
    finally:
        bar.close()
        core.close()
    if record.state != "done":
        raise RenderError(record.error or f"render ended {record.state}", record.error_kind or "")
    manifest = out / "manifest.json"
    import json

    data = json.loads(manifest.read_text())
    return RenderResult(
        out, out / "video.mp4", manifest, record.frames_total, data["resumed_from"],
        dict(data["timings_s"]),
    )  # fmt: skip
