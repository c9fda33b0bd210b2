"""Contract tests of the HTTP API, in process (TestClient) over a tiny-preset core (2 steps,
3 frames): submit, read, download (ranges), events (SSE replay), cancel, idempotency, auth,
quotas, backpressure, limits, uploads, health and metrics. Every wait has a timeout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import (
    auth,
    body,
    make_args,
    make_client,
    poses,
    poses_file,
    sse_events,
    wait_state,
)

from engine.video import probe_video

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_chain):
    """A stepping service (renders finish in about a second)."""
    client, service = make_client(make_args(tmp_path_factory.mktemp("live")), tiny_chain)
    yield client
    service.close()


@pytest.fixture(scope="module")
def paused(tmp_path_factory, tiny_chain):
    """A service that accepts renders but never renders them (deterministic queue states)."""
    args = make_args(
        tmp_path_factory.mktemp("paused"),
        paused=True,
        set=["cluster.max_queued=6"],
        limits={"max_body_bytes": 64 * 1024, "max_frames": 8, "max_steps": 10},
    )
    client, service = make_client(args, tiny_chain)
    client.root = args.root  # type: ignore[attr-defined]
    yield client
    service.close()


@pytest.fixture(scope="module")
def finished(live):
    """One finished render of alice: (id, view)."""
    r = live.post("/v1/renders", json=body(seed=3), headers=auth("alice"))
    assert r.status_code == 202, r.text
    return r.json()["id"], wait_state(live, r.json()["id"], "alice", {"done", "failed"})


def test_submit_answers_at_once_with_location(live):
    r = live.post("/v1/renders", json=body(seed=1), headers=auth("alice"))
    assert r.status_code == 202
    view = r.json()
    assert r.headers["location"] == f"/v1/renders/{view['id']}" == view["links"]["self"]
    assert view["state"] == "queued" and len(view["id"]) >= 16


def test_render_finishes_and_its_files_download(live, finished, tmp_path: Path):
    render_id, view = finished
    assert view["state"] == "done" and view["frames_done"] == view["frames_total"] == 3
    assert view["progress"] == 1.0
    video = live.get(f"/v1/renders/{render_id}/video", headers=auth("alice"))
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    (tmp_path / "v.mp4").write_bytes(video.content)
    assert probe_video(tmp_path / "v.mp4")["frames"] == 3
    for path in ("frames/0", "frames/2", "contact-sheet"):
        png = live.get(f"/v1/renders/{render_id}/{path}", headers=auth("alice"))
        assert png.status_code == 200 and png.content.startswith(PNG_MAGIC), path
    missing = live.get(f"/v1/renders/{render_id}/frames/3", headers=auth("alice"))
    assert missing.status_code == 409 and missing.json()["error"]["code"] == "not_ready"
    metrics = live.get(f"/v1/renders/{render_id}/metrics", headers=auth("alice"))
    assert metrics.status_code == 409  # not requested (metrics: false)


def test_video_range_requests(live, finished):
    render_id, _ = finished
    url = f"/v1/renders/{render_id}/video"
    full = live.get(url, headers=auth("alice")).content
    part = live.get(url, headers={**auth("alice"), "Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 10-99/{len(full)}"
    assert part.content == full[10:100]
    tail = live.get(url, headers={**auth("alice"), "Range": "bytes=-16"})
    assert tail.status_code == 206 and tail.content == full[-16:]
    beyond = live.get(url, headers={**auth("alice"), "Range": f"bytes={len(full) + 5}-"})
    assert beyond.status_code == 416


def test_events_stream_and_replay(live, finished):
    render_id, _ = finished
    url = f"/v1/renders/{render_id}/events"
    events = sse_events(live.get(url, headers=auth("alice")).text)
    assert events[-1] == ("end", {"state": "done"})
    body_events = [data for kind, data in events[:-1]]
    seqs = [e["seq"] for e in body_events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e["frame"] for e in body_events if e["type"] == "frame"] == [0, 1, 2]
    assert body_events[-1]["state"] == "done"
    replay = sse_events(live.get(url, headers={**auth("alice"), "Last-Event-ID": "3"}).text)
    assert [d for _, d in replay[:-1]] == body_events[3:]
    after = sse_events(live.get(f"{url}?after=3", headers=auth("alice")).text)
    assert after == replay


def test_auth_required_and_scoped(live, finished):
    render_id, _ = finished
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "token-alice"}):
        r = live.get(f"/v1/renders/{render_id}", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"
    for path in ("", "/video", "/events", "/frames/0"):
        r = live.get(f"/v1/renders/{render_id}{path}", headers=auth("bob"))
        assert r.status_code == 404 and r.json()["error"]["field"] == "path.id", path
    assert live.delete(f"/v1/renders/{render_id}", headers=auth("bob")).status_code == 404
    ids = [v["id"] for v in live.get("/v1/renders", headers=auth("bob")).json()["renders"]]
    assert render_id not in ids


def test_idempotency_key_makes_one_render(paused):
    headers = {**auth("alice"), "Idempotency-Key": "order-17"}
    first = paused.post("/v1/renders", json=body(seed=5), headers=headers)
    again = paused.post("/v1/renders", json=body(seed=5), headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.headers["idempotent-replayed"] == "true"
    assert first.json()["id"] == again.json()["id"]
    other = paused.post("/v1/renders", json=body(seed=6), headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "conflict"
    ids = [
        v["id"]
        for v in paused.get("/v1/renders?limit=100", headers=auth("alice")).json()["renders"]
    ]
    assert ids.count(first.json()["id"]) == 1
    bobs = paused.post(
        "/v1/renders", json=body(seed=5), headers={**auth("bob"), "Idempotency-Key": "order-17"}
    )
    assert bobs.status_code == 202 and bobs.json()["id"] != first.json()["id"]
    paused.delete(f"/v1/renders/{first.json()['id']}", headers=auth("alice"))
    paused.delete(f"/v1/renders/{bobs.json()['id']}", headers=auth("bob"))


def test_put_with_client_id(paused):
    url = "/v1/renders/my-render_1"
    first = paused.put(url, json=body(seed=7), headers=auth("alice"))
    assert first.status_code == 202 and first.json()["id"] == "my-render_1"
    assert paused.put(url, json=body(seed=7), headers=auth("alice")).status_code == 200
    assert paused.put(url, json=body(seed=8), headers=auth("alice")).status_code == 409
    # ids are per token: bob's PUT of alice's id answers exactly what a fresh id answers
    taken = paused.put(url, json=body(seed=8), headers=auth("bob"))
    fresh = paused.put("/v1/renders/never-used", json=body(seed=8), headers=auth("bob"))
    assert taken.status_code == fresh.status_code == 202
    assert set(taken.headers) - {"location"} == set(fresh.headers) - {"location"}
    assert paused.get(url, headers=auth("alice")).json()["state"] == "queued"
    for who, path in (("bob", url), ("bob", "/v1/renders/never-used")):
        assert paused.delete(path, headers=auth(who)).status_code == 204
    bad = paused.put("/v1/renders/bad.id", json=body(), headers=auth("alice"))
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "path.render_id"
    paused.delete(url, headers=auth("alice"))


def test_cancel_is_idempotent(paused):
    render_id = paused.post("/v1/renders", json=body(), headers=auth("bob")).json()["id"]
    first = paused.post(f"/v1/renders/{render_id}/cancel", headers=auth("bob"))
    second = paused.post(f"/v1/renders/{render_id}/cancel", headers=auth("bob"))
    assert first.status_code == second.status_code == 200
    assert first.json()["state"] == second.json()["state"] == "cancelled"
    assert (
        paused.get(f"/v1/renders/{render_id}", headers=auth("bob")).json()["state"] == "cancelled"
    )


def test_list_newest_first_cursor_and_state_filter(paused):
    ids = [paused.post("/v1/renders", json=body(seed=i), headers=auth("bob")).json()["id"]
           for i in range(3)]  # fmt: skip
    paused.post(f"/v1/renders/{ids[1]}/cancel", headers=auth("bob"))
    page = paused.get("/v1/renders?limit=2", headers=auth("bob")).json()
    assert [v["id"] for v in page["renders"]] == [ids[2], ids[1]]
    rest = paused.get(f"/v1/renders?limit=2&cursor={page['next_cursor']}", headers=auth("bob"))
    assert rest.json()["renders"][0]["id"] == ids[0]
    queued = paused.get("/v1/renders?state=queued&limit=100", headers=auth("bob")).json()
    assert ids[1] not in [v["id"] for v in queued["renders"]]
    assert {ids[0], ids[2]} <= {v["id"] for v in queued["renders"]}
    for render_id in (ids[0], ids[2]):
        paused.delete(f"/v1/renders/{render_id}", headers=auth("bob"))


def test_quotas_answer_429_with_retry_after(paused):
    ok = [paused.post("/v1/renders", json=body(frames=2), headers=auth("carol")) for _ in range(2)]
    assert [r.status_code for r in ok] == [202, 202]
    third = paused.post("/v1/renders", json=body(frames=1), headers=auth("carol"))
    assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
    assert "quota" in third.json()["error"]["message"]
    paused.delete(f"/v1/renders/{ok[0].json()['id']}", headers=auth("carol"))
    daily = paused.post("/v1/renders", json=body(frames=2), headers=auth("carol"))
    assert daily.status_code == 429  # 4 of 5 frames used today; 2 more do not fit
    assert int(daily.headers["retry-after"]) > 80_000
    paused.delete(f"/v1/renders/{ok[1].json()['id']}", headers=auth("carol"))


def test_queue_full_answers_503_with_retry_after(paused):
    queued = paused.get("/v1/renders?state=queued&limit=100", headers=auth("alice")).json()
    made = []
    for i in range(10):
        r = paused.post("/v1/renders", json=body(seed=100 + i), headers=auth("alice"))
        if r.status_code != 202:
            break
        made.append(r.json()["id"])
    assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
    assert r.json()["error"]["code"] == "queue_full"
    assert len(made) + len(queued["renders"]) <= 6
    for render_id in made:
        paused.delete(f"/v1/renders/{render_id}", headers=auth("alice"))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"prompt": "x" * 501}, "body.prompt"),
        ({"prompt": ""}, "body.prompt"),
        ({"steps": 11}, "body.steps"),
        ({"width": 1024}, "body.width"),
        ({"width": 100}, "body.width"),
        ({"alignment": {"inter_frame": "magic"}}, "body.alignment.inter_frame"),
        ({"preset": "sd15"}, "body.preset"),
        ({"example": "salsa", "poses": None}, "body.example"),
        ({"example": "dance"}, "body.poses"),
        ({"poses": {"fps": 8, "width": 64, "height": 64, "frames": [[[1, 2]]]}}, "poses"),
        ({"poses": poses(9)}, "poses"),
        ({"model": {"preset": "sd15"}}, "body.model"),
        ({"cache_dir": "/etc"}, "body.cache_dir"),
    ],
)
def test_invalid_fields_are_named(paused, change, field):
    data = {k: v for k, v in {**body(), **change}.items() if v is not None}
    r = paused.post("/v1/renders", json=data, headers=auth("bob"))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    assert "/" not in r.json()["error"]["message"].replace("w/", "")  # no server path


def test_bad_requests(paused):
    text = paused.post(
        "/v1/renders", content=b"hi", headers={**auth("bob"), "Content-Type": "text/plain"}
    )
    assert text.status_code == 415
    broken = paused.post(
        "/v1/renders", content=b"{nope", headers={**auth("bob"), "Content-Type": "application/json"}
    )
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "bad_json"
    big = paused.post(
        "/v1/renders",
        content=b" " * (65 * 1024),
        headers={**auth("bob"), "Content-Type": "application/json"},
    )
    assert big.status_code == 413
    assert (
        paused.get("/v1/renders?limit=0", headers=auth("bob")).json()["error"]["field"]
        == "query.limit"
    )
    unknown = paused.get("/v2/nothing")
    assert unknown.status_code == 404 and set(unknown.json()["error"]) == {
        "code",
        "message",
        "field",
    }


def test_multipart_uploads_checked_by_content(paused, tmp_path: Path):
    from engine.pose import convert_poses

    request = json.dumps({"prompt": "a robot dancing", "steps": 2})
    src = poses_file(tmp_path / "poses.json", frames=3)
    openpose = [{"people": [{"pose_keypoints_2d": [float(v) for v in np.asarray(frame).ravel()]}]}
                for frame in poses(3)["frames"]]  # fmt: skip
    convert_poses(src, tmp_path / "skeleton.mp4")
    uploads = {
        "poses.json": src.read_bytes(),
        "openpose.json": json.dumps(openpose).encode(),
        "dance.mp4": (tmp_path / "skeleton.mp4").read_bytes(),
    }
    for name, data in uploads.items():
        files = {"request": (None, request), "poses": (name, data)}
        r = paused.post("/v1/renders", files=files, headers=auth("bob"))
        assert r.status_code == 202, (name, r.text)
        paused.delete(f"/v1/renders/{r.json()['id']}", headers=auth("bob"))
    fake = {"request": (None, request), "poses": ("poses.json", PNG_MAGIC + b"\0" * 64)}
    r = paused.post("/v1/renders", files=fake, headers=auth("bob"))
    assert r.status_code == 415 and r.json()["error"]["field"] == "poses"
    missing = paused.post("/v1/renders", files={"request": (None, request)}, headers=auth("bob"))
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "poses"


def test_uploads_live_under_the_storage_root(paused):
    r = paused.post("/v1/renders", json=body(seed=11), headers=auth("bob"))
    render_id = r.json()["id"]
    files = list(paused.root.glob(f".uploads/*{render_id}/*"))  # under the owner's store id
    assert len(files) == 1 and files[0].name.startswith("poses-") and files[0].suffix == ".json"
    assert paused.delete(f"/v1/renders/{render_id}", headers=auth("bob")).status_code == 204
    assert not files[0].parent.exists()


def test_health_metrics_and_schema(live, finished):
    assert live.get("/healthz").json()["status"] == "ok"
    ready = live.get("/readyz")
    assert ready.status_code == 200 and ready.json()["detail"]["store_writable"] is True
    text = live.get("/metrics").text
    assert 'avatar_renders{state="done"}' in text and "avatar_frames_total" in text
    assert "avatar_stage_seconds_bucket" in text and "avatar_http_rejects_total" in text
    schema = live.get("/openapi.json").json()
    assert {"/v1/renders", "/v1/renders/{render_id}/events", "/metrics"} <= set(schema["paths"])
    assert "RenderRequest" in schema["components"]["schemas"]
    page = live.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_restart_resumes_unfinished_render(tmp_path: Path, tiny_chain):
    """A new service on the same store finishes a render the first one left mid-way."""
    import threading

    args = make_args(tmp_path, set=["cluster.max_batch=1"])
    client, service = make_client(args, tiny_chain)
    first_frame = threading.Event()
    forward = service.core.on_event

    def on_event(event):
        forward(event)
        if event["type"] == "frame":
            first_frame.set()

    service.core.on_event = on_event
    render_id = client.post("/v1/renders", json=body(frames=8), headers=auth("alice")).json()["id"]
    assert first_frame.wait(timeout=60), "no frame rendered within 60 s"
    service.close()  # stops after the batch in flight: frames 1-2 of 8 at most
    client, service = make_client(args, tiny_chain)
    try:
        done = wait_state(client, render_id, "alice", {"done", "failed"}, timeout_s=90)
        assert done["state"] == "done" and done["frames_done"] == 8
        (folder,) = tmp_path.glob(f"*{render_id}")  # the store id: owner tag + id
        manifest = json.loads((folder / "manifest.json").read_text())
        assert 1 <= manifest["resumed_from"] < 8
        assert probe_video(folder / "video.mp4")["frames"] == 8
    finally:
        service.close()
