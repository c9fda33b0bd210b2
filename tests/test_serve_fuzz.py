"""Fuzz the service's OpenAPI schema with schemathesis and every check (``--checks all``: server
errors, status codes, content types, headers, response schemas, SSE events, Allow, auth,
schema-valid data accepted, schema-invalid data rejected, and the stateful checks: a created
render is there, a deleted one is gone) over HTTP against the app on 127.0.0.1, over a paused
tiny-preset core (renders are stored, never rendered). Zero failures allowed.

A fixed seed and a time bound; ``FUZZ_EXAMPLES`` examples per operation (default 10: ~600
requests, CPU is scarce). The large run is the same test with ``FUZZ_EXAMPLES=400
FUZZ_MIN_CASES=5000``. Per-operation settings: ``tests/schemathesis.toml``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("schemathesis")
uvicorn = pytest.importorskip("uvicorn")
from serve_helpers import TOKENS, make_args  # noqa: E402

from cluster.serve.app import make_api  # noqa: E402
from cluster.serve.backend import LocalBackend  # noqa: E402
from cluster.serve.service import RenderService  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10"))
MIN_CASES = int(os.environ.get("FUZZ_MIN_CASES", "400"))
"""Fewest test cases the run must generate (each one request or, stateful, a chain of them)."""
SEED = 20
TIME_BOUND_S = float(os.environ.get("FUZZ_TIME_BOUND_S", "600"))
HERE = Path(__file__).parent


class _NoExecutor:
    """A paused core never asks its executor for work; building none keeps this fast."""

    name = "none"

    def release(self, render_id: str) -> None:
        pass

    def close(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    args = make_args(
        root,
        paused=True,
        stream_max_s=0.5,
        limits={"max_body_bytes": 256 * 1024},
        set=["cluster.max_queued=100000"],
        quotas={"max_concurrent": 10_000, "frames_per_day": 10_000_000},
    )
    service = RenderService(args, _NoExecutor())  # type: ignore[arg-type]
    port = _free_port()
    config = uvicorn.Config(make_api(LocalBackend(service), args), host="127.0.0.1", port=port,
                            log_level="warning")  # fmt: skip
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not http.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    http.should_exit = True
    thread.join(timeout=30)
    service.close()


def test_schemathesis_every_check_zero_failures(server, tmp_path):
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli is not None, "schemathesis CLI not installed next to this Python"
    cmd = [
        cli, "--config-file", str(HERE / "schemathesis.toml"), "run", f"{server}/openapi.json",
        "--checks", "all", "--seed", str(SEED), "--max-examples", str(EXAMPLES),
        "--max-response-time", "10", "--header", f"Authorization: Bearer {TOKENS['alice']}",
        "--workers", "1", "--no-color",
    ]  # fmt: skip
    start = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIME_BOUND_S, cwd=tmp_path)
    seconds = time.monotonic() - start
    out = run.stdout + run.stderr
    generated = re.search(r"(\d+) generated", out)
    print(f"schemathesis: {generated.group(0) if generated else '?'} in {seconds:.0f} s")
    assert run.returncode == 0, out[-6000:]  # schemathesis exits 1 on any failure
    assert generated is not None and int(generated.group(1)) >= MIN_CASES, out[-2000:]
