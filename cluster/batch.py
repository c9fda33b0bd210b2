"""Batch renders on a Ray cluster: ``python -m cluster.batch MANIFEST.yaml --out ROOT``.

Run it directly (starts or joins a local Ray instance) or through the job API::

    ray job submit --working-dir . -- python -m cluster.batch examples/batch.yaml --out /abs/out

The manifest lists render specs; outputs land in ``ROOT/<render id>/``, or in
``--storage s3://bucket/prefix`` (``--endpoint-url`` for MinIO or any S3-compatible server)
with the core's index still in ROOT. Re-running the same
manifest skips finished renders and resumes partial ones. ``ROOT/summary.json`` says how each
render ended. Manifest format::

    preset: tiny                   # engine settings (model, cluster) shared by every render
    set: [cluster.max_batch=8]     # optional overrides of those settings
    renders:
      - id: alice                  # [A-Za-z0-9_-]{1,64}, the output folder name
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
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from engine.config import (
    ConfigError,
    RenderConfig,
    StorageConfig,
    apply_override,
    build_config,
    deep_merge,
    load_config,
    resolve_weight_paths,
)
from engine.core.store import check_id
from engine.files import atomic_json

log = logging.getLogger("cluster.batch")


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
    manifest.set = resolved_sets(manifest.set, path.parent)
    engine = load_config(None, preset=manifest.preset, overrides=manifest.set)
    renders = []
    seen: set[str] = set()
    for entry in manifest.renders:
        check_id(entry.id)
        if entry.id in seen:
            raise ConfigError(f"batch manifest {path}: render id {entry.id!r} is repeated")
        seen.add(entry.id)
        config = _render_config(path.parent, manifest, entry)
        if config.model != engine.model:
            raise ConfigError(_model_differs(entry.id, config, engine))
        renders.append((entry, config))
    return engine, renders


def resolved_sets(sets: list[str], root: Path) -> list[str]:
    """The manifest's ``set:`` lines with relative weight paths (``model.base=weights/sd15``)
    made absolute against the manifest's folder, as a spec's are against the spec's."""
    out = []
    for item in sets:
        key, sep, value = item.partition("=")
        section, _, name = key.strip().partition(".")
        data: dict[str, Any] = {section: {name: value.strip()}}
        resolve_weight_paths(data, root)
        out.append(f"{key}={data[section][name]}" if sep and name else item)
    return out


def _model_differs(render_id: str, config: RenderConfig, engine: RenderConfig) -> str:
    """The keys where a render's model differs from the batch's, and the manifest lines that
    set them for the whole batch (one model serves every render of a batch)."""
    mine, batch = config.model.model_dump(mode="json"), engine.model.model_dump(mode="json")
    keys = [k for k in mine if mine[k] != batch[k]]
    lines = ", ".join(f"'model.{k}={mine[k]}'" for k in keys)
    return (
        f"render {render_id!r} sets {', '.join(f'model.{k}' for k in keys)} differently from the "
        f"batch (one model serves every render of a batch): put them in the manifest's top-level "
        f"set: [{lines}] and remove them from the render's spec"
    )


def _render_config(root: Path, manifest: BatchManifest, entry: RenderEntry) -> RenderConfig:
    inline = dict(entry.model_extra or {})
    for key in ("poses", "plate", "masks"):
        if isinstance(inline.get(key), str) and not Path(inline[key]).is_absolute():
            inline[key] = str((root / inline[key]).resolve())
    resolve_weight_paths(inline, root)
    base = load_config(
        root / entry.spec if entry.spec else None, preset=manifest.preset, overrides=manifest.set
    )
    data = deep_merge(base.model_dump(mode="json"), inline)
    for override in entry.set:
        apply_override(data, override)
    return build_config(data, f"render {entry.id!r}")


def run_batch(
    manifest_path: Path,
    root: Path,
    *,
    timeout_s: float = 3600.0,
    storage: StorageConfig | None = None,
) -> dict[str, Any]:
    """Render every entry of the manifest on the connected Ray cluster; write summary.json.

    The engine core's index lives in ``root``, the render folders in ``storage`` (default: the
    manifest's ``storage`` settings, else ``root``): renders left unfinished by a killed run
    resume from their last persisted frame, finished ones are skipped (no actor is started when
    nothing is left to do), failed ones are tried again. One render's fault never ends the job.
    """
    from actors.executor import RayExecutor
    from engine.core import ConflictError, EngineCore, open_store

    engine, renders = load_manifest(manifest_path)
    if storage is not None:
        engine = engine.model_copy(update={"storage": storage})
    start = time.monotonic()
    summary: dict[str, Any] = {"manifest": str(manifest_path), "renders": {}}
    executor = RayExecutor(engine)
    core = EngineCore(
        engine,
        open_store(root, engine),
        executor,
        on_event=lambda e: log.info("%s %s", e["render_id"], _describe(e)),
    )
    submitted: list[str] = []
    try:
        for entry, config in renders:
            before = core.store.get(entry.id)
            try:
                core.submit(config, id=entry.id, priority=entry.priority, retry=True)
            except (ConfigError, ConflictError) as e:
                summary["renders"][entry.id] = {"status": "failed", "error": str(e)}
                continue
            if before is not None and before.state == "done":
                summary["renders"][entry.id] = _entry(core, entry.id, "skipped")
            else:
                submitted.append(entry.id)
        core.run_until_idle(timeout_s=timeout_s)
        frames_done = 0
        for render_id in submitted:
            record = core.get(render_id)
            summary["renders"][render_id] = _entry(core, render_id, record.state)
            frames_done += record.frames_done - summary["renders"][render_id]["resumed_from"]
        if executor.devices is not None:  # cluster.shared_models: what each GPU's worker holds
            summary["devices"] = executor.devices.refresh()
    finally:
        core.close()
    wall = time.monotonic() - start
    summary.update(
        actors_started=executor.actors_started,
        wall_s=round(wall, 2),
        frames_rendered=frames_done,
        frames_per_s=round(frames_done / wall, 3) if wall else None,
    )
    atomic_json(root / "summary.json", summary)
    return summary


def _describe(event: dict[str, Any]) -> str:
    if event["type"] == "frame":
        return f"frame {event['frame'] + 1}/{event['frames_total']}"
    return str(event.get("state") or event.get("error") or event["type"])


def _entry(core: Any, render_id: str, status: str) -> dict[str, Any]:
    record = core.get(render_id)
    out = core.store.files(render_id)
    manifest = json.loads(out.get("manifest.json")) if out.exists("manifest.json") else {}
    resumed = manifest.get("resumed_from", 0)
    return {
        "status": status,
        "frames": record.frames_total,
        "resumed_from": resumed if status != "skipped" else record.frames_total,
        "error": record.error,
        "out": out.uri,
        "video": f"{out.uri}/video.mp4" if record.state == "done" else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.batch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("manifest", type=Path, help="batch manifest YAML")
    parser.add_argument(
        "--out", type=Path, required=True, help="the core's index folder (and storage root)"
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="render folders in this folder or fsspec URI (s3://bucket/prefix); default --out",
    )
    parser.add_argument(
        "--endpoint-url", default=None, help="s3:// only: an S3-compatible server (MinIO, …)"
    )
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
        storage = (
            StorageConfig(uri=args.storage, endpoint_url=args.endpoint_url)
            if args.storage
            else None
        )
        summary = run_batch(
            args.manifest, args.out.resolve(), timeout_s=args.timeout, storage=storage
        )
    except (ConfigError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [k for k, v in summary["renders"].items() if v["status"] not in ("done", "skipped")]
    print(
        f"summary: {args.out.resolve() / 'summary.json'} ({len(summary['renders']) - len(failed)} ok, {len(failed)} failed)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
