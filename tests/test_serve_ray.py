"""The real Serve app (ingress + engine deployment with the Ray executor) on a local Ray instance
bound to 127.0.0.1: submit over HTTP, download the video; kill the engine replica mid-render and
the render still finishes (the restarted replica's core resumes it from the store)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from serve_helpers import ENGINE, TOKENS, auth, body  # noqa: E402

from engine.video import probe_video  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from cluster.serve.config import ServeArgs
    from cluster.serve.local import start, stop

    root = tmp_path_factory.mktemp("serve")
    args = ServeArgs(
        storage=root,
        port=free_port(),
        tokens=[{"name": "alice", "token": TOKENS["alice"]}],
        set=[*ENGINE, f"cache_dir={root / 'cache'}"],
        poll_s=0.2,
    )
    url = start(args, ready_timeout_s=240, num_cpus=2)
    yield url, root
    stop()
    ray.shutdown()


def wait_state(client, render_id: str, states: set[str], timeout_s: float) -> dict:
    deadline, view = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        r = client.get(f"/v1/renders/{render_id}", headers=auth("alice"))
        if r.status_code == 200:
            view = r.json()
            if view["state"] in states:
                return view
        time.sleep(0.3)
    raise AssertionError(f"render {render_id} not in {states} after {timeout_s} s: {view}")


def test_submit_over_http_and_download(app_url, tmp_path: Path):
    url, _ = app_url
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/renders", json=body(seed=1), headers=auth("alice"))
        assert r.status_code == 202, r.text
        view = wait_state(client, r.json()["id"], {"done", "failed"}, timeout_s=180)
        assert view["state"] == "done", view
        video = client.get(f"/v1/renders/{view['id']}/video", headers=auth("alice"))
        assert video.status_code == 200
        (tmp_path / "v.mp4").write_bytes(video.content)
        assert probe_video(tmp_path / "v.mp4")["frames"] == 3
        assert client.get("/v1/renders", headers={}).status_code == 401


def test_engine_replica_killed_mid_render_finishes(app_url):
    from ray import serve

    url, root = app_url
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/renders", json={**body(frames=12), "steps": 4}, headers=auth("alice"))
        render_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while wait_state(client, render_id, {"rendering"}, 120)["frames_done"] < 1:
            assert time.monotonic() < deadline, "no frame persisted within 120 s"
            time.sleep(0.1)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "Engine" in a["name"] and "avatar" in a["name"]]  # fmt: skip
        assert replicas, "no engine replica found"
        actor = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
        ray.kill(actor, no_restart=True)  # Serve's controller starts a new replica
        view = wait_state(client, render_id, {"done", "failed"}, timeout_s=240)
        assert view["state"] == "done", view
        manifest = json.loads((root / render_id / "manifest.json").read_text())
        assert 1 <= manifest["resumed_from"] < 12  # resumed, not redone
        assert probe_video(root / render_id / "video.mp4")["frames"] == 12
    assert serve.status().applications["avatar"].status == "RUNNING"
