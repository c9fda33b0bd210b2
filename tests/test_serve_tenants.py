"""Tenants that cannot see each other, cancel vs delete, retention, storage quotas, and the
headers and errors every answer carries. In process (TestClient) over a tiny-preset core."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from serve_helpers import TOKENS, auth, body, make_args, make_client, wait_state

from cluster.serve.api import ApiError
from cluster.serve.app import SECURITY_HEADERS
from cluster.serve.backend import HandleBackend, wrap_errors


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_chain):
    args = make_args(tmp_path_factory.mktemp("tenants"), metrics_sha256=_sha("metrics-token"))
    client, service = make_client(args, tiny_chain)
    client.root = args.root  # type: ignore[attr-defined]
    yield client
    service.close()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_idempotency_ids_cannot_be_squatted(live):
    """Under the old scheme ids were k + sha256(owner, key): bob could take alice's next id."""
    guessed = "k" + _sha("alice\0order-1")[:31]
    squat = live.put(f"/v1/renders/{guessed}", json=body(seed=1), headers=auth("bob"))
    assert squat.status_code == 202
    mine = live.post("/v1/renders", json=body(seed=2),
                     headers={**auth("alice"), "Idempotency-Key": "order-1"})  # fmt: skip
    assert mine.status_code == 202, mine.text
    assert mine.json()["id"] != guessed
    for who, rid in (("bob", guessed), ("alice", mine.json()["id"])):
        assert live.delete(f"/v1/renders/{rid}", headers=auth(who)).status_code == 204


def test_another_tokens_id_answers_like_a_free_one(live):
    mine = live.put("/v1/renders/shared-name", json=body(seed=3), headers=auth("alice"))
    assert mine.status_code == 202
    for path in ("/v1/renders/shared-name", "/v1/renders/free-name"):
        r = live.get(path, headers=auth("bob"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = live.post(f"{path}/cancel", headers=auth("bob"))
        assert r.status_code == 404
    theirs = live.put("/v1/renders/shared-name", json=body(seed=4), headers=auth("bob"))
    assert theirs.status_code == 202 and theirs.json()["id"] == "shared-name"
    assert live.get("/v1/renders/shared-name", headers=auth("alice")).json()["state"] in (
        "queued", "rendering", "refining", "encoding", "done")  # fmt: skip
    for who in ("alice", "bob"):
        assert live.delete("/v1/renders/shared-name", headers=auth(who)).status_code == 204


def test_cancel_keeps_delete_removes(live):
    r = live.post("/v1/renders", json=body(seed=5), headers=auth("alice"))
    render_id = r.json()["id"]
    view = wait_state(live, render_id, "alice", {"done", "failed"})
    assert view["state"] == "done" and view["prompt"] == "a woman dancing"
    cancelled = live.post(f"/v1/renders/{render_id}/cancel", headers=auth("alice"))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "done"  # no-op
    folders = list(live.root.glob(f"*{render_id}")) + list(live.root.glob(f".uploads/*{render_id}"))
    assert len(folders) == 2 and (folders[0] / "video.mp4").is_file()
    gone = live.delete(f"/v1/renders/{render_id}", headers=auth("alice"))
    assert gone.status_code == 204 and gone.content == b""
    assert not any(f.exists() for f in folders)
    for path in ("", "/video", "/events", "/frames/0"):
        assert live.get(f"/v1/renders/{render_id}{path}", headers=auth("alice")).status_code == 404
    assert live.delete(f"/v1/renders/{render_id}", headers=auth("alice")).status_code == 404
    listed = live.get("/v1/renders?limit=100", headers=auth("alice")).json()["renders"]
    assert render_id not in [v["id"] for v in listed]


def test_security_headers_on_every_answer(live):
    answers = [
        live.get("/"),
        live.get("/static/app.js"),
        live.get("/favicon.ico"),
        live.get("/openapi.json"),
        live.get("/v1/info", headers=auth("alice")),
        live.get("/v1/renders"),  # 401
        live.get("/v2/nothing"),  # 404
        live.patch("/v1/renders", headers=auth("alice")),  # 405
    ]
    for r in answers:
        for name, value in SECURITY_HEADERS.items():
            assert r.headers.get(name) == value, (r.request.url, r.status_code, name)
    assert answers[2].status_code == 200 and answers[2].headers["content-type"].startswith(
        "image/svg")  # fmt: skip
    assert answers[-1].status_code == 405 and "POST" in answers[-1].headers["allow"]


def test_metrics_behind_its_token(live):
    assert live.get("/metrics").status_code == 401
    assert live.get("/metrics", headers=auth("alice")).status_code == 401  # an API token is not it
    ok = live.get("/metrics", headers={"Authorization": "Bearer metrics-token"})
    assert ok.status_code == 200 and "avatar_deletes_total" in ok.text


def test_a_service_bug_is_a_500_not_a_retry_loop():
    def broken() -> None:
        raise IndexError("a bug")

    class Handle:
        class call_broken:  # mimics a DeploymentHandle method
            @staticmethod
            def remote(*args):
                async def result():
                    return wrap_errors(broken)

                return result()

    import asyncio

    with pytest.raises(ApiError) as caught:
        asyncio.run(HandleBackend(Handle(), 5).call("call_broken"))
    assert caught.value.status == 500 and caught.value.retry_after_s is None
    assert "a bug" not in caught.value.message


def test_retention_and_storage_quota(tmp_path: Path, tiny_chain):
    tokens = [
        {"name": "alice", "token": TOKENS["alice"]},
        {"name": "bob", "token": TOKENS["bob"], "retention_days": 365},
        {"name": "carol", "token": TOKENS["carol"], "max_storage_bytes": 1},
    ]
    storage = {"root": tmp_path, "retention_days": 3 / 86_400, "retention_check_s": 1}
    client, service = make_client(make_args(tmp_path, storage=storage, tokens=tokens), tiny_chain)
    try:
        ids = {}
        for who in ("alice", "bob", "carol"):
            r = client.post("/v1/renders", json=body(frames=2), headers=auth(who))
            assert r.status_code == 202, r.text
            ids[who] = r.json()["id"]
            wait_state(client, ids[who], who, {"done"})
        full = client.post("/v1/renders", json=body(frames=2), headers=auth("carol"))
        assert full.status_code == 429 and "storage quota" in full.json()["error"]["message"]
        deadline = time.monotonic() + 30
        while client.get(f"/v1/renders/{ids['alice']}", headers=auth("alice")).status_code != 404:
            assert time.monotonic() < deadline, "retention did not remove alice's render in 30 s"
            time.sleep(0.5)
        assert not list(tmp_path.glob(f"*{ids['alice']}"))
        assert client.get(f"/v1/renders/{ids['bob']}", headers=auth("bob")).status_code == 200
    finally:
        service.close()


def test_same_poses_inline_or_uploaded_are_one_request(live):
    """JSON uploads are made canonical: the same poses by either route replay one render."""
    import json

    request = body(seed=9)
    headers = {**auth("alice"), "Idempotency-Key": "same-poses"}
    inline = live.post("/v1/renders", json=request, headers=headers)
    upload = json.dumps(request.pop("poses"), indent=2).encode()  # other bytes, same poses
    files = {"request": (None, json.dumps(request)), "poses": ("poses.json", upload)}
    again = live.post("/v1/renders", files=files, headers=headers)
    assert (inline.status_code, again.status_code) == (202, 200), again.text
    assert again.json()["id"] == inline.json()["id"]
    assert (
        live.delete(f"/v1/renders/{inline.json()['id']}", headers=auth("alice")).status_code == 204
    )


def test_serve_package_imports_top_down():
    """No import circle in cluster/serve (imports inside functions count too)."""
    import ast

    package = Path(__file__).resolve().parents[1] / "cluster" / "serve"
    graph: dict[str, set[str]] = {}
    for file in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cluster.serve"):
                names.add(node.module.rsplit(".", 1)[-1])
                names.update(a.name for a in node.names if node.module == "cluster.serve")
        graph[file.stem] = names & {f.stem for f in package.glob("*.py")}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join((*path, module))}"
        if module not in done:
            for target in graph.get(module, ()):
                visit(target, (*path, module))
            done.add(module)

    for module in graph:
        visit(module, ())


def test_delete_mid_render_removes_everything(live):
    r = live.post("/v1/renders", json={**body(frames=24), "steps": 8}, headers=auth("alice"))
    render_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while wait_state(live, render_id, "alice", {"rendering"}, 120)["frames_done"] < 1:
        assert time.monotonic() < deadline, "no frame persisted within 120 s"
        time.sleep(0.1)
    assert live.delete(f"/v1/renders/{render_id}", headers=auth("alice")).status_code == 204
    assert live.get(f"/v1/renders/{render_id}", headers=auth("alice")).status_code == 404
    time.sleep(1.0)  # a batch in flight when it was deleted must not write anything back
    leftovers = list(live.root.glob(f"*{render_id}")) + list(
        live.root.glob(f".uploads/*{render_id}")
    )
    assert leftovers == []
