"""A simulated multi-node cluster on one host (ray.cluster_utils.Cluster: a head and two worker
nodes with 2 fake GPUs each) with no file shared by assumption:

- Samplers are spread over both worker nodes;
- the input files (poses, plate, masks) are deleted right after submission;
- the worker node hosting the most Samplers is removed mid-run;
- the faulty run stores its renders in an S3 bucket (moto's server on 127.0.0.1), written by the
  Samplers themselves; the clean run in a head-local folder (frames travel back encoded);

and every render (plain, LoRA, plate + masks) finishes without spending an attempt on the lost
node, its frames within 1 grey level of the clean run's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from actors.executor import RayExecutor  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.core import EngineCore, RenderStore, open_store  # noqa: E402
from engine.core.encode import decode_png  # noqa: E402
from engine.pose import save_poses_json, synthetic_dance  # noqa: E402
from engine.storage import Storage  # noqa: E402
from engine.video import save_png  # noqa: E402
from tests.s3_helpers import make_bucket, s3_server  # noqa: E402

FRAMES = 4


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:  # before the nodes: they inherit its credentials
        make_bucket(endpoint, "renders")
        yield endpoint


@pytest.fixture(scope="module")
def cluster(s3):
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    gpu_nodes = [c.add_node(num_cpus=1, num_gpus=2) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes(timeout=120)
    yield c, gpu_nodes
    ray.shutdown()
    c.shutdown()


def inputs(tmp: Path) -> dict[str, list[str]]:
    """Each render's own input files (so they can be deleted) and overrides."""
    tmp.mkdir(parents=True, exist_ok=True)
    dance = synthetic_dance(frames=FRAMES, fps=8, width=512, height=512)
    for rid in ("a", "lora", "plated"):
        save_poses_json(dance, tmp / f"{rid}.json")
    save_png(np.full((64, 64, 3), 90, np.uint8), tmp / "plate.png")
    (tmp / "masks").mkdir(exist_ok=True)
    for i in range(FRAMES):
        mask = np.zeros((512, 512), np.uint8)
        mask[100 + 20 * i : 400, 180:330] = 255
        save_png(mask, tmp / "masks" / f"m{i}.png")
    return {
        "a": ["prompt=a dancer", "seed=1"],
        "lora": ["prompt=a robot", "seed=2", "alignment.intra_frame=true",
                 "appearance.references=2", "appearance.steps=4"],
        "plated": ["prompt=a woman", "seed=3", "alignment.background=true",
                   "background.mask_source=pose", f"plate={tmp / 'plate.png'}",
                   f"masks={tmp / 'masks'}"],
    }  # fmt: skip


def engine_config(tmp: Path, *overrides: str):
    common = [
        f"poses={tmp / 'a.json'}",
        "sampler.steps=2",
        "output.contact_sheet=false",
        "alignment.inter_frame=kv+latent",
        "cluster.samplers=2",
        "cluster.sampler_gpus=1",  # Samplers live on the (fake) GPU nodes
        "cluster.max_batch=2",
        "cluster.batch_wait_s=0",
        "cluster.batch_padding=max",
        f"cache_dir={tmp / 'cache'}",
    ]
    return load_config(None, overrides=[*common, *overrides])


def run(tmp: Path, store: RenderStore, on_frame=None, *, delete: bool = False):
    specs = inputs(tmp)
    engine = engine_config(tmp)
    executor = RayExecutor(engine)
    core = EngineCore(engine, store, executor,
                      on_event=on_frame and (lambda e: on_frame(executor, e)))  # fmt: skip
    for rid, overrides in specs.items():
        core.submit(engine_config(tmp, f"poses={tmp / f'{rid}.json'}", *overrides), id=rid)
    if delete:  # the submitter's files are gone before any worker starts on them
        shutil.rmtree(tmp)
    core.run_until_idle(timeout_s=600)
    return core, executor


def frames(out: Storage) -> np.ndarray:
    return np.stack([decode_png(out.get(f"frames/{i:06d}.png")) for i in range(FRAMES)])


def test_node_loss_and_deleted_inputs_on_a_bucket(cluster, s3, tmp_path: Path):
    c, gpu_nodes = cluster
    clean, _ = run(tmp_path / "in1", RenderStore(tmp_path / "clean"))
    clean.close()
    removed, placed = [], []

    def remove_busiest_node(executor, event):
        if event["type"] == "frame" and not removed:
            nodes = ray.get(
                [a.node_id.remote() for a in executor.samplers.actors.values()], timeout=60
            )
            placed.extend(nodes)
            busiest = max(set(nodes), key=nodes.count)
            c.remove_node(next(n for n in gpu_nodes if n.node_id == busiest))
            removed.append(busiest)

    engine = engine_config(tmp_path, "storage.uri=s3://renders/nodes",
                           f"storage.endpoint_url={s3}")  # fmt: skip
    store = open_store(tmp_path / "index", engine)
    faulty, executor = run(tmp_path / "in2", store, remove_busiest_node, delete=True)
    try:
        records = {r.id: r for r in faulty.list()}
        stats = dict(faulty.stats)
    finally:
        faulty.close()
    assert {r.state for r in records.values()} == {"done"}, {k: r.error for k, r in records.items()}
    assert len(set(placed)) == 2, placed  # spread over both worker nodes
    assert removed and executor.stats["actor_failures"] >= 1
    assert all(r.attempts == 0 for r in records.values()), {
        k: r.attempts for k, r in records.items()
    }
    assert stats["restarts_waited"] >= 1
    assert stats["written_by_workers"] == 3 * FRAMES  # the Samplers wrote to the bucket
    for rid in records:
        got = frames(store.files(rid))
        ref = frames(RenderStore(tmp_path / "clean").files(rid))
        assert np.abs(got.astype(int) - ref).max() <= 1, rid
        assert store.files(rid).exists("video.mp4") and store.files(rid).keys("inputs")
