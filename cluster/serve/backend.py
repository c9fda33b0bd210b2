"""How the HTTP layer reaches the render service: in process (tests, ``paused`` fuzzing) or
through a Ray Serve ``DeploymentHandle`` to the engine deployment.

Across a handle the service's :class:`ApiError` travels as a value (``{"__api_error__": …}``),
never as a remote exception; so does any other exception of the service (a 500). Only a call the
handle itself cannot complete (replica lost, restarting, overloaded) becomes a 503 with
Retry-After.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Protocol

import anyio

from cluster.serve.api import ApiError

log = logging.getLogger(__name__)
ERROR_KEY = "__api_error__"


class Backend(Protocol):
    async def call(self, method: str, *args: Any) -> Any: ...


class LocalBackend:
    """Calls a :class:`~cluster.serve.service.RenderService` of this process on a worker thread."""

    def __init__(self, service: Any):
        self.service = service

    async def call(self, method: str, *args: Any) -> Any:
        result = await anyio.to_thread.run_sync(
            functools.partial(wrap_errors, getattr(self.service, method), *args)
        )
        if isinstance(result, dict) and ERROR_KEY in result:
            raise ApiError(*result[ERROR_KEY])
        return result


def wrap_errors(fn: Any, *args: Any) -> Any:
    """Run ``fn`` and turn an ApiError into a value (engine deployment side). Any other
    exception is a bug: logged here with its traceback, answered as a 500 without one, never as
    the 503 + Retry-After that means "the engine is unavailable" (a client would retry forever)."""
    try:
        return fn(*args)
    except ApiError as e:
        return {ERROR_KEY: [e.status, e.code, e.message, e.field, e.retry_after_s]}
    except Exception:
        log.exception("engine method %s failed", getattr(fn, "__name__", fn))
        return {ERROR_KEY: [500, "internal", "internal error; see the server log", None, None]}


class HandleBackend:
    """Calls the engine deployment through its handle."""

    def __init__(self, handle: Any, retry_after_s: int):
        self.handle = handle
        self.retry_after_s = retry_after_s

    async def call(self, method: str, *args: Any) -> Any:
        try:
            result = await getattr(self.handle, method).remote(*args)
        except Exception as e:  # replica lost, restarting, or overloaded
            log.warning("engine deployment call %s failed: %s", method, type(e).__name__)
            raise ApiError(
                503, "engine_unavailable",
                "the engine is restarting or overloaded; retry shortly", None, self.retry_after_s,
            ) from None  # fmt: skip
        if isinstance(result, dict) and ERROR_KEY in result:
            raise ApiError(*result[ERROR_KEY])
        return result
