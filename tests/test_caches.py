"""The refine and pose caches live in the storage backend (engine/caches.py): what one node made
(its own index, working directory and HOME) another reuses, frames unchanged; a corrupt entry is
recomputed and replaced, never trusted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.caches import SharedCache, poses_key, refine_key
from engine.config import load_config
from engine.core import EngineCore, InProcessExecutor, RenderStore
from engine.core.encode import decode_png
from engine.pose import synthetic_dance
from engine.pose.video import write_pose_video
from engine.storage import LocalStorage, Storage


@pytest.fixture(scope="module")
def chain():
    from engine.core.work import build_chain

    return build_chain(load_config(None).model)


def render_on_node(node: Path, shared: Storage, spec, chain, monkeypatch) -> dict:
    """One render by a core with its own index, working directory and HOME (no cache_dir in
    the spec: a node-local cache would land under that HOME) → its manifest."""
    home = node / "home"
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("AVATAR_CACHE_DIR", raising=False)
    monkeypatch.chdir(node)
    core = EngineCore(spec, RenderStore(node / "index", storage=shared),
                      InProcessExecutor(spec, chain))  # fmt: skip
    try:
        render_id = core.submit(spec)
        core.run_until_idle(timeout_s=300)
        record = core.get(render_id)
        assert record.state == "done", record.error
        out = shared.sub(render_id)
        manifest = json.loads(out.get("manifest.json"))
        manifest["_frames"] = np.stack(
            [decode_png(out.get(f"frames/{i:06d}.png")) for i in range(2)]
        )
        return manifest
    finally:
        core.close()


@pytest.fixture
def spec(tmp_path: Path):
    video = write_pose_video(synthetic_dance(frames=2, fps=8, width=64, height=64),
                             tmp_path / "inputs" / "dance.mp4")  # fmt: skip
    return load_config(None, overrides=[
        f"poses={video}", "pose_kind=skeleton", "prompt=a woman in a red dress dancing",
        "sampler.steps=2", "width=64", "height=64", "output.contact_sheet=false",
        "cluster.batch_wait_s=0",
    ])  # fmt: skip


def test_a_node_reuses_the_caches_another_made(tmp_path: Path, spec, chain, monkeypatch):
    shared = LocalStorage(tmp_path / "bucket")
    first = render_on_node(tmp_path / "node-a", shared, spec, chain, monkeypatch)
    second = render_on_node(tmp_path / "node-b", shared, spec, chain, monkeypatch)

    pose_key, prompt_key = poses_key(spec, Path(spec.poses)), refine_key(spec)
    assert first["stages"]["refine_cache"] == {"key": prompt_key, "hit": False, "stored": True}
    assert first["poses"]["info"]["shared_cache"] == {"key": pose_key, "hit": False,
                                                      "stored": True}  # fmt: skip
    assert second["stages"]["refine_cache"] == {"key": prompt_key, "hit": True}
    assert second["poses"]["info"]["shared_cache"] == {"key": pose_key, "hit": True}
    assert shared.exists(f"cache/refine/{prompt_key}.json")
    assert shared.exists(f"cache/poses/{pose_key}.npz")
    # what the hits reproduce is what was computed: the same prompt, the same frames
    assert second["prompt"] == first["prompt"]
    np.testing.assert_array_equal(second["_frames"], first["_frames"])
    for node in ("node-a", "node-b"):  # nothing was cached on a node's own disk
        home_cache = tmp_path / node / "home" / ".cache" / "dancing-avatar"
        assert not (home_cache / "refine").exists() and not (home_cache / "poses").exists()


def test_a_corrupt_entry_is_recomputed_not_trusted(tmp_path: Path, spec, chain, monkeypatch):
    shared = LocalStorage(tmp_path / "bucket")
    clean = render_on_node(tmp_path / "node-a", shared, spec, chain, monkeypatch)
    pose_key, prompt_key = poses_key(spec, Path(spec.poses)), refine_key(spec)
    cache = SharedCache(shared.sub("cache"))
    good_refined = cache.refined(prompt_key)
    assert good_refined is not None and cache.poses(pose_key) is not None
    # valid JSON of the wrong shape, and an npz cut in half
    shared.put(f"cache/refine/{prompt_key}.json", json.dumps({"full": 1}).encode())
    npz = shared.get(f"cache/poses/{pose_key}.npz")
    shared.put(f"cache/poses/{pose_key}.npz", npz[: len(npz) // 2])
    assert cache.refined(prompt_key) is None and cache.poses(pose_key) is None

    again = render_on_node(tmp_path / "node-b", shared, spec, chain, monkeypatch)
    assert again["stages"]["refine_cache"]["hit"] is False
    assert again["poses"]["info"]["shared_cache"]["hit"] is False
    assert again["prompt"] == clean["prompt"]
    np.testing.assert_array_equal(again["_frames"], clean["_frames"])
    # the fresh results replaced the damaged entries
    assert cache.refined(prompt_key) == good_refined
    seq = cache.poses(pose_key)
    assert seq is not None and seq.keypoints.shape == (2, 18, 3)
