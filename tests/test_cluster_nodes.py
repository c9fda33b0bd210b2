"""A simulated 2-GPU-node cluster (ray.cluster_utils.Cluster, fake GPUs): losing the node that
hosts the Sampler mid-chain loses no frame and changes none."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from actors.executor import RayExecutor  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.core import EngineCore, RenderStore  # noqa: E402
from engine.pose import save_poses_json, synthetic_dance  # noqa: E402
from engine.video import load_png  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    gpu_nodes = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes(timeout=60)
    yield c, gpu_nodes
    ray.shutdown()
    c.shutdown()


def configs(tmp: Path):
    save_poses_json(synthetic_dance(frames=4, fps=8, width=512, height=512), tmp / "poses.json")
    common = [
        f"poses={tmp / 'poses.json'}",
        "sampler.steps=2",
        "output.contact_sheet=false",
        "alignment.inter_frame=kv+latent",
        "cluster.sampler_gpus=1",  # the Sampler must live on a (fake) GPU node
        "cluster.max_batch=2",
        "cluster.batch_padding=max",
        f"cache_dir={tmp / 'cache'}",
    ]
    return {
        rid: load_config(None, overrides=[*common, f"prompt={p}", f"seed={i}"])
        for i, (rid, p) in enumerate([("a", "a dancer"), ("b", "a robot")])
    }


def render(tmp: Path, out: Path, on_frame=None) -> tuple[EngineCore, RayExecutor]:
    cfgs = configs(tmp)
    first = next(iter(cfgs.values()))
    executor = RayExecutor(first)
    core = EngineCore(
        first, RenderStore(out), executor, on_event=on_frame and (lambda e: on_frame(executor, e))
    )
    for rid, config in cfgs.items():
        core.submit(config, id=rid)
    core.run_until_idle(timeout_s=300)
    assert {r.state for r in core.list()} == {"done"}
    return core, executor


def frames(out: Path) -> np.ndarray:
    return np.stack([load_png(out / "frames" / f"{i:06d}.png") for i in range(4)])


def test_node_loss_mid_chain(cluster, tmp_path: Path):
    c, gpu_nodes = cluster
    render(tmp_path, tmp_path / "clean")[0].close()
    removed = []

    def remove_sampler_node(executor, event):
        if event["type"] == "frame" and event["frame"] == 0 and not removed:
            node_id = ray.get(executor.samplers.actors[0].node_id.remote(), timeout=60)
            node = next(n for n in gpu_nodes if n.node_id == node_id)
            c.remove_node(node)
            removed.append(node_id)

    core, executor = render(tmp_path, tmp_path / "faulty", remove_sampler_node)
    assert removed and executor.stats["actor_failures"] >= 1
    new_node = ray.get(executor.samplers.actors[0].node_id.remote(), timeout=60)
    assert new_node != removed[0]  # restarted on the surviving GPU node
    core.close()
    for rid in ("a", "b"):
        assert np.array_equal(frames(tmp_path / "clean" / rid), frames(tmp_path / "faulty" / rid))
