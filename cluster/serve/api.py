"""Request and response models of the HTTP API (``/v1``), and its one error shape.

Every error answers ``{"error": {"code", "message", "field"}}``; ``field`` names the request
field at fault (``body.prompt``, ``query.limit``, ``poses``, …) or is null.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.core.store import State


class ApiError(Exception):
    """An HTTP error in the API's shape (raised by the service, answered by the ingress)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        retry_after_s: int | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field, self.retry_after_s = field, retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}

    def __reduce__(self) -> Any:  # picklable across Serve handles
        return (
            ApiError,
            (self.status, self.code, self.message, self.field, self.retry_after_s),
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Alignment(_Strict):
    """The paper's three alignment modules."""

    intra_frame: bool = False
    """Per-character appearance LoRA (slower: trains an adapter first)."""
    background: bool = False
    """Hold the background to a generated plate."""
    inter_frame: Literal["kv", "latent", "kv+latent", "none"] = "latent"
    """How frame t is guided by frame t-1 and anchor frame 0."""


class RenderRequest(_Strict):
    """A render to make. Poses come inline (``poses``), from a built-in example (``example``)
    or, with ``multipart/form-data``, as an uploaded file (part ``poses``; this JSON without
    ``poses`` goes in part ``request``)."""

    prompt: str = Field(min_length=1, max_length=10_000)
    """The coarse text prompt (the server's limit applies: ``limits.max_prompt_chars``)."""
    negative_prompt: str | None = Field(default=None, max_length=10_000)
    """Negative prompt (default: the preset's)."""
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    fps: float | None = Field(default=None, ge=1.0, le=120.0)
    """Output fps (default: the pose sequence's)."""
    width: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)
    steps: int | None = Field(default=None, ge=1, le=1000)
    """Denoising steps per frame (default: the preset's; limit ``limits.max_steps``)."""
    guidance: float | None = Field(default=None, ge=1.0, le=50.0)
    alignment: Alignment = Field(default_factory=Alignment)
    character: str | None = Field(default=None, max_length=32)
    """A character LoRA from the server's allow-list (GET /v1/info ``characters``) that drives
    the appearance instead of a trained one (turns on ``alignment.intra_frame``)."""
    preset: str | None = Field(default=None, max_length=64)
    """Defaults from one of the presets the server allows (GET /v1/info)."""
    metrics: bool = False
    """Score the finished render (metrics.json, GET …/metrics)."""
    example: str = Field(default=None, max_length=64)  # type: ignore[assignment]
    """A built-in pose sequence by name (GET /v1/info lists them); absent, never null."""
    poses: dict[str, Any] | list[Any] = None  # type: ignore[assignment]
    """Inline poses: our poses.json object, or OpenPose JSON (an object with ``people`` or a
    list of them, one per frame); absent, never null."""


class Links(BaseModel):
    self: str
    events: str
    cancel: str
    """POST here to cancel (DELETE on ``self`` removes the render)."""
    video: str
    contact_sheet: str
    metrics: str
    frames: str
    """Prefix of the frames: append a frame index (0, 1, …)."""


class RenderView(BaseModel):
    """A render as the API shows it."""

    id: str
    state: State
    prompt: str
    """The request's prompt."""
    width: int
    height: int
    frames_done: int
    frames_total: int
    progress: float
    """frames_done / frames_total in [0, 1] (1 only when done)."""
    eta_s: float | None
    attempts: int
    error: str | None
    error_kind: str | None
    """``input`` (fix the request) or ``infra`` (retried, then given up) for failed renders."""
    created: float
    updated: float
    links: Links


class RenderList(BaseModel):
    renders: list[RenderView]
    next_cursor: int | None
    """Pass as ``cursor`` for the next (older) page; null on the last page."""


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str
    detail: dict[str, Any] = Field(default_factory=dict)


class ServiceInfo(BaseModel):
    presets: list[str]
    characters: list[str] = Field(default_factory=list)
    """Character LoRAs a request may name (``character``)."""
    examples: list[str]
    limits: dict[str, int]


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries of the error shape."""
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {c: {"description": _REASONS.get(c, "error"), "content": content} for c in codes}


_REASONS = {
    400: "bad request (header, content)",
    401: "missing or unknown bearer token",
    404: "no such render for this token",
    405: "method not allowed (Allow names the methods)",
    409: "the id exists with another request body, or the render has no such file yet",
    413: "request body too large",
    415: "unsupported media type",
    422: "invalid field (named in error.field)",
    429: "quota exceeded (Retry-After)",
    503: "render queue full or service not ready (Retry-After)",
}
