"""The real Serve app (2 ingress replicas + the engine deployment with the Ray executor) on a local
Ray instance bound to 127.0.0.1: submit over HTTP, download the video; both ingress replicas
answer, and a render submitted through one downloads (whole and by range) through the other;
kill the engine replica mid-render and the render still finishes (the restarted replica's core
resumes it from the store)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

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
        ingress={"replicas": 2},
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


def test_two_ingress_replicas_serve_any_render(app_url):
    """Serve spreads requests over both ingress replicas (each names itself in X-Avatar-Replica);
    the render submitted through one is downloaded through the other, by range too, and the
    bytes agree (downloads stream from the storage backend, not from a replica's disk)."""
    url, _ = app_url
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/renders", json=body(seed=5), headers=auth("alice"))
        assert r.status_code == 202, r.text
        submitted_via = r.headers["x-avatar-replica"]
        view = wait_state(client, r.json()["id"], {"done", "failed"}, timeout_s=180)
        assert view["state"] == "done", view
        video = f"/v1/renders/{view['id']}/video"
        whole: dict[str, bytes] = {}
        ranged: dict[str, bytes] = {}
        for _ in range(80):  # the proxy picks a replica per request
            full = client.get(video, headers=auth("alice"))
            part = client.get(video, headers={**auth("alice"), "Range": "bytes=100-299"})
            assert full.status_code == 200 and part.status_code == 206, (full, part)
            whole.setdefault(full.headers["x-avatar-replica"], full.content)
            ranged.setdefault(part.headers["x-avatar-replica"], part.content)
            if len(whole) == 2 and len(ranged) == 2:
                break
        assert len(whole) == 2 and len(ranged) == 2, (whole.keys(), ranged.keys())
        assert submitted_via in whole  # and the other replica served it as well
        a, b = whole.values()
        assert a == b and len(a) > 300
        assert all(p == a[100:300] for p in ranged.values())


def engine_replica() -> Any:
    """The engine replica's process (Ray titles it ``ray::ServeReplica:avatar:Engine``)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any("ServeReplica:avatar:Engine" in part for part in proc.info["cmdline"] or ()):
            return proc
    raise AssertionError("no engine replica process found")


def test_hostile_uploads_leave_the_engine_replica_flat(app_url, tmp_path: Path):
    """Decode bombs over HTTP: refused by header (10000x10000 GIF) or accepted and decoded in
    the bounded child (2048x2048 x 12 GIF, 150 MB of frames); the engine replica's RSS, sampled
    every 50 ms until the render failed, grows by less than 100 MB."""
    sys.path.insert(0, str(Path(__file__).parent))
    from hostile import crafted_gif, honest_gif

    url, _ = app_url
    honest_gif(tmp_path / "big.gif", 2048, 12)
    uploads = {
        "bomb.gif": crafted_gif(10000, 10000, 4),
        "big.gif": (tmp_path / "big.gif").read_bytes(),
    }
    engine = engine_replica()
    start, peak, statuses = engine.memory_info().rss, 0, {}
    request = json.dumps({"prompt": "a dancer", "steps": 2})
    with httpx.Client(base_url=url, timeout=30) as client:
        for name, data in uploads.items():
            t0 = time.perf_counter()
            files = {"request": (None, request), "poses": (name, data)}
            r = client.post("/v1/renders", files=files, headers=auth("alice"))
            statuses[name] = (r.status_code, round(time.perf_counter() - t0, 3))
            assert r.status_code == (422 if name == "bomb.gif" else 202), r.text
        render_id = r.json()["id"]
        deadline = time.monotonic() + 180
        while client.get(f"/v1/renders/{render_id}", headers=auth("alice")).json()["state"] not in (
            "failed", "done"):  # fmt: skip
            peak = max(peak, engine.memory_info().rss - start)
            assert time.monotonic() < deadline, "the accepted upload did not end in 180 s"
            time.sleep(0.05)
        view = client.get(f"/v1/renders/{render_id}", headers=auth("alice")).json()
    print(f"hostile over HTTP: {statuses}; engine replica RSS growth peak {peak >> 20} MB")
    assert view["state"] == "failed" and "black" in view["error"], view
    assert peak < 100 << 20, (peak >> 20, statuses)


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
        (folder,) = root.glob(f"*{render_id}")  # the store id: owner tag + id
        manifest = json.loads((folder / "manifest.json").read_text())
        assert 1 <= manifest["resumed_from"] < 12  # resumed, not redone
        assert probe_video(folder / "video.mp4")["frames"] == 12
    assert serve.status().applications["avatar"].status == "RUNNING"
