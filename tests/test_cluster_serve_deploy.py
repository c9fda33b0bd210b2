"""The Serve config of cluster/deploy/rayservice.yaml, deployed the way ``serve deploy`` and
KubeRay deploy it (Serve's controller imports the app from ``import_path`` and applies the
config's per-deployment options), on a local Ray instance: the Ingress runs its 2 minimum
autoscaled replicas, the Engine lands on the node with the custom resource ``avatar_index``, and
/readyz answers. Only what cannot run here is swapped: the model preset (tiny), the S3 bucket and
the index path (a temporary folder), host and port. Slow (about 2 min here): AVATAR_SLOW_TESTS=1."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
RAYSERVICE = ROOT / "cluster" / "deploy" / "rayservice.yaml"
pytestmark = pytest.mark.skipif(
    not os.environ.get("AVATAR_SLOW_TESTS"),
    reason="a Ray instance + Serve with 3 replicas: 112 s on 2 busy cores; AVATAR_SLOW_TESTS=1",
)


def local_config(root: Path, port: int) -> dict:
    service = yaml.safe_load(RAYSERVICE.read_text())
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    app["args"].update(storage={"root": str(root)}, preset="tiny", presets=["tiny"],
                       set=["sampler.steps=2"], executor="inprocess")  # fmt: skip
    # The controller imports the app in a worker: this checkout first on its path.
    app["runtime_env"] = {"env_vars": {"PYTHONPATH": str(ROOT)}}
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_rayservice_serve_config_deploys(tmp_path: Path) -> None:
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from cluster.serve.local import wait_ready

    port = free_port()
    config = ServeDeploySchema.model_validate(local_config(tmp_path / "index", port))
    os.environ["AVATAR_SERVE_TOKENS"] = "alice:a-token-for-the-test"  # inherited by the workers
    ray.init(address="local", num_cpus=2, resources={"avatar_index": 1}, include_dashboard=False,
             log_to_driver=False, _node_ip_address="127.0.0.1")  # fmt: skip
    try:
        client = serve_start(http_options=config.http_options.model_dump(),
                             proxy_location=config.proxy_location)  # fmt: skip
        client.deploy_apps(config)
        health = wait_ready(f"http://127.0.0.1:{port}", timeout_s=300)
        assert health, health
        deadline, replicas = time.monotonic() + 120, {}
        while time.monotonic() < deadline:
            app = serve.status().applications["avatar"]
            replicas = {name: d.replica_states for name, d in app.deployments.items()}
            if replicas["Ingress"].get("RUNNING") == 2:
                break
            time.sleep(0.5)
        assert replicas["Ingress"].get("RUNNING") == 2, replicas
        assert replicas["Engine"].get("RUNNING") == 1, replicas
        assert ray.available_resources().get("avatar_index", 0) == 0  # taken by the Engine
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("AVATAR_SERVE_TOKENS", None)
