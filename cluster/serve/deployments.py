"""The Ray Serve deployments: a CPU FastAPI ingress bound to one engine deployment.

    Ingress (HTTP, stateless, N replicas) ──DeploymentHandle──▶ Engine (1 replica: EngineCore +
                                                               RayExecutor, stepping thread)

The engine replica owns the store under ``args.storage``; restarted (killed, redeployed, the
whole app shut down and run again) it builds a new core on the same store, which resumes every
unfinished render from its last persisted frame. The ingress replicas (``ingress.replicas``,
default 2, on any node) are stateless: downloads stream from the storage backend, so any replica
serves any render; each response names its replica (``X-Avatar-Replica``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from cluster.serve.backend import HandleBackend, wrap_errors
from cluster.serve.config import ServeArgs

log = logging.getLogger(__name__)
METHODS = frozenset(
    {
        "submit",
        "get",
        "list",
        "cancel",
        "delete",
        "events",
        "artefact",
        "health",
        "metrics_text",
        "info",
    }
)


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=30,
)
class Engine:
    """The engine core with the Ray executor, stepped on a background thread."""

    def __init__(self, args: dict[str, Any]):
        from cluster.serve.service import RenderService
        from engine.core import InProcessExecutor

        self.args = ServeArgs.model_validate(args)
        config = self.args.engine_config()
        if self.args.executor == "ray":
            from actors.executor import RayExecutor

            executor: Any = RayExecutor(config)
        else:
            executor = InProcessExecutor(config)
        self.service = RenderService(self.args, executor)
        log.info("engine ready on %s (%s executor)", self.args.root, executor.name)

    async def call(self, method: str, *args: Any) -> Any:
        """One service method (see RenderService), on a worker thread; ApiError as a value."""
        if method not in METHODS:
            raise ValueError(f"unknown engine method {method!r}")
        return await asyncio.to_thread(wrap_errors, getattr(self.service, method), *args)

    def check_health(self) -> None:
        """Serve restarts the replica when the store is not writable or the loop is stuck."""
        health = self.service.health()
        if not health["ready"]:
            raise RuntimeError(f"engine unhealthy: {health}")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


class NameReplica:
    """ASGI middleware: every HTTP response names the ingress replica that answered it
    (``X-Avatar-Replica``), so a client or a test sees which of the N replicas served it."""

    HEADER = b"x-avatar-replica"

    def __init__(self, app: Any, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (self.HEADER, self.replica)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, named)


class _EngineMethods:
    """Adapts a handle of :class:`Engine` to :class:`HandleBackend` (``handle.call``)."""

    def __init__(self, handle: Any):
        self.handle = handle

    def __getattr__(self, method: str) -> Any:
        call = self.handle.call

        class _Remote:
            @staticmethod
            def remote(*args: Any) -> Any:
                return call.remote(method, *args)

        return _Remote


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP API and the web page (cluster.serve.app), calling the engine by handle."""

    def __init__(self, engine: Any, args: dict[str, Any]):
        from cluster.serve.app import make_api

        parsed = ServeArgs.model_validate(args)
        backend = HandleBackend(_EngineMethods(engine), parsed.retry_after_s)
        self._app = make_api(backend, parsed)
        replica = serve.get_replica_context().replica_id.unique_id
        self._app.add_middleware(NameReplica, replica=replica)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app
