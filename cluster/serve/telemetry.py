"""Prometheus metrics of the service (what Ray Serve's own metrics do not cover).

Engine side (the engine deployment): renders by state (queue depth), frames rendered (rate =
frames/s), time spent in each stage, end-to-end render time, submissions and rejects by reason.
Ingress side: HTTP rejects by reason (auth, body size, validation). Each side has its own
registry; ``GET /metrics`` answers both, concatenated (their metric names differ).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class EngineMetrics:
    """Counters fed by the core's progress events (stepping thread) and the submit path."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.renders = Gauge(
            "avatar_renders", "Renders in the store by state", ["state"], registry=r
        )
        self.frames = Counter("avatar_frames", "Frames rendered", registry=r)
        self.stage = Histogram(
            "avatar_stage_seconds", "Time renders spent in a state", ["state"],
            buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.total = Histogram(
            "avatar_render_seconds", "Submit to done", buckets=STAGE_BUCKETS, registry=r
        )
        self.submits = Counter("avatar_submits", "Renders accepted", registry=r)
        self.deletes = Counter("avatar_deletes", "Renders removed (DELETE, retention)", registry=r)
        self.rejects = Counter(
            "avatar_rejects", "Submissions refused by reason", ["reason"], registry=r
        )
        self._lock = threading.Lock()
        self._since: dict[str, tuple[str, float, float]] = {}  # id → (state, since, created)

    def event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "frame":
            self.frames.inc()
            return
        if event.get("type") != "state":
            return
        now, render_id, state = time.monotonic(), event["render_id"], event["state"]
        with self._lock:
            previous = self._since.get(render_id)
            if previous is not None:
                self.stage.labels(previous[0]).observe(now - previous[1])
            created = previous[2] if previous else now
            if state in ("done", "failed", "cancelled"):
                self._since.pop(render_id, None)
                if state == "done" and previous is not None:
                    self.total.observe(now - created)
            else:
                self._since[render_id] = (state, now, created)

    def submitted(self) -> None:
        self.submits.inc()

    def deleted(self) -> None:
        self.deletes.inc()

    def reject(self, reason: str) -> None:
        self.rejects.labels(reason).inc()

    def render(self, counts: dict[str, int]) -> str:
        for state, count in counts.items():
            self.renders.labels(state).set(count)
        return generate_latest(self.registry).decode()


class HttpMetrics:
    """Rejects answered by the ingress itself."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rejects = Counter(
            "avatar_http_rejects", "Requests refused by the ingress by reason", ["reason"],
            registry=self.registry,
        )  # fmt: skip

    def reject(self, reason: str) -> None:
        self.rejects.labels(reason).inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()
