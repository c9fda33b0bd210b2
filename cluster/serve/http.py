"""HTTP helpers of the ingress: bounded body reading, request parsing (JSON or multipart),
error answers in the API's shape, typed file responses and the server-sent event stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from cluster.serve.api import ApiError, RenderRequest
from cluster.serve.backend import Backend
from cluster.serve.uploads import parse_json
from engine.storage import Storage


class Mp4Response(FileResponse):
    media_type = "video/mp4"


class PngResponse(FileResponse):
    media_type = "image/png"


class JsonFileResponse(FileResponse):
    media_type = "application/json"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single ``Range: bytes=…`` header (``a-b``, ``a-``, ``-n``);
    None for no header, another unit or several ranges (answered whole).

    Raises:
        ValueError: the range cannot be satisfied (answered 416).
    """
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first_s, sep, last_s = header[len("bytes=") :].strip().partition("-")
    if not sep or not (first_s or last_s):
        return None
    try:
        if not first_s:  # the last n bytes
            n = int(last_s)
            if n <= 0:
                raise ValueError("empty suffix range")
            return max(0, size - n), size - 1
        first = int(first_s)
        last = min(int(last_s), size - 1) if last_s else size - 1
    except ValueError:
        raise ValueError(f"range {header!r} is not satisfiable") from None
    if first >= size or first > last or first < 0:
        raise ValueError(f"range {header!r} is not satisfiable for {size} bytes")
    return first, last


def stored_response(
    storage: Storage,
    key: str,
    size: int,
    media_type: str,
    range_header: str | None,
    *,
    filename: str | None = None,
    chunk: int = 1 << 20,
) -> Response:
    """Stream ``key`` from the storage backend (a local folder or an object store, read in
    1 MiB chunks on a worker thread), honouring one HTTP byte range (206 / 416)."""
    headers = {"Accept-Ranges": "bytes"}
    if filename:
        headers["Content-Disposition"] = f'inline; filename="{filename}"'
    try:
        span = parse_range(range_header, size)
    except ValueError:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    first, last = span if span is not None else (0, size - 1)

    def body() -> Iterator[bytes]:
        with storage.open(key) as file:
            file.seek(first)
            left = last - first + 1
            while left > 0:
                data = file.read(min(chunk, left))
                if not data:
                    raise OSError(f"{key} ended {left} bytes early")
                left -= len(data)
                yield data

    headers["Content-Length"] = str(max(0, last - first + 1))
    if span is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    status = 206 if span is not None else 200
    return StreamingResponse(body(), status_code=status, media_type=media_type, headers=headers)


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


class PrometheusResponse(StreamingResponse):
    media_type = "text/plain; version=0.0.4; charset=utf-8"


def error_response(error: ApiError, extra: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(extra or {})
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def validation_field(errors: list[Any], prefix: str) -> tuple[str, str]:
    """(field, message) of the first pydantic/FastAPI validation error."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ())]
    if prefix and (not loc or loc[0] != prefix):
        loc = [prefix, *loc]
    field = ".".join(loc) or None
    return field or "body", f"{field}: {first.get('msg', 'invalid')}"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, 413 past ``limit`` bytes (checked while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"the body has {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # let request.form() parse what was read
    return body


async def parse_submission(request: Request, limit: int) -> tuple[dict[str, Any], bytes | None]:
    """(request fields, pose upload) of a POST/PUT: JSON, or multipart with parts ``request``
    (the JSON) and ``poses`` (the file). Validates the fields (422 naming the field)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limit)
    upload: bytes | None = None
    if kind == "application/json":
        data = _json(body, "body")
    elif kind == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as e:
            raise ApiError(400, "bad_multipart", f"cannot parse the multipart body: {e}") from None
        part = form.get("request")
        if not isinstance(part, str):
            raise ApiError(
                422, "missing", "multipart part 'request' (JSON text) is required", "request"
            )
        data = _json(part.encode(), "request")
        file = form.get("poses")
        if file is None or isinstance(file, str):
            raise ApiError(422, "missing", "multipart part 'poses' (a file) is required", "poses")
        upload = await file.read()
        await form.close()
    else:
        raise ApiError(
            415, "unsupported_media_type",
            f"content type {kind or '(none)'!r}: send application/json or multipart/form-data",
        )  # fmt: skip
    try:
        req = RenderRequest.model_validate(data)
    except ValidationError as e:
        field, message = validation_field(
            e.errors(), "body" if kind == "application/json" else "request"
        )
        raise ApiError(422, "invalid", message, field) from None
    return req.model_dump(mode="json", exclude_none=True), upload


def _json(raw: bytes, field: str) -> dict[str, Any]:
    data = parse_json(raw, field, 400, "bad_json")
    if not isinstance(data, dict):
        raise ApiError(422, "invalid", f"{field} must be a JSON object", field)
    return data


def sse(event: dict[str, Any]) -> str:
    data = json.dumps(event, separators=(",", ":"))
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {data}\n\n"


async def event_stream(
    request: Request,
    backend: Backend,
    owner: str,
    render_id: str,
    after: int | None,
    *,
    poll_s: float,
    max_s: float,
    first: dict[str, Any],
) -> AsyncIterator[str]:
    """Replay the render's events after ``after``, then follow it until it ends (``end``)."""
    start = last_sent = time.monotonic()
    result = first
    yield "retry: 2000\n\n"
    while True:
        for event in result["events"]:
            yield sse(event)
            after = event["seq"]
            last_sent = time.monotonic()
        if result["final"] and not result["events"]:
            yield f"event: end\ndata: {json.dumps({'state': result['state']})}\n\n"
            return
        if time.monotonic() - start > max_s or await request.is_disconnected():
            return
        if time.monotonic() - last_sent > 15:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if not result["events"]:
            await asyncio.sleep(poll_s)
        try:
            result = await backend.call("events", owner, render_id, after)
        except ApiError:
            return
