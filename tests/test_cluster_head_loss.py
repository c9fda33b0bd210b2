"""Losing the head: the process running the engine core and the Ray executor (the driver that owns
every Sampler) is SIGKILLed while a Sampler on another node renders; its actors die with it. A new
core process, on a copy of the index (a new head: rayservice.yaml re-mounts the index PVC) and
the same storage, finishes every render; frames within 1 grey level of an uninterrupted run.

One simulated cluster on this host (ray.cluster_utils.Cluster): a CPU head and a worker node with
2 fake GPUs where the Samplers live; the storage is a folder every node sees (storage.shared), so
the Samplers write the frames themselves, as they would to a bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from actors.executor import RayExecutor  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.core import EngineCore, InProcessExecutor, RenderStore, open_store  # noqa: E402
from engine.core.encode import decode_png  # noqa: E402
from engine.pose import save_poses_json, synthetic_dance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FRAMES, RENDERS = 3, 3

# The first head: connects to the cluster, runs the core with the Ray executor until killed.
_HEAD = """
import sys
sys.path.insert(0, {root!r})
import ray
from actors.executor import RayExecutor
from engine.config import load_config
from engine.core import EngineCore, open_store
ray.init(address={address!r}, log_to_driver=False)
config = load_config(None, overrides={overrides!r})
core = EngineCore(config, open_store({index!r}, config), RayExecutor(config))
for i in range({renders}):
    core.submit(load_config(None, overrides=[*{overrides!r}, f"seed={{i}}"]), id=f"r{{i}}")
core.run_until_idle(timeout_s=600)
"""


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    c.add_node(num_cpus=1, num_gpus=2)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes(timeout=120)
    yield c
    ray.shutdown()
    c.shutdown()


def overrides(tmp: Path) -> list[str]:
    poses = tmp / "poses.json"
    if not poses.is_file():
        save_poses_json(synthetic_dance(frames=FRAMES, fps=8, width=512, height=512), poses)
    return [
        f"poses={poses}",
        "prompt=a woman dancing",
        "sampler.steps=2",
        "alignment.inter_frame=kv+latent",  # frame t needs frame t-1: resuming must reload it
        "output.contact_sheet=false",
        "cluster.samplers=1",
        "cluster.sampler_gpus=1",  # the Sampler lives on the (fake) GPU node
        "cluster.max_batch=1",
        "cluster.batch_wait_s=0",
        "cluster.batch_padding=max",
        f"storage.uri={tmp / 'bucket'}",
        "storage.shared=true",
        f"cache_dir={tmp / 'cache'}",
    ]


def _latents(bucket: Path) -> int:
    return len(list(bucket.glob("*/latents/*.safetensors")))


def test_a_new_head_finishes_every_render(cluster, tmp_path: Path):
    sets = overrides(tmp_path)
    bucket = tmp_path / "bucket"
    code = _HEAD.format(root=str(ROOT), address=cluster.address, overrides=sets,
                        index=str(tmp_path / "head1"), renders=RENDERS)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while _latents(bucket) < 2:
            assert proc.poll() is None, "the head ended before it was killed"
            assert time.monotonic() < deadline, "no frame reached the storage in 300 s"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_at = _latents(bucket)
    assert killed_at < FRAMES * RENDERS, "every frame was done before the kill"

    # A new head: a copy of the index in another folder, the same storage, a new Ray executor
    # (the old Samplers died with their owner) in another process.
    shutil.copytree(tmp_path / "head1", tmp_path / "head2")
    config = load_config(None, overrides=sets)
    store = open_store(tmp_path / "head2", config)
    core = EngineCore(config, store, RayExecutor(config))
    try:
        core.run_until_idle(timeout_s=600)
        records = {r.id: r for r in core.list()}
    finally:
        core.close()
    assert sorted(records) == [f"r{i}" for i in range(RENDERS)]
    assert {r.state for r in records.values()} == {"done"}, {k: r.error for k, r in records.items()}
    resumed = [json.loads(store.files(rid).get("manifest.json"))["resumed_from"] for rid in records]
    assert max(resumed) >= 1, f"no render resumed from a durable frame: {resumed}"

    # The uninterrupted reference: the same renders in one process, in a head-local folder.
    clean_sets = [s for s in sets if not s.startswith("storage.")]
    clean_config = load_config(None, overrides=clean_sets)
    clean = EngineCore(
        clean_config, RenderStore(tmp_path / "clean"), InProcessExecutor(clean_config)
    )
    try:
        for i in range(RENDERS):
            clean.submit(load_config(None, overrides=[*clean_sets, f"seed={i}"]), id=f"r{i}")
        clean.run_until_idle(timeout_s=600)
    finally:
        clean.close()
    for rid in records:
        for i in range(FRAMES):
            got = decode_png(store.files(rid).get(f"frames/{i:06d}.png"))
            ref = decode_png((tmp_path / "clean" / rid / "frames" / f"{i:06d}.png").read_bytes())
            diff = np.abs(got.astype(int) - ref).max()
            assert diff <= 1, f"{rid} frame {i}: {diff} grey levels from the clean run"
