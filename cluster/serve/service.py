"""The render service: one :class:`EngineCore` stepped on a background thread, behind the API's
owner namespaces, limits, quotas, idempotency, deletion and retention. Executor-agnostic (the
Serve engine deployment gives it a RayExecutor; tests an InProcessExecutor) and free of HTTP:
every method takes plain values, returns JSON-able data and raises :class:`ApiError`.

Ids are per owner (:mod:`cluster.serve.storage`): every method takes the id the owner knows and
works on ``tag(owner) + id`` in the store, so another owner's renders are simply not there.
A visual pose upload is refused here by its declared size only; it is decoded by the core's
loader in a bounded child process (``limits.decode_*`` of the engine config), and a decoding
failure arrives as a ``failed`` render whose error names the reason.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from cluster.serve.api import ApiError, RenderRequest
from cluster.serve.auth import QuotaExceeded, QuotaLedger
from cluster.serve.config import ServeArgs
from cluster.serve.storage import MAX_CLIENT_ID, OwnerIds, server_secret, tree_bytes
from cluster.serve.telemetry import EngineMetrics
from cluster.serve.uploads import EXAMPLES, PoseInput, public_message, request_poses, store_poses
from cluster.serve.views import view
from engine.config import ConfigError, build_config, deep_merge, preset_dict
from engine.core import (
    ConflictError,
    EngineCore,
    Executor,
    QueueFullError,
    RenderRecord,
    check_id,
    new_id,
    open_store,
)
from engine.core.store import FINAL_STATES, ID_PATTERN, STATES

log = logging.getLogger(__name__)
UNFINISHED = tuple(s for s in STATES if s not in FINAL_STATES)
ARTEFACTS = {"video": "video.mp4", "contact-sheet": "contact_sheet.png", "metrics": "metrics.json"}


class RenderService:
    """Owns the engine core (its store under ``args.storage``) and steps it.

    Args:
        args: Service settings.
        executor: The core's executor (built for ``args.engine_config()``).
    """

    def __init__(self, args: ServeArgs, executor: Executor):
        self.args, self.root = args, args.root
        self.config = args.engine_config()
        self.metrics = EngineMetrics()
        self.store = open_store(self.root, self.config)  # renders in config.storage
        self.quotas = QuotaLedger(self.root, args)
        self.core = EngineCore(self.config, self.store, executor, on_event=self.metrics.event)
        self.ids = OwnerIds(server_secret(self.root))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.last_step = time.monotonic()
        self._next_sweep = 0.0
        self.step_errors = 0
        self._thread = threading.Thread(target=self._loop, name="engine-step", daemon=True)
        if not args.paused:
            self._thread.start()

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.core.step(0.2)
            except Exception:  # the core isolates render faults; this is a bug: log, go on
                log.exception("engine step failed")
                self.step_errors += 1
                self._stop.wait(0.5)
            self.last_step = time.monotonic()
            if self.last_step >= self._next_sweep:
                self._next_sweep = self.last_step + self.args.storage.retention_check_s
                try:
                    self.sweep()
                except Exception:
                    log.exception("retention sweep failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.core.close()
        self.quotas.close()

    # -- submit -------------------------------------------------------------------------------

    def submit(
        self,
        owner: str,
        request: dict[str, Any],
        upload: bytes | None = None,
        render_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Queue a render → (its view, whether it was created now; False for a repeat)."""
        req = RenderRequest.model_validate(request)
        self._check_limits(req)
        if render_id is not None:
            self._check_client_id(render_id)
        key = self.ids.idempotent(owner, idempotency_key) if idempotency_key else None
        rid = self.ids.internal(owner, render_id or key or new_id())
        existing = self.store.get(rid)
        poses = self._poses(req, upload)
        path, fresh = store_poses(self.root, rid, poses)
        try:
            config = self._config(req, path)
            frames = 0
            if existing is None:
                frames = self._frames(config, poses)
            with self._lock:
                if self.store.get(rid) is not None:  # a repeat (or a concurrent twin)
                    self.core.submit(config, id=rid, owner=owner)
                    return view(self.core.get(rid), self.root), False
                unfinished = len(self.store.list(owner=owner, states=UNFINISHED, limit=100_000))
                self.quotas.check(owner, unfinished, frames, self.args.retry_after_s)
                self.quotas.check_storage(owner, self.stored_bytes(owner))
                self.core.submit(config, id=rid, owner=owner)
                self.quotas.record(owner, rid, frames)
        except ConflictError:
            self._forget(path, fresh)
            self.metrics.reject("conflict")
            raise ApiError(
                409, "conflict",
                f"render {OwnerIds.client(rid)!r} exists with another request body; use a new "
                "id or key",
            ) from None  # fmt: skip
        except QueueFullError as e:
            self._forget(path, fresh)
            self.metrics.reject("queue_full")
            raise ApiError(503, "queue_full", str(e), None, self.args.retry_after_s) from None
        except QuotaExceeded as e:
            self._forget(path, fresh)
            self.metrics.reject("quota")
            raise ApiError(429, "quota_exceeded", str(e), None, e.retry_after_s) from None
        except BaseException:
            self._forget(path, fresh)
            raise
        self.metrics.submitted()
        return view(self.core.get(rid), self.root), True

    @staticmethod
    def _check_client_id(render_id: str) -> None:
        try:
            check_id(render_id)
        except ConfigError as e:
            raise ApiError(422, "invalid_id", str(e), "path.render_id") from None
        if len(render_id) > MAX_CLIENT_ID:
            raise ApiError(
                422, "invalid_id", f"render ids have at most {MAX_CLIENT_ID} characters",
                "path.render_id",
            )  # fmt: skip

    def _check_limits(self, req: RenderRequest) -> None:
        lim = self.args.limits
        checks = [
            ("prompt", len(req.prompt), lim.max_prompt_chars, "characters"),
            ("negative_prompt", len(req.negative_prompt or ""), lim.max_prompt_chars, "chars"),
            ("width", req.width or 0, lim.max_side, "pixels"),
            ("height", req.height or 0, lim.max_side, "pixels"),
            ("steps", req.steps or 0, lim.max_steps, "steps"),
        ]
        for name, value, limit, unit in checks:
            if value > limit:
                self.metrics.reject("limit")
                raise ApiError(
                    422, "limit", f"{name} is {value} {unit}; this server allows {limit}",
                    f"body.{name}",
                )  # fmt: skip
        if req.preset is not None and req.preset not in self.args.presets:
            raise ApiError(
                422,
                "unknown_preset",
                f"preset {req.preset!r} is not served here; choose one of {self.args.presets}",
                "body.preset",
            )
        if not req.prompt.strip():
            raise ApiError(422, "invalid", "prompt is blank; describe the character", "body.prompt")

    def _poses(self, req: RenderRequest, upload: bytes | None) -> PoseInput:
        return request_poses(req, upload, self.args.limits)

    def _config(self, req: RenderRequest, poses: Path) -> Any:
        data = preset_dict(req.preset or self.args.presets[0])
        data.pop("preset", None)
        fields: dict[str, Any] = {
            "prompt": req.prompt,
            "seed": req.seed,
            "poses": str(poses),
            "metrics": req.metrics,
            "alignment": req.alignment.model_dump(),
            "model": self.config.model.model_dump(mode="json"),
            "cluster": self.config.cluster.model_dump(mode="json"),
            "limits": {
                **self.config.limits.model_dump(),
                "max_frames": self.args.limits.max_frames,
            },
            "cache_dir": str(self.root / "cache"),
        }
        for key in ("negative_prompt", "fps", "width", "height"):
            if getattr(req, key) is not None:
                fields[key] = getattr(req, key)
        sampler = {"steps": req.steps, "guidance": req.guidance}
        fields["sampler"] = {k: v for k, v in sampler.items() if v is not None}
        if req.character is not None:
            if req.character not in self.args.characters:
                raise ApiError(
                    422, "unknown_character",
                    f"character {req.character!r} is not served here; choose one of "
                    f"{sorted(self.args.characters)}", "body.character",
                )  # fmt: skip
            fields["alignment"]["intra_frame"] = True
            fields["appearance"] = {"lora": self.args.characters[req.character]}
        try:
            config = build_config(deep_merge(data, fields), "request")
        except ConfigError as e:
            raise ApiError(422, "invalid", public_message(str(e), self.root)) from None
        side = max(config.width, config.height)
        if side > self.args.limits.max_side or config.sampler.steps > self.args.limits.max_steps:
            raise ApiError(
                422, "limit",
                f"the preset's {config.width}x{config.height}, {config.sampler.steps} steps exceed "
                "this server's limits; set width, height and steps", "body.preset",
            )  # fmt: skip
        return config

    def _frames(self, config: Any, poses: PoseInput) -> int:
        """Frames the render will have: counted for JSON (cheap, in process), estimated from the
        declaration for videos (decoded later by the core, in a bounded child process)."""
        if poses.declared is not None:
            return poses.frames_estimate(self.args.limits.max_frames)
        from engine.core.live import prepare_poses
        from engine.pose import PoseError

        try:
            return len(prepare_poses(config).keypoints)
        except (PoseError, ConfigError, OSError, ValueError, RecursionError) as e:
            self.metrics.reject("invalid_poses")
            message = public_message(str(e), self.root)
            raise ApiError(422, "invalid_poses", message, "poses") from None

    @staticmethod
    def _forget(path: Path, fresh: bool) -> None:
        if fresh:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()

    # -- read, cancel, delete -----------------------------------------------------------------

    def record(self, owner: str, render_id: str) -> RenderRecord:
        """The caller's render, else 404 (other owners' ids are a separate namespace)."""
        record = None
        if len(render_id) <= MAX_CLIENT_ID and ID_PATTERN.match(render_id):
            record = self.store.get(self.ids.internal(owner, render_id))
        if record is None:
            raise ApiError(404, "not_found", f"no render {render_id!r} for this token", "path.id")
        return record

    def get(self, owner: str, render_id: str) -> dict[str, Any]:
        return view(self.record(owner, render_id), self.root)

    def list(
        self, owner: str, states: list[str] | None, cursor: int | None, limit: int
    ) -> dict[str, Any]:
        records = self.store.list(
            owner=owner, states=tuple(states) if states else None, before=cursor, limit=limit + 1
        )
        more = len(records) > limit
        records = records[:limit]
        return {
            "renders": [view(r, self.root) for r in records],
            "next_cursor": records[-1].seq if more and records else None,
        }

    def cancel(self, owner: str, render_id: str) -> dict[str, Any]:
        record = self.record(owner, render_id)
        return view(self.core.cancel(record.id), self.root)

    def delete(self, owner: str, render_id: str) -> None:
        """Cancel the render if needed and remove its artefacts, upload and row (then 404).
        The frames it used stay counted in the daily quota."""
        self._remove(self.record(owner, render_id).id)

    def _remove(self, rid: str) -> None:
        try:
            self.core.delete(rid)
        except TimeoutError as e:
            raise ApiError(503, "busy", f"{e}; retry", None, self.args.retry_after_s) from None
        uploads = self.root / ".uploads" / rid
        if uploads.exists():
            shutil.rmtree(uploads)
        self.metrics.deleted()

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove finished renders past their owner's retention → their store ids."""
        now = time.time() if now is None else now
        removed = []
        for record in self.store.list(states=tuple(FINAL_STATES), limit=1_000_000):
            days = self.quotas.retention_days(record.owner)
            if days is not None and record.updated < now - days * 86_400:
                self._remove(record.id)
                removed.append(record.id)
        if removed:
            log.info("retention removed %d renders", len(removed))
        return removed

    def stored_bytes(self, owner: str) -> int:
        """Bytes of ``owner``'s render folders and uploads."""
        total = 0
        for record in self.store.list(owner=owner, limit=1_000_000):
            files = self.store.files(record.id)
            total += sum(files.size(key) for key in files.keys())  # noqa: SIM118 (a Storage, not a dict)
            total += tree_bytes(self.root / ".uploads" / record.id)
        return total

    def events(self, owner: str, render_id: str, after: int | None) -> dict[str, Any]:
        record = self.record(owner, render_id)
        events = self.core.events(record.id, after)
        for event in events:
            event["render_id"] = render_id
            if event.get("error"):
                event["error"] = public_message(str(event["error"]), self.root)
        return {"events": events, "final": record.final, "state": record.state}

    def artefact(self, owner: str, render_id: str, kind: str, index: int = 0) -> dict[str, Any]:
        """Where one of the render's files (``video``, ``contact-sheet``, ``metrics``,
        ``frame``) lives in the storage backend: ``{"key": "<id>/<name>", "size": bytes}`` (the
        ingress streams it from the backend itself), else 404 naming why."""
        record = self.record(owner, render_id)
        files = self.store.files(record.id)
        name = f"frames/{index:06d}.png" if kind == "frame" else ARTEFACTS[kind]
        if kind == "frame":
            ready = index < record.frames_done or record.state == "done"
        else:
            ready = record.state == "done"
        if not ready or not files.exists(name):
            what = f"frame {index}" if kind == "frame" else kind
            why = f"it is {record.state}" if not ready else "it was not made (see the request)"
            raise ApiError(409, "not_ready", f"render {render_id!r} has no {what}: {why}")
        return {"key": f"{record.id}/{name}", "size": files.size(name)}

    # -- health -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Readiness: models built (the executor exists), store writable, loop stepping."""
        probe = self.root / ".ready"
        try:
            probe.write_text(str(time.time()))
            writable = True
        except OSError:
            writable = False
        stepping = self.args.paused or (
            self._thread.is_alive() and time.monotonic() - self.last_step < 300
        )
        return {
            "ready": writable and stepping,
            "store_writable": writable,
            "stepping": stepping,
            "paused": self.args.paused,
            "executor": self.core.executor.name,
        }

    def metrics_text(self) -> str:
        counts = {s: self.store.count((s,)) for s in STATES}
        return self.metrics.render(counts)

    def info(self) -> dict[str, Any]:
        lim = self.args.limits
        return {
            "presets": list(self.args.presets),
            "characters": sorted(self.args.characters),
            "examples": sorted(EXAMPLES),
            "limits": {k: int(v) for k, v in lim.model_dump().items()},
        }
