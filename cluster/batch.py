"""Batch renders on a Ray cluster: ``python -m cluster.batch MANIFEST.yaml --out ROOT``.

Run it directly (starts or joins a local Ray instance) or through the job API::

    ray job submit --working-dir . -- python -m cluster.batch examples/batch.yaml --out /abs/out

The manifest lists render specs; outputs land in ``ROOT/<render id>/``. Re-running the same
manifest skips finished renders and resumes partial ones. ``ROOT/summary.json`` says how each
render ended. Manifest format::

    preset: tiny                   # engine settings (model, cluster) shared by every render
    set: [cluster.max_batch=8]     # optional overrides of those settings
    renders:
      - id: alice                  # [A-Za-z0-9_.-]+, the output folder name
        spec: dance.yaml           # a render spec file, relative to the manifest …
        priority: 1                # optional (higher first)
        set: [seed=7]              # optional per-render overrides
      - id: bob                    # … or the spec inline
        prompt: a man in a blue suit dancing
        poses: dance/poses.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from engine.config import (
    ConfigError,
    RenderConfig,
    apply_override,
    build_config,
    deep_merge,
    load_config,
)

log = logging.getLogger("cluster.batch")
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class RenderEntry(BaseModel):
    """One render of a batch manifest: a spec file and/or inline spec fields."""

    model_config = ConfigDict(extra="allow")
    id: str
    spec: Path | None = None
    priority: int = 0
    set: list[str] = Field(default_factory=list)


class BatchManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preset: str = "tiny"
    set: list[str] = Field(default_factory=list)
    renders: list[RenderEntry] = Field(min_length=1)


def load_manifest(path: Path) -> tuple[RenderConfig, list[tuple[RenderEntry, RenderConfig]]]:
    """The shared engine config and each render's validated config (paths resolved)."""
    try:
        raw = yaml.safe_load(path.read_text())
        manifest = BatchManifest.model_validate(raw)
    except (OSError, yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"batch manifest {path}: {e}") from None
    engine = load_config(None, preset=manifest.preset, overrides=manifest.set)
    renders = []
    seen: set[str] = set()
    for entry in manifest.renders:
        if not _ID.match(entry.id) or entry.id in seen:
            raise ConfigError(
                f"batch manifest {path}: render id {entry.id!r} is invalid or repeated"
            )
        seen.add(entry.id)
        config = _render_config(path.parent, manifest, entry)
        if config.model != engine.model:
            raise ConfigError(
                f"render {entry.id!r}: its model settings differ from the batch's; set them once at the top"
            )
        renders.append((entry, config))
    return engine, renders


def _render_config(root: Path, manifest: BatchManifest, entry: RenderEntry) -> RenderConfig:
    inline = dict(entry.model_extra or {})
    for key in ("poses", "plate", "masks"):
        if isinstance(inline.get(key), str) and not Path(inline[key]).is_absolute():
            inline[key] = str((root / inline[key]).resolve())
    base = load_config(
        root / entry.spec if entry.spec else None, preset=manifest.preset, overrides=manifest.set
    )
    data = deep_merge(base.model_dump(mode="json"), inline)
    for override in entry.set:
        apply_override(data, override)
    return build_config(data, f"render {entry.id!r}")


def _finished(out: Path, frames: int) -> bool:
    return (out / "video.mp4").is_file() and (
        out / "latents" / f"{frames - 1:06d}.safetensors"
    ).is_file()


def run_batch(manifest_path: Path, root: Path, *, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Render every entry of the manifest on the connected Ray cluster; write summary.json."""
    from actors.driver import ClusterRenderer
    from engine.render import prepare_poses

    engine, renders = load_manifest(manifest_path)
    root.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    summary: dict[str, Any] = {"manifest": str(manifest_path), "renders": {}}
    renderer = ClusterRenderer(
        engine,
        on_event=lambda e: log.info(
            "%s %s %d/%d", e.render_id, e.stage.value, e.frames_done, e.frames_total
        ),
    )
    submitted = []
    for entry, config in renders:
        out = root / entry.id
        frames = len(prepare_poses(config).keypoints)
        if _finished(out, frames):
            summary["renders"][entry.id] = {"status": "skipped", "frames": frames, "out": str(out)}
            continue
        renderer.submit(entry.id, config, out, priority=entry.priority)
        submitted.append(entry.id)
    results = renderer.run(timeout_s=timeout_s) if submitted else {}
    frames_done = 0
    for render_id, progress in results.items():
        task = renderer.tasks[render_id]
        summary["renders"][render_id] = {
            "status": progress.stage.value,
            "frames": progress.frames_total,
            "resumed_from": task.start,
            "error": progress.error,
            "out": str(task.out),
            "video": str(task.out / "video.mp4") if progress.stage.value == "done" else None,
        }
        frames_done += progress.frames_done - task.start
    wall = time.monotonic() - start
    summary.update(
        wall_s=round(wall, 2),
        frames_rendered=frames_done,
        frames_per_s=round(frames_done / wall, 3) if wall else None,
    )
    tmp = root / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, root / "summary.json")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.batch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("manifest", type=Path, help="batch manifest YAML")
    parser.add_argument("--out", type=Path, required=True, help="storage root: ROOT/<render id>/")
    parser.add_argument(
        "--address", default=None, help="Ray address (default: the job's cluster, else a local one)"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="give up after this many seconds"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import ray

    ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=True)
    try:
        summary = run_batch(args.manifest, args.out.resolve(), timeout_s=args.timeout)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [k for k, v in summary["renders"].items() if v["status"] not in ("done", "skipped")]
    print(
        f"summary: {args.out.resolve() / 'summary.json'} ({len(summary['renders']) - len(failed)} ok, {len(failed)} failed)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
