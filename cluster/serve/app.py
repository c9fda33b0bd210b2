"""The HTTP API and web page (FastAPI): ``make_api(backend, args)``.

The same app runs in process (tests: a :class:`LocalBackend` over a RenderService) and as the
Ray Serve ingress (:mod:`cluster.serve.deployments`: a :class:`HandleBackend` to the engine
deployment). No render lives inside a request: POST answers 202 at once, progress comes from the
store (GET, or the SSE stream with Last-Event-ID replay).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.serve import http
from cluster.serve.api import (
    ApiError,
    Health,
    RenderList,
    RenderView,
    ServiceInfo,
    State,
    error_responses,
)
from cluster.serve.auth import TokenTable
from cluster.serve.backend import Backend
from cluster.serve.config import ServeArgs
from cluster.serve.schema import exact_openapi, submit_body
from cluster.serve.storage import MAX_CLIENT_ID
from cluster.serve.telemetry import HttpMetrics
from cluster.serve.uploads import EXAMPLES
from engine.storage import open_storage

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
RenderId = Annotated[
    str, PathParam(min_length=1, max_length=MAX_CLIENT_ID, pattern=r"^[A-Za-z0-9_-]+$")
]
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
"""Sent with every answer (API, page, files, errors)."""
_SUBMIT_BODY = submit_body()
_SUBMITTED = {
    200: {"model": RenderView, "description": "a repeat: the existing render"},
    202: {"model": RenderView, "description": "accepted; Location names the render"},
}
_SUBMIT_ERRORS = error_responses(400, 401, 409, 413, 415, 422, 429, 503)
_READ_ERRORS = error_responses(401, 404, 422, 503)


_bearer = HTTPBearer(auto_error=False, description="API token: Authorization: Bearer <token>")


def _owner(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> str:
    """The caller's owner name (401 for a missing or unknown token)."""
    header = f"Bearer {credentials.credentials}" if credentials is not None else None
    name = request.app.state.tokens.owner(header)
    if name is None:
        request.app.state.http_metrics.reject("auth")
        raise ApiError(401, "unauthorized", "missing or unknown bearer token")
    return str(name)


Owner = Annotated[str, Depends(_owner)]


def _binary(media_type: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"content": {media_type: {"schema": {"type": "string", "format": "binary"}}}},
        206: {"description": "partial content (Range)", "content": {media_type: {}}},
        **error_responses(409),
        416: {"description": "range not satisfiable", "content": {"text/plain": {}}},
        **_READ_ERRORS,
    }


def make_api(backend: Backend, args: ServeArgs) -> FastAPI:
    """The FastAPI app of the service."""
    app = FastAPI(
        title="Dancing Avatar render service",
        version="1",
        description="Submit, watch, download and cancel pose- and text-guided dance renders.",
        docs_url=None,  # Swagger UI / ReDoc load from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    tokens = TokenTable(args)
    metrics = HttpMetrics()
    app.state.tokens = tokens
    app.state.http_metrics = metrics
    _errors(app, metrics)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    async def submit(request: Request, who: str, render_id: str | None, key: str | None) -> Any:
        data, upload = await http.parse_submission(request, args.limits.max_body_bytes)
        view, created = await backend.call("submit", who, data, upload, render_id, key)
        headers = {"Location": view["links"]["self"]}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(view, status_code=202 if created else 200, headers=headers)

    @app.post("/v1/renders", status_code=202, responses={**_SUBMITTED, **_SUBMIT_ERRORS},
              openapi_extra=_SUBMIT_BODY, response_model=RenderView)  # fmt: skip
    async def create_render(
        request: Request,
        who: Owner,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Any:
        """Queue a render (JSON, or multipart with a pose upload) → 202 + Location."""
        return await submit(request, who, None, idempotency_key)

    @app.put("/v1/renders/{render_id}", status_code=202, response_model=RenderView,
             responses={**_SUBMITTED, **_SUBMIT_ERRORS}, openapi_extra=_SUBMIT_BODY)  # fmt: skip
    async def put_render(request: Request, render_id: RenderId, who: Owner) -> Any:
        """Queue a render under a client-chosen id (a repeat with the same body is a no-op)."""
        return await submit(request, who, render_id, None)

    @app.get("/v1/renders", response_model=RenderList, responses=_READ_ERRORS)
    async def list_renders(
        who: Owner,
        state: Annotated[list[State] | None, Query()] = None,
        cursor: Annotated[int | None, Query(ge=0, le=2**62)] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> Any:
        """The caller's renders, newest first; ``next_cursor`` pages to older ones."""
        return await backend.call("list", who, state, cursor, limit)

    @app.get("/v1/renders/{render_id}", response_model=RenderView, responses=_READ_ERRORS)
    async def get_render(render_id: RenderId, who: Owner) -> Any:
        """State, progress, ETA, error and links of one render."""
        return await backend.call("get", who, render_id)

    @app.post("/v1/renders/{render_id}/cancel", response_model=RenderView,
              responses=_READ_ERRORS)  # fmt: skip
    async def cancel_render(render_id: RenderId, who: Owner) -> Any:
        """Cancel a queued or running render (a no-op for finished ones); it stays listed."""
        return await backend.call("cancel", who, render_id)

    @app.delete("/v1/renders/{render_id}", status_code=204, response_class=Response,
                response_model=None, responses={204: {"description": "removed"}, **_READ_ERRORS})  # fmt: skip
    async def delete_render(render_id: RenderId, who: Owner) -> Any:
        """Cancel the render if needed and remove it: its files, its pose upload and its entry
        (then 404). Frames it used stay counted in the daily quota."""
        await backend.call("delete", who, render_id)
        return Response(status_code=204)

    @app.get("/v1/renders/{render_id}/events", response_class=http.EventStreamResponse,
             responses=_READ_ERRORS)  # fmt: skip
    async def render_events(
        request: Request,
        render_id: RenderId,
        who: Owner,
        last_event_id: Annotated[int | None, Header(ge=0, le=2**62)] = None,
        after: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    ) -> Any:
        """Server-sent events: stage changes and every finished frame; ``Last-Event-ID`` (or
        ``after``) replays what a reconnecting client missed; ``end`` closes the stream."""
        since = last_event_id if last_event_id is not None else after
        first = await backend.call("events", who, render_id, since)
        stream = http.event_stream(request, backend, who, render_id, since, poll_s=args.poll_s,
                                   max_s=args.stream_max_s, first=first)  # fmt: skip
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return http.EventStreamResponse(stream, headers=headers)

    # Downloads stream from the storage backend (a folder or an object store), opened by this
    # ingress itself: the engine deployment only says which key, so any node can serve them.
    storage = open_storage(args.engine_config().storage, args.root)

    async def artefact(
        request: Request, who: str, render_id: str, kind: str, media_type: str, index: int = 0,
        filename: str | None = None,
    ) -> Any:  # fmt: skip
        found = await backend.call("artefact", who, render_id, kind, index)
        return http.stored_response(storage, found["key"], found["size"], media_type,
                                    request.headers.get("range"), filename=filename)  # fmt: skip

    @app.get("/v1/renders/{render_id}/video", response_class=http.Mp4Response,
             responses=_binary("video/mp4"))  # fmt: skip
    async def render_video(request: Request, render_id: RenderId, who: Owner) -> Any:
        """The H.264 video (HTTP range requests supported)."""
        return await artefact(request, who, render_id, "video", "video/mp4",
                              filename=f"{render_id}.mp4")  # fmt: skip

    @app.get("/v1/renders/{render_id}/frames/{index}", response_class=http.PngResponse,
             responses=_binary("image/png"))  # fmt: skip
    async def render_frame(
        request: Request,
        render_id: RenderId,
        index: Annotated[int, PathParam(ge=0, le=100_000)],
        who: Owner,
    ) -> Any:
        """One finished frame (PNG)."""
        return await artefact(request, who, render_id, "frame", "image/png", index)

    @app.get("/v1/renders/{render_id}/contact-sheet", response_class=http.PngResponse,
             responses=_binary("image/png"))  # fmt: skip
    async def render_contact_sheet(request: Request, render_id: RenderId, who: Owner) -> Any:
        """Frames with the pose drawn over them (PNG)."""
        return await artefact(request, who, render_id, "contact-sheet", "image/png")

    @app.get("/v1/renders/{render_id}/metrics", response_class=http.JsonFileResponse,
             responses=_binary("application/json"))  # fmt: skip
    async def render_metrics(request: Request, render_id: RenderId, who: Owner) -> Any:
        """The render's metrics.json (requests with ``metrics: true``)."""
        return await artefact(request, who, render_id, "metrics", "application/json")

    _service_routes(app, backend, metrics, tokens)
    _page(app)
    exact_openapi(app, args, sorted(EXAMPLES), tokens.metrics_required)
    return app


def _service_routes(
    app: FastAPI, backend: Backend, metrics: HttpMetrics, tokens: TokenTable
) -> None:
    @app.get("/healthz", response_model=Health)
    async def healthz() -> Any:
        """The ingress process is up."""
        return {"status": "ok", "detail": {}}

    @app.get("/readyz", response_model=Health, responses=error_responses(503))
    async def readyz() -> Any:
        """Models built, store writable, engine loop stepping."""
        detail = await backend.call("health")
        if not detail["ready"]:
            raise ApiError(503, "not_ready", f"engine not ready: {detail}", None, 5)
        return {"status": "ready", "detail": detail}

    @app.get("/metrics", response_class=http.PrometheusResponse,
             responses=error_responses(401, 503))  # fmt: skip
    async def prometheus(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> Any:
        """Prometheus text: renders by state, frames, stage latencies, rejects by reason
        (service-wide counts; behind the metrics token when one is configured)."""
        if not tokens.metrics_allowed(credentials.credentials if credentials else None):
            metrics.reject("auth")
            raise ApiError(401, "unauthorized", "missing or unknown metrics token")
        text = await backend.call("metrics_text") + metrics.render()
        return Response(text, media_type=http.PrometheusResponse.media_type)

    @app.get("/v1/info", response_model=ServiceInfo, responses=error_responses(503))
    async def info() -> Any:
        """Presets, built-in pose examples and limits of this server."""
        return await backend.call("info")


def _page(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> Any:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Any:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


def _errors(app: FastAPI, metrics: HttpMetrics) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Any:
        if error.status in (413, 415, 400):
            metrics.reject(error.code)
        return http.error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Any:
        field, message = http.validation_field(list(error.errors()), "")
        metrics.reject("invalid")
        return http.error_response(ApiError(422, "invalid", message, field))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Any:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        headers = dict(error.headers or {})
        if error.status_code == 405:  # every method of the path, not only one route's
            headers["Allow"] = ", ".join(_allowed(app, request.url.path))
        return http.error_response(ApiError(error.status_code, code, str(error.detail)), headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> Any:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return http.error_response(ApiError(500, "internal", "internal error; see the server log"))


def _allowed(app: FastAPI, path: str) -> list[str]:
    """The methods of every route matching ``path`` (the Allow of a 405)."""
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path_regex.match(path):
            methods |= route.methods
    return sorted(methods)
