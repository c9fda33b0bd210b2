"""The render service: one :class:`EngineCore` stepped on a background thread, behind the API's
owner checks, limits, quotas and idempotency. Executor-agnostic (the Serve engine deployment
gives it a RayExecutor; tests an InProcessExecutor) and free of HTTP: every method takes plain
values, returns JSON-able data and raises :class:`ApiError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from cluster.serve.api import ApiError, RenderRequest
from cluster.serve.auth import QuotaExceeded, QuotaLedger
from cluster.serve.config import ServeArgs
from cluster.serve.telemetry import EngineMetrics
from cluster.serve.uploads import EXAMPLES, json_bytes, public_message, store_poses
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
from engine.core.store import FINAL_STATES, STATES

log = logging.getLogger(__name__)
UNFINISHED = tuple(s for s in STATES if s not in FINAL_STATES)
ARTEFACTS = {"video": "video.mp4", "contact-sheet": "contact_sheet.png", "metrics": "metrics.json"}


def idempotent_id(owner: str, key: str) -> str:
    """The render id of an ``Idempotency-Key`` (per owner; 32 hex digits)."""
    return "k" + hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()[:31]


def view(record: RenderRecord) -> dict[str, Any]:
    """A store record as the API's RenderView."""
    base = f"/v1/renders/{record.id}"
    total, done = record.frames_total, record.frames_done
    progress = 1.0 if record.state == "done" else (done / total if total else 0.0)
    data = record.public()
    for key in ("owner", "fingerprint", "priority"):
        data.pop(key)
    return {
        **data,
        "progress": round(progress, 4),
        "links": {
            "self": base,
            "events": f"{base}/events",
            "video": f"{base}/video",
            "contact_sheet": f"{base}/contact-sheet",
            "metrics": f"{base}/metrics",
            "frames": f"{base}/frames/{{i}}",
        },
    }


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
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.last_step = time.monotonic()
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
            try:
                check_id(render_id)
            except ConfigError as e:
                raise ApiError(422, "invalid_id", str(e), "path.id") from None
        rid = render_id or (idempotent_id(owner, idempotency_key) if idempotency_key else new_id())
        existing = self.store.get(rid)
        if existing is not None and existing.owner != owner:
            raise ApiError(409, "id_taken", f"render id {rid!r} is taken; choose another id")
        path, fresh = store_poses(self.root, rid, self._pose_bytes(req, upload))
        try:
            config = self._config(req, path)
            frames = 0
            if existing is None:
                frames = self._count_frames(config)
            with self._lock:
                if self.store.get(rid) is not None:  # a repeat (or a concurrent twin)
                    self.core.submit(config, id=rid, owner=owner)
                    return view(self.core.get(rid)), False
                unfinished = len(self.store.list(owner=owner, states=UNFINISHED, limit=100_000))
                self.quotas.check(owner, unfinished, frames, self.args.retry_after_s)
                self.core.submit(config, id=rid, owner=owner)
                self.quotas.record(owner, rid, frames)
        except ConflictError:
            self._forget(path, fresh)
            self.metrics.reject("conflict")
            raise ApiError(
                409,
                "conflict",
                f"render {rid!r} exists with another request body; use a new id or key",
            ) from None
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
        return view(self.core.get(rid)), True

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

    def _pose_bytes(self, req: RenderRequest, upload: bytes | None) -> bytes:
        given = [n for n, v in (("poses", req.poses), ("example", req.example), ("upload", upload))
                 if v is not None]  # fmt: skip
        if len(given) != 1:
            raise ApiError(
                422,
                "poses",
                f"give exactly one of inline poses, an example or a pose upload (got {given})",
                "body.poses",
            )
        if upload is not None:
            if not upload:
                raise ApiError(422, "poses", "the pose upload is empty", "poses")
            return upload
        if req.example is not None:
            if req.example not in EXAMPLES:
                raise ApiError(
                    422, "unknown_example",
                    f"example {req.example!r} does not exist; choose one of {sorted(EXAMPLES)}",
                    "body.example",
                )  # fmt: skip
            return EXAMPLES[req.example].read_bytes()
        return json_bytes(req.poses)

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
            "limits": {"max_frames": self.args.limits.max_frames},
            "cache_dir": str(self.root / "cache"),
        }
        for key in ("negative_prompt", "fps", "width", "height"):
            if getattr(req, key) is not None:
                fields[key] = getattr(req, key)
        sampler = {"steps": req.steps, "guidance": req.guidance}
        fields["sampler"] = {k: v for k, v in sampler.items() if v is not None}
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

    def _count_frames(self, config: Any) -> int:
        from engine.core.live import prepare_poses
        from engine.pose import PoseError

        try:
            return len(prepare_poses(config).keypoints)
        except (PoseError, ConfigError, OSError, ValueError) as e:
            self.metrics.reject("invalid_poses")
            message = public_message(str(e), self.root)
            raise ApiError(422, "invalid_poses", message, "poses") from None

    @staticmethod
    def _forget(path: Path, fresh: bool) -> None:
        if fresh:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()

    # -- read and cancel ----------------------------------------------------------------------

    def record(self, owner: str, render_id: str) -> RenderRecord:
        """The caller's render, else 404 (another owner's render is not there for the caller)."""
        record = self.store.get(render_id) if len(render_id) <= 64 else None
        if record is None or record.owner != owner:
            raise ApiError(404, "not_found", f"no render {render_id!r} for this token", "path.id")
        return record

    def get(self, owner: str, render_id: str) -> dict[str, Any]:
        return view(self.record(owner, render_id))

    def list(
        self, owner: str, states: list[str] | None, cursor: int | None, limit: int
    ) -> dict[str, Any]:
        records = self.store.list(
            owner=owner, states=tuple(states) if states else None, before=cursor, limit=limit + 1
        )
        more = len(records) > limit
        records = records[:limit]
        return {
            "renders": [view(r) for r in records],
            "next_cursor": records[-1].seq if more and records else None,
        }

    def cancel(self, owner: str, render_id: str) -> dict[str, Any]:
        self.record(owner, render_id)
        return view(self.core.cancel(render_id))

    def events(self, owner: str, render_id: str, after: int | None) -> dict[str, Any]:
        record = self.record(owner, render_id)
        events = self.core.events(render_id, after)
        for event in events:
            if event.get("error"):
                event["error"] = public_message(str(event["error"]), self.root)
        return {"events": events, "final": record.final, "state": record.state}

    def artefact(self, owner: str, render_id: str, kind: str, index: int = 0) -> dict[str, Any]:
        """Where one of the render's files (``video``, ``contact-sheet``, ``metrics``,
        ``frame``) lives in the storage backend: ``{"key": "<id>/<name>", "size": bytes}`` (the
        ingress streams it from the backend itself), else 404 naming why."""
        record = self.record(owner, render_id)
        files = self.store.files(render_id)
        name = f"frames/{index:06d}.png" if kind == "frame" else ARTEFACTS[kind]
        if kind == "frame":
            ready = index < record.frames_done or record.state == "done"
        else:
            ready = record.state == "done"
        if not ready or not files.exists(name):
            what = f"frame {index}" if kind == "frame" else kind
            why = f"it is {record.state}" if not ready else "it was not made (see the request)"
            raise ApiError(404, "not_ready", f"render {render_id!r} has no {what}: {why}")
        return {"key": f"{render_id}/{name}", "size": files.size(name)}

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
            "examples": sorted(EXAMPLES),
            "limits": {k: int(v) for k, v in lim.model_dump().items()},
        }
