"""Fuzz the OpenAPI schema (schemathesis) against the ASGI app in process, over a paused
tiny-preset core (renders are stored, never rendered): every generated request must answer
without a 5xx, with a documented status, content type, headers and a body matching the schema.

``FUZZ_EXAMPLES`` per operation (default 160 × 14 operations); the last test asserts that at least
2,000 requests were sent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serve_helpers import TOKENS, make_args  # noqa: E402

from cluster.serve.app import make_api  # noqa: E402
from cluster.serve.backend import LocalBackend  # noqa: E402
from cluster.serve.service import RenderService  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "160"))
MIN_REQUESTS = 2000
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
SENT = {"requests": 0}


class _NoExecutor:
    """A paused core never asks its executor for anything; building none keeps this fast."""

    name = "none"

    def close(self) -> None:
        pass


def _app():
    root = Path(tempfile.mkdtemp(prefix="avatar-fuzz-"))
    args = make_args(root, paused=True, stream_max_s=0.5, limits={"max_body_bytes": 256 * 1024})
    service = RenderService(args, _NoExecutor())  # type: ignore[arg-type]
    return make_api(LocalBackend(service), args)


APP = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api_conforms_to_its_schema(case):
    token = TOKENS["alice"] if SENT["requests"] % 5 else "wrong"
    SENT["requests"] += 1
    # call_and_validate raises on any failed check (status, content type, headers, schema, 5xx)
    response = case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)
    assert response.status_code < 500, (case.method, case.path, response.status_code)


def test_enough_requests_were_fuzzed():
    if EXAMPLES < 160:
        pytest.skip(f"FUZZ_EXAMPLES={EXAMPLES} (reduced run)")
    assert SENT["requests"] >= MIN_REQUESTS, SENT
