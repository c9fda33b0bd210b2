"""One admitted render inside the engine core: its inputs, resume point, prepared artefacts and
chain state (the clean latents of frames 0 and t-1 only), and how its outputs are finalized.

On a resumed render everything that determines the frames is reused from the render folder —
the refined prompt (never re-queried), the adapter, the plate — and checked against the digests
recorded when it was made, so a resume can never drift.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.caches import SharedCache, refine_key
from engine.config import ModelConfig, RenderConfig
from engine.core.encode import decode_png, png_bytes, write_frame
from engine.core.executor import Prepared, PrepareJob
from engine.core.faults import InputsChangedError
from engine.core.inputs import local_inputs
from engine.core.outputs import (
    check_inputs,
    encode_video,
    fingerprint,
    frames_persisted,
    input_hashes,
    load_latent,
    open_folder,
    put_json,
    save_frame,
    write_contact_sheet,
    write_manifest,
)
from engine.core.store import RenderStore
from engine.core.work import AdapterPayload, FrameOutcome, FrameWork, SessionSpec
from engine.method import cache_root, prepare_poses
from engine.pose import PoseSequence
from engine.session import SuppliedMasks
from engine.storage import LocalStorage, Storage


@dataclass
class LiveRender:
    """Runtime state of one render in the core."""

    id: str
    config: RenderConfig
    out: Storage
    """The render's folder in the storage backend."""
    poses: PoseSequence
    key: str
    start: int
    model_name: str
    latents: dict[int, np.ndarray] = field(default_factory=dict)
    refined: dict[str, Any] | None = None
    adapter: AdapterPayload | None = None
    plate: np.ndarray | None = None
    stages: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    attempts: int = 0
    error_kind: str | None = None
    peak_rss_mb: float = 0.0
    admitted: float = field(default_factory=time.monotonic)
    rendering_since: float | None = None
    eta_s: float | None = None
    """The scheduler's latest estimate of the seconds left."""
    rendered_at: float | None = None
    """When its last frame was persisted (the chain's end; encoding may queue after it)."""
    supplied_plate: np.ndarray | None = None
    """(H, W, 3) uint8 plate image of the spec (read from the render folder's input copy)."""
    masks: SuppliedMasks | None = None
    """The spec's masks read at the render size (sent to the Samplers with the session)."""
    lost_since: float | None = None
    """Since when the render's frames have been waiting for lost workers (None: not waiting)."""
    durable: set[int] = field(default_factory=set)
    """Frames durable in the backend but not yet counted (a frame before them is still being
    written)."""
    durable_upto: int = -1
    """Frames 0 .. durable_upto-1 are durable and counted (set to ``start`` when loaded)."""
    cache: SharedCache | None = None
    """Where its refined prompt is cached (the backend's ``cache/``, :mod:`engine.caches`)."""

    def __post_init__(self) -> None:
        if self.durable_upto < 0:
            self.durable_upto = self.start

    @property
    def frames(self) -> int:
        return len(self.poses.keypoints)

    @property
    def signature(self) -> tuple[Any, ...]:
        """Renders with equal signatures may share a batch."""
        c = self.config
        return (
            c.width,
            c.height,
            c.sampler.steps,
            c.alignment.inter_frame,
            c.chain.kv_include_self,
        )

    def prepare_job(self) -> PrepareJob:
        """The prepare stages this render still needs (a shared backend shares the caches)."""
        plate = self.plate
        if plate is None and self.config.alignment.background:
            plate = self.supplied_plate
        shared = self.out.root_view() if self.out.shared else None
        return PrepareJob(
            self.id, self.config, self.poses.keypoints[0], self.refined, self.adapter, plate,
            shared,
        )  # fmt: skip

    def work(self, index: int) -> FrameWork:
        previous = self.latents.get(index - 1) if index > 0 else None
        anchor = self.latents.get(0) if index > 0 else None
        if self.rendering_since is None:
            self.rendering_since = time.monotonic()
        return FrameWork(self.id, index, previous, anchor)

    def keep_latent(self, outcome: FrameOutcome) -> None:
        """Keep a finished frame's latent (the next frame's reference) and only the latents the
        chain still needs: frames 0 and t."""
        assert outcome.latent is not None
        self.latents[outcome.index] = outcome.latent
        for old in [i for i in self.latents if i not in (0, outcome.index)]:
            del self.latents[old]

    def persist(self, outcome: FrameOutcome) -> int:
        """Write a finished frame's files (writer thread); its latent last, marking it done.
        A frame a worker encoded arrives as bytes; one it wrote itself needs nothing here."""
        if outcome.written is not None:
            return outcome.index
        if outcome.encoded is not None:
            write_frame(self.out, outcome.encoded)
            return outcome.index
        assert outcome.latent is not None and outcome.frame is not None
        assert outcome.pose_map is not None
        save_frame(
            self.out, outcome.index, outcome.frame, outcome.latent, outcome.pose_map, outcome.mask
        )
        return outcome.index


def load_render(
    store: RenderStore,
    render_id: str,
    config: RenderConfig,
    model: ModelConfig,
    cancelled: Callable[[], bool] | None = None,
) -> LiveRender:
    """Lock the render's folder, load its poses, find its resume point and reuse what it
    persisted (loader thread). Raises input faults (bad poses, changed inputs). A pose decode
    in progress stops when ``cancelled()`` turns True."""
    from engine.models.registry import model_name

    start_time = time.perf_counter()
    store.lock(render_id)
    out = store.files(render_id)
    shared = SharedCache(store.caches) if store.caches is not None else None
    with local_inputs(out, config) as local:  # the render folder's copy of the input files
        poses = prepare_poses(local, cancelled, shared)
        name = model_name(model)
        hashes = input_hashes(local, poses, name)
        plate, masks = _read_plate_and_masks(local)
    open_folder(out)
    start = frames_persisted(out, len(poses.keypoints))
    check_inputs(out, hashes, start)
    live = LiveRender(render_id, config, out, poses, fingerprint(hashes), start, name)
    live.supplied_plate, live.masks = plate, masks
    if start:
        _reuse_prepared(live)
        live.latents = {i: load_latent(out, i) for i in {0, start - 1}}
    if live.refined is None:  # refined once per prompt, by any node (engine.caches)
        live.cache = shared or SharedCache(LocalStorage(cache_root(config)))  # single: this node's
        key = refine_key(config)
        live.refined = live.cache.refined(key)
        live.stages["refine_cache"] = {"key": key, "hit": live.refined is not None}
    live.timings["poses"] = time.perf_counter() - start_time
    return live


def _read_plate_and_masks(
    config: RenderConfig,
) -> tuple[np.ndarray | None, SuppliedMasks | None]:
    """The spec's plate image and masks, read now (they are used with background alignment
    only); the masks lined up with the render's frames at the render size."""
    if not config.alignment.background:
        return None, None
    plate = masks = None
    if config.plate is not None:
        from engine.method import load_plate

        plate = load_plate(config.plate, config.width, config.height)
    if config.masks is not None:
        from engine.pose import load_poses
        from engine.session import supplied_masks

        assert config.poses is not None
        source = load_poses(config.poses, max_frames=config.limits.max_frames)
        masks = supplied_masks(config, source).read(config.width, config.height)
    return plate, masks


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reuse_prepared(live: LiveRender) -> None:
    """Reload the refined prompt, adapter and plate a resumed render was drawn with."""
    from engine.appearance import read_adapter

    out = live.out
    if not out.exists("prepared.json"):
        return  # frames were persisted before this record existed: prepare again
    record = json.loads(out.get("prepared.json"))
    refined = json.loads(out.get("refined_prompt.json"))
    checks = {"refined_prompt": _digest(json.dumps(refined, sort_keys=True).encode())}
    live.refined = refined
    if record.get("adapter"):
        with _local_copy(out, "adapter") as folder:
            weights = read_adapter(folder)
        digest = weights.digest()
        checks["adapter"] = digest
        name = str(weights.metadata.get("name") or f"appearance_{digest[:12]}")
        live.adapter = AdapterPayload(name, weights, digest, {"name": name, "reused": True})
    if record.get("plate"):
        live.plate = decode_png(out.get("plate/plate.png"))
        checks["plate"] = _digest(np.ascontiguousarray(live.plate).tobytes())
    changed = [k for k, v in checks.items() if record.get(k) != v]
    if changed:
        raise InputsChangedError(
            f"{out.uri}: {', '.join(changed)} differ from what the persisted frames were drawn with; "
            "restore them or render into a new folder"
        )
    live.stages.update(record.get("stages", {}))


def save_prepared(live: LiveRender, done: Prepared) -> SessionSpec:
    """Write the prepare stages' artefacts into the render folder (refined_prompt.json,
    adapter/, plate/, prepared.json with their digests) → the Sampler's session spec."""
    from engine.appearance import save_adapter
    from engine.background import PlateResult, plate_record, save_plate_result

    out, config = live.out, live.config
    reused = live.refined is not None
    live.timings.update(done.seconds)
    refined = done.refined
    put_json(out, "refined_prompt.json", refined)
    live.refined = refined
    record: dict[str, Any] = {
        "refined_prompt": _digest(json.dumps(refined, sort_keys=True).encode()),
        "stages": {"refined_prompt": "refined_prompt.json"},
    }
    if "refine_cache" in live.stages:
        record["stages"]["refine_cache"] = _share_refined(live, refined)
    if done.adapter is not None:
        adapter = done.adapter
        if not out.keys("adapter"):
            _write_folder(out, "adapter", lambda folder: save_adapter(adapter.weights, folder))
        live.adapter = adapter
        record["adapter"] = adapter.digest
        record["stages"]["adapter"] = {**adapter.record, "digest": adapter.digest,
                                       "files": "adapter/"}  # fmt: skip
    plate = done.plate
    if isinstance(plate, PlateResult):
        made = plate
        files = _write_folder(out, "plate", lambda folder: save_plate_result(made, folder))
        entry = {"source": "generated", **plate_record(plate)}
        entry["files"] = {k: f"plate/{Path(v).name}" for k, v in files.items()}
        plate = plate.plate
    elif plate is not None and live.plate is None:  # a supplied plate: keep a copy
        out.put("plate/plate.png", png_bytes(plate))
        entry = {"source": str(config.plate), "files": {"plate": "plate/plate.png"}}
    else:
        entry = live.stages.get("plate", {"source": "persisted"})
    if plate is not None:
        live.plate = plate
        record["plate"] = _digest(np.ascontiguousarray(plate).tobytes())
        record["stages"]["plate"] = entry
    if not reused or not out.exists("prepared.json"):
        put_json(out, "prepared.json", record)
    live.stages.update(record["stages"])
    return SessionSpec(
        config.model_dump(mode="json"),
        live.poses.keypoints,
        refined["full"],
        config.negative_prompt,
        live.plate if config.alignment.background else None,
        live.adapter,
        masks=live.masks,
    )


def _share_refined(live: LiveRender, refined: dict[str, Any]) -> dict[str, Any]:
    """Store a fresh refinement in the shared cache (a template fallback of another backend is
    not stored: the backend is asked again next time) → the manifest's ``refine_cache``."""
    entry = dict(live.stages["refine_cache"])
    if entry["hit"] or "stored" in entry:
        return entry
    if refined.get("source") != live.config.refine.backend:
        entry["stored"] = False
        entry["error"] = f"a {refined.get('source')} fallback is not cached"
        return entry
    cache = live.cache
    assert cache is not None  # set with the refine_cache entry
    if cache.refined(entry["key"]) == refined:  # renders of one prompt loaded together: once
        entry["stored"] = True
        return entry
    error = cache.put_refined(entry["key"], refined)
    entry["stored"] = error is None
    if error:
        entry["error"] = error
    return entry


def finalize(live: LiveRender, *, executor: str, memory: dict[str, Any]) -> None:
    """video.mp4, contact sheet, manifest.json (and metrics) of a render whose frames are all
    persisted (finisher thread)."""
    out, config, poses = live.out, live.config, live.poses
    rendered = live.frames - live.start
    chain_s = None
    if live.rendering_since is not None and rendered:  # first batch → last frame persisted
        chain_s = (live.rendered_at or time.monotonic()) - live.rendering_since
        live.timings["chain"] = chain_s
    start = time.perf_counter()
    encode_video(out, poses, config)
    if config.output.contact_sheet:
        write_contact_sheet(out, poses, config.output.contact_sheet_frames)
    live.timings["outputs"] = time.perf_counter() - start
    if live.refined is None and out.exists("refined_prompt.json"):
        live.refined = json.loads(out.get("refined_prompt.json"))
    stages = {"executor": executor, **live.stages}
    if memory.get("sessions_bytes"):
        stages["sampler_session_bytes"] = memory["sessions_bytes"].get(live.id)
    if memory.get("devices"):  # cluster.shared_models: what each GPU's worker holds
        stages["devices"] = memory["devices"]
    live.timings["total"] = time.monotonic() - live.admitted
    write_manifest(
        out,
        config,
        poses,
        model={"name": live.model_name, "executor": executor, "dtype": config.model.dtype},
        key=live.key,
        start=live.start,
        timings=live.timings,
        prompt=((live.refined or {}).get("full", ""), config.negative_prompt),
        stages=stages,
        peak_rss_mb=max(live.peak_rss_mb, float(memory.get("peak_rss_mb", 0.0))),
        seconds_per_frame=chain_s / rendered if chain_s is not None and rendered else None,
    )
    if config.metrics:  # score the finished render: metrics.json + metrics.png
        from engine.metrics.report import score_render

        t = time.perf_counter()
        with _local_copy(out, "") as folder:  # the scorer reads files; upload what it wrote
            score_render(folder)
            if out.local_path() is None:
                for name in ("metrics.json", "metrics.png"):
                    if (folder / name).is_file():
                        out.put(name, (folder / name).read_bytes())
        live.timings["metrics"] = time.perf_counter() - t


@contextmanager
def _local_copy(out: Storage, prefix: str) -> Iterator[Path]:
    """``prefix`` of a render folder as a local folder: the folder itself on a local backend,
    else a temporary download (removed afterwards)."""
    local = out.local_path()
    if local is not None:
        yield local / prefix if prefix else local
        return
    with tempfile.TemporaryDirectory(prefix="avatar-copy-") as tmp:
        yield out.get_dir(prefix, Path(tmp) / (prefix or "render"))


def _write_folder(out: Storage, prefix: str, write: Callable[[Path], Any]) -> Any:
    """Let ``write`` fill the folder ``prefix`` of a render folder: in place on a local backend,
    else in a temporary folder uploaded afterwards (one PUT per file)."""
    local = out.local_path()
    if local is not None:
        return write(local / prefix)
    with tempfile.TemporaryDirectory(prefix="avatar-upload-") as tmp:
        result = write(Path(tmp) / prefix)
        out.put_dir(Path(tmp) / prefix, prefix)
        return result
