"""The service under attack, in process (this test process is the engine replica): a hostile-
upload corpus built at test time (tests/hostile.py: decode bombs as GIF, APNG, mp4, webm, avi)
and hostile JSON (deep nesting, huge numbers, fps 5e-324) answer 4xx (or 202 and a failed
render) within a bound, never a 5xx or a Retry-After, and the engine's memory stays flat."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_helpers import auth, body, make_args, make_client, wait_state

ABSOLUTE = re.compile(r"(^|[\s'\"(])/\w")  # a server path in an error message
ANSWER_S = 3.0
"""Most seconds one hostile POST may take. Measured 4-115 ms; the bound tolerates a shared
2-core machine at load 9 (a 1.5 s bound failed there once), and decoding in the request path
took 35-61 s."""
ENGINE_GROWTH_MB = 120
"""Most the engine process's peak RSS may grow over the whole corpus (decoding the two accepted
uploads in process would add >= 150 MB; the 10000x10000 GIF >= 1.2 GB)."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    here = Path(__file__).parent
    subprocess.run([sys.executable, str(here / "hostile.py"), str(out)], check=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_chain):
    args = make_args(tmp_path_factory.mktemp("hostile"), limits={"max_frames": 64})
    client, service = make_client(args, tiny_chain)
    yield client
    service.close()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(call, *args, **kwargs):
    start = time.perf_counter()
    response = call(*args, **kwargs)
    return response, time.perf_counter() - start


def test_hostile_uploads_fast_4xx_and_flat_engine_memory(corpus, live):
    index = json.loads((corpus / "index.json").read_text())
    request = json.dumps({"prompt": "a dancer", "steps": 2})
    before = peak_rss_mb()
    accepted, timings = [], {}
    for name, expect in index.items():
        files = {"request": (None, request), "poses": (name, (corpus / name).read_bytes())}
        r, seconds = timed(live.post, "/v1/renders", files=files, headers=auth("alice"))
        timings[name] = (r.status_code, round(seconds, 3))
        assert seconds < ANSWER_S, (name, seconds)
        assert "retry-after" not in r.headers, (name, r.status_code)
        if expect == "refuse":
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            assert r.json()["error"]["field"] == "poses", (name, r.text)
        else:
            assert r.status_code == 202, (name, r.text)
            accepted.append((name, r.json()["id"]))
    for name, render_id in accepted:  # decoded in the bounded child: fails with the reason
        view = wait_state(live, render_id, "alice", {"done", "failed"}, timeout_s=180)
        assert view["state"] == "failed" and view["error_kind"] == "input", (name, view)
        assert "black" in view["error"] and not ABSOLUTE.search(view["error"]), (name, view)
    growth = peak_rss_mb() - before
    print(f"hostile corpus: {timings}; engine peak RSS growth {growth:.0f} MB")
    assert growth < ENGINE_GROWTH_MB, (growth, timings)


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


HOSTILE_JSON = [
    # (name, raw JSON body, status, field)
    ("deep body", '{"prompt": "x", "poses": ' + _deep(5000) + "}", 400, "body"),
    ("deep poses", '{"prompt": "x", "poses": ' + _deep(900) + "}", 400, "body"),
    ("huge seed", '{"prompt": "x", "example": "dance", "seed": ' + "9" * 5000 + "}", 400, "body"),
    (
        "long seed",
        '{"prompt": "x", "example": "dance", "seed": ' + "9" * 4000 + "}",
        422,
        "body.seed",
    ),
    ("tiny fps", '{"prompt": "x", "example": "dance", "fps": 5e-324}', 422, "body.fps"),
    ("nan fps", '{"prompt": "x", "example": "dance", "fps": NaN}', 422, "body.fps"),
    ("huge width", '{"prompt": "x", "example": "dance", "width": 1e400}', 422, "body.width"),
]


@pytest.mark.parametrize(("name", "raw", "status", "field"), HOSTILE_JSON, ids=lambda v: v)
def test_hostile_json_is_a_4xx_naming_the_field(live, name, raw, status, field):
    headers = {**auth("alice"), "Content-Type": "application/json"}
    r, seconds = timed(live.post, "/v1/renders", content=raw.encode(), headers=headers)
    assert (r.status_code, r.json()["error"]["field"]) == (status, field), (name, r.text)
    assert "retry-after" not in r.headers and seconds < ANSWER_S, (name, seconds)


@pytest.mark.parametrize(
    ("upload", "field"),
    [
        (_deep(5000).encode(), "poses"),
        (b'{"fps": 8, "width": 64, "height": 64, "frames": [[[' + b"9" * 5000 + b"]]]}", "poses"),
        (b'{"fps": 1e-320, "width": 64, "height": 64, "frames": [[[1, 2, 1]]]}', "poses"),
    ],
    ids=["deep", "huge-number", "tiny-fps"],
)
def test_hostile_json_uploads_are_422(live, upload, field):
    files = {"request": (None, json.dumps({"prompt": "x"})), "poses": ("p.json", upload)}
    r, seconds = timed(live.post, "/v1/renders", files=files, headers=auth("alice"))
    assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    assert seconds < ANSWER_S


def test_deep_multipart_request_part_is_400(live):
    files = {"request": (None, '{"prompt": ' + _deep(3000) + "}"), "poses": ("p.json", b"[]")}
    r = live.post("/v1/renders", files=files, headers=auth("alice"))
    assert r.status_code == 400 and r.json()["error"]["field"] == "request", r.text


def test_an_unreadable_video_names_no_version_or_path(live):
    junk = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 8 + b"\x00\x00\x00\x10stsd" + b"\x01" * 64
    files = {"request": (None, json.dumps(body(frames=2) | {"poses": None})), "poses": ("a", junk)}
    r = live.post("/v1/renders", files=files, headers=auth("alice"))
    if r.status_code == 202:  # the header parsed: the bounded decoder fails the render
        view = wait_state(live, r.json()["id"], "alice", {"failed", "done"}, timeout_s=60)
        message = view["error"]
    else:
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
    assert "version" not in message.lower() and not ABSOLUTE.search(message), message


def test_delete_stops_a_decode_in_progress(live, tmp_path):
    """DELETE of a render whose upload is being decoded kills the decoding child at once."""
    import psutil
    from hostile import honest_gif

    honest_gif(tmp_path / "long.gif", 2048, 40)  # ~15 s to decode on this machine
    files = {"request": (None, json.dumps({"prompt": "a dancer"})),
             "poses": ("long.gif", (tmp_path / "long.gif").read_bytes())}  # fmt: skip
    r = live.post("/v1/renders", files=files, headers=auth("alice"))
    assert r.status_code == 202, r.text

    def decoders() -> list:
        return [p for p in psutil.Process().children(recursive=True)
                if "engine.pose.isolated" in " ".join(p.cmdline())]  # fmt: skip

    deadline = time.monotonic() + 30
    while not decoders():
        assert time.monotonic() < deadline, "no decoding child started within 30 s"
        time.sleep(0.05)
    gone, seconds = timed(live.delete, f"/v1/renders/{r.json()['id']}", headers=auth("alice"))
    assert gone.status_code == 204 and seconds < 3.0, (gone.status_code, seconds)
    deadline = time.monotonic() + 5
    while decoders():
        assert time.monotonic() < deadline, "the decoding child outlived its render"
        time.sleep(0.05)
