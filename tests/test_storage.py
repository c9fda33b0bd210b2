"""Storage backends: a local folder and an S3 bucket (moto's real S3-API server on 127.0.0.1,
through s3fs, the code path of a user's bucket) behind one interface; a render whose every
artefact lives in the bucket; a SIGKILLed core resumed from the bucket on another index folder;
and the bounded write backlog behind a deliberately slow backend."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine.config import StorageConfig, load_config
from engine.core import EngineCore, InProcessExecutor, RenderStore
from engine.core.encode import decode_png
from engine.pose import save_poses_json, synthetic_dance
from engine.storage import LocalStorage, Storage, open_storage
from engine.video import probe_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chain():
    from engine.core.work import build_chain

    return build_chain(load_config(None).model)


def base(tmp: Path, frames: int = 3) -> list[str]:
    poses = tmp / f"poses{frames}.json"
    if not poses.is_file():
        save_poses_json(synthetic_dance(frames=frames, fps=8, width=512, height=512), poses)
    return [
        f"poses={poses}",
        "prompt=a woman dancing",
        "sampler.steps=2",
        "cluster.max_batch=4",
        "cluster.batch_wait_s=0",
        "cluster.batch_padding=max",  # one batch shape: bitwise on this machine
        f"cache_dir={tmp / 'cache'}",
    ]


def s3_storage(endpoint: str, prefix: str) -> Storage:
    return open_storage(StorageConfig(uri=f"s3://renders/{prefix}", endpoint_url=endpoint))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_backends_share_one_interface(kind: str, tmp_path: Path, request):
    store = (
        LocalStorage(tmp_path / "root")
        if kind == "local"
        else s3_storage(request.getfixturevalue("s3"), f"unit-{time.time_ns()}")
    )
    view = store.sub("r1")
    digest = view.put("frames/000000.png", b"png")
    view.put("latents/000000.safetensors", b"x" * 10)
    assert len(digest) == 64
    assert view.keys() == ["frames/000000.png", "latents/000000.safetensors"]
    assert view.keys("frames") == ["frames/000000.png"]
    assert store.keys() == ["r1/frames/000000.png", "r1/latents/000000.safetensors"]
    assert view.get("frames/000000.png") == b"png" and view.size("latents/000000.safetensors") == 10
    with view.open("latents/000000.safetensors") as f:  # seekable: range downloads
        f.seek(4)
        assert f.read(3) == b"xxx"
    assert view.exists("frames/000000.png") and not view.exists("frames/000001.png")
    with pytest.raises(FileNotFoundError):
        view.get("frames/000001.png")
    for bad in ("../x", "/etc/passwd", "a//b", ""):
        with pytest.raises(ValueError, match="invalid"):
            view.put(bad, b"")
    clone = pickle.loads(pickle.dumps(view))  # travels to a worker as its settings
    assert clone.uri == view.uri and clone.get("frames/000000.png") == b"png"
    view.delete("frames")
    assert view.keys() == ["latents/000000.safetensors"]


def test_a_render_lives_in_the_bucket(tmp_path: Path, s3: str, chain):
    """Every artefact of a render is in the bucket; the core's local folder holds its index."""
    config = load_config(None, overrides=[*base(tmp_path), "output.contact_sheet=true"])
    storage = s3_storage(s3, "whole")
    index = tmp_path / "index"
    core = EngineCore(config, RenderStore(index, storage=storage), InProcessExecutor(config, chain))
    try:
        core.submit(config, id="r")
        core.run_until_idle(timeout_s=300)
        assert core.get("r").state == "done", core.get("r").error
    finally:
        core.close()
    keys = set(storage.sub("r").keys())
    expected = {"video.mp4", "manifest.json", "refined_prompt.json", "inputs.json",
                "prepared.json", "contact_sheet.png"}  # fmt: skip
    for i in range(3):
        expected |= {f"frames/{i:06d}.png", f"poses/{i:06d}.png", f"latents/{i:06d}.safetensors"}
    assert expected <= keys, sorted(expected - keys)
    local = sorted(p.name for p in index.rglob("*") if p.is_file())
    assert all(n.startswith("renders.sqlite") or n == ".lock" for n in local), local
    (tmp_path / "video.mp4").write_bytes(storage.get("r/video.mp4"))
    assert probe_video(tmp_path / "video.mp4")["frames"] == 3


_WORKER = """
import sys
sys.path.insert(0, {root!r})
from engine.config import StorageConfig, load_config
from engine.core import EngineCore, InProcessExecutor, RenderStore
from engine.storage import open_storage
config = load_config(None, overrides={overrides!r})
storage = open_storage(StorageConfig(uri={uri!r}, endpoint_url={endpoint!r}))
core = EngineCore(config, RenderStore({index!r}, storage=storage), InProcessExecutor(config))
core.submit(config, id="r")
core.run_until_idle(timeout_s=600)
"""


def test_sigkilled_core_resumes_from_the_bucket(tmp_path: Path, s3: str, chain):
    """SIGKILL the core mid-render; a core on a copy of its index (another machine) and the same
    bucket finishes it from the last durable frame, frames equal to an uninterrupted run."""
    overrides = [*base(tmp_path, frames=6), "alignment.inter_frame=kv+latent",
                 "cluster.max_batch=1", "output.contact_sheet=false"]  # fmt: skip
    storage = s3_storage(s3, "killed")
    code = _WORKER.format(root=str(ROOT), overrides=overrides, uri="s3://renders/killed",
                          endpoint=s3, index=str(tmp_path / "head1"))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(storage.sub("r").keys("latents")) < 2:
            assert proc.poll() is None, "the core ended before it was killed"
            assert time.monotonic() < deadline, "no frame reached the bucket in 300 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert len(storage.sub("r").keys("latents")) < 6, "the render finished before the kill"
    shutil.copytree(tmp_path / "head1", tmp_path / "head2")  # the index moves to a new head
    config = load_config(None, overrides=overrides)
    resumed = EngineCore(config, RenderStore(tmp_path / "head2", storage=storage),
                         InProcessExecutor(config, chain))  # fmt: skip
    try:
        resumed.run_until_idle(timeout_s=300)
        assert resumed.get("r").state == "done", resumed.get("r").error
    finally:
        resumed.close()

    manifest = json.loads(storage.get("r/manifest.json"))
    assert manifest["resumed_from"] >= 2
    clean = EngineCore(config, RenderStore(tmp_path / "clean"), InProcessExecutor(config, chain))
    try:
        clean.submit(config, id="r")
        clean.run_until_idle(timeout_s=300)
    finally:
        clean.close()
    for i in range(6):
        got = decode_png(storage.get(f"r/frames/{i:06d}.png"))
        ref = decode_png((tmp_path / "clean" / "r" / "frames" / f"{i:06d}.png").read_bytes())
        assert np.array_equal(got, ref), f"frame {i}: max diff {np.abs(got - ref).max()}"


class SlowStorage(LocalStorage):
    """A local folder whose every write takes ``delay`` seconds (a congested backend)."""

    def __init__(self, root: Path, delay: float):
        super().__init__(root)
        self.delay = delay

    def _put(self, key: str, data: bytes) -> None:
        time.sleep(self.delay)
        super()._put(key, data)

    def _clone(self, prefix: str) -> Storage:
        clone = SlowStorage(self.root, self.delay)
        clone.prefix = prefix
        return clone


def test_a_slow_backend_bounds_the_backlog(tmp_path: Path, chain):
    """Behind a slow backend the scheduler stops handing out batches at
    cluster.max_unwritten_frames (frames held in memory stay bounded), and every frame event
    comes after that frame's latent is durable."""
    bound, batch = 2, 4
    overrides = [*base(tmp_path, frames=6), f"cluster.max_unwritten_frames={bound}",
                 "cluster.writers=1", "output.contact_sheet=false"]  # fmt: skip
    configs = [load_config(None, overrides=[*overrides, f"seed={i}"]) for i in range(4)]
    storage = SlowStorage(tmp_path / "slow", delay=0.06)
    early: list[str] = []
    lock = threading.Lock()

    def on_event(event: dict) -> None:
        if event["type"] == "frame":
            key = f"{event['render_id']}/latents/{event['frame']:06d}.safetensors"
            with lock:
                if not storage.exists(key):
                    early.append(key)

    core = EngineCore(configs[0], RenderStore(tmp_path / "index", storage=storage),
                      InProcessExecutor(configs[0], chain), on_event=on_event)  # fmt: skip
    try:
        for i, c in enumerate(configs):
            core.submit(c, id=f"r{i}")
        core.run_until_idle(timeout_s=600)
        assert {r.state for r in core.list()} == {"done"}
    finally:
        core.close()
    assert not early, f"frame events before their latent was durable: {early}"
    # a batch is handed out only below the bound; one batch in flight may finish past it
    assert core.stats["max_unwritten"] <= bound - 1 + batch, core.stats["max_unwritten"]
    assert core.stats["held_for_writes"] > 0, "the bound never held a batch back"


def test_serve_downloads_stream_from_the_bucket(tmp_path: Path, s3: str, tiny_chain):
    """With renders in a bucket, the ingress streams video, frames and contact sheet from the
    bucket (byte ranges included); no artefact is on the service's local disk."""
    from serve_helpers import auth, body, make_args, make_client, wait_state

    storage = ["storage.uri=s3://renders/serve", f"storage.endpoint_url={s3}"]
    args = make_args(tmp_path / "serve", set=storage)
    client, service = make_client(args, tiny_chain)
    try:
        r = client.post("/v1/renders", json=body(seed=4), headers=auth("alice"))
        assert r.status_code == 202, r.text
        render_id = r.json()["id"]
        assert wait_state(client, render_id, "alice", {"done", "failed"})["state"] == "done"
        url = f"/v1/renders/{render_id}/video"
        full = client.get(url, headers=auth("alice"))
        stored = service.record("alice", render_id).id  # the store's id is tagged with the owner
        in_bucket = s3_storage(s3, "serve").get(f"{stored}/video.mp4")
        assert full.status_code == 200 and full.content == in_bucket
        part = client.get(url, headers={**auth("alice"), "Range": "bytes=10-99"})
        assert part.status_code == 206 and part.content == in_bucket[10:100]
        assert part.headers["content-range"] == f"bytes 10-99/{len(in_bucket)}"
        tail = client.get(url, headers={**auth("alice"), "Range": "bytes=-16"})
        assert tail.status_code == 206 and tail.content == in_bucket[-16:]
        beyond = client.get(url, headers={**auth("alice"), "Range": f"bytes={len(in_bucket)}-"})
        assert beyond.status_code == 416
        for path in ("frames/0", "contact-sheet"):
            png = client.get(f"/v1/renders/{render_id}/{path}", headers=auth("alice"))
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG"), path
    finally:
        service.close()
    local = [p.name for p in (tmp_path / "serve").rglob("*") if p.suffix in (".mp4", ".png")]
    assert not local, local


def test_adapters_are_shared_through_the_bucket(tmp_path: Path, s3: str, chain):
    """A LoRA trained on one node (its own cache_dir) is reused from the bucket by a render on
    another node (another cache_dir): trained once, identical weights."""
    lora = ["alignment.intra_frame=true", "appearance.references=2", "appearance.steps=4",
            "output.contact_sheet=false"]  # fmt: skip
    storage = s3_storage(s3, "adapters")
    records = {}
    for node in ("a", "b"):
        config = load_config(None, overrides=[*base(tmp_path), *lora,
                                              f"cache_dir={tmp_path / node}"])  # fmt: skip
        core = EngineCore(config, RenderStore(tmp_path / f"index-{node}", storage=storage),
                          InProcessExecutor(config, chain, overlap=False))  # fmt: skip
        try:
            core.submit(config, id=f"r{node}")
            core.run_until_idle(timeout_s=300)
            assert core.get(f"r{node}").state == "done", core.get(f"r{node}").error
        finally:
            core.close()
        manifest = json.loads(storage.get(f"r{node}/manifest.json"))
        records[node] = manifest["stages"]["adapter"]
    assert records["a"]["trained"] is True and records["b"]["trained"] is False, records
    assert records["a"]["digest"] == records["b"]["digest"]
    assert records["b"]["shared"].startswith("s3://renders/adapters/cache/adapters/")
    assert any(k.startswith("cache/adapters/") for k in storage.keys("cache"))
