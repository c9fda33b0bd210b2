"""Start the service on a local Ray instance (``avatar serve``, tests, benchmarks/serve.py)."""

from __future__ import annotations

import json
import os
import secrets
import time
import urllib.error
import urllib.request
from typing import Any

from cluster.serve.config import ServeArgs, env_tokens

APP_NAME = "avatar"


def ensure_token(args: ServeArgs) -> str | None:
    """With auth on and no token configured, make one (``local:<token>`` in the environment,
    inherited by the Ray workers started after this) and return it; else None."""
    if not args.auth or env_tokens(args):
        return None
    token = secrets.token_urlsafe(24)
    os.environ[args.tokens_env] = f"local:{token}"
    return token


def start(args: ServeArgs, *, ready_timeout_s: float = 180.0, num_cpus: int | None = None) -> str:
    """ray.init (local, 127.0.0.1) + serve.run of the app; waits for /readyz → base URL."""
    import ray
    from ray import serve

    from cluster.serve.build import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(
            address="local",  # a new instance: never join a cluster someone else started here
            num_cpus=num_cpus,
            include_dashboard=False,
            ignore_reinit_error=True,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{args.host}:{args.port}"
    wait_ready(url, ready_timeout_s)
    return url


def wait_ready(url: str, timeout_s: float) -> dict[str, Any]:
    """Poll ``url``/readyz until 200; TimeoutError naming the last answer."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (OSError, ValueError) as e:
            last = type(e).__name__
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz not ready after {timeout_s:.0f} s (last: {last})")


def stop() -> None:
    from ray import serve

    serve.shutdown()
