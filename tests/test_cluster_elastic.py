"""Elastic pools on a simulated cluster (ray.cluster_utils.Cluster: a CPU head, then worker
nodes with fake GPUs added while renders run):

- a GPU preset on a cluster without any GPU fails at once, naming the fix;
- ``samplers: auto`` starts one Sampler per GPU; a node with two more GPUs joining mid-run gives
  two more Samplers, which take batches; the autoscaler is asked for the GPUs the queue wants
  beyond the cluster's; once the queue is empty the pool shrinks to ``min_samplers``;
- with ``shared_models`` (sd15's layout) the elastic pool is one DeviceWorker per GPU, each
  training LoRAs and rendering frames.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import actors.pools  # noqa: E402
from actors.executor import RayExecutor  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.core import EngineCore, RenderStore  # noqa: E402
from engine.core.sizing import NoGPUError  # noqa: E402
from engine.pose import save_poses_json, synthetic_dance  # noqa: E402

RENDERS, FRAMES = 8, 10


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def test_gpu_preset_on_a_cpu_cluster_fails_at_once(cluster):
    assert ray.cluster_resources().get("GPU", 0) == 0  # runs before the GPU nodes join
    start = time.monotonic()
    with pytest.raises(NoGPUError, match=r"no GPU.*cluster\.sampler_gpus=0\.5.*sampler_gpus=0"):
        RayExecutor(load_config(None, preset="sd15"))
    assert time.monotonic() - start < 10


def _until(what: str, check: Any, core: EngineCore, timeout: float = 120.0) -> None:
    """Step the core until ``check()`` holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f} s: {what}")
        core.step(0.1)


def test_auto_samplers_follow_the_gpus_and_the_queue(cluster, tmp_path: Path, monkeypatch):
    asked: list[list[dict[str, float]]] = []
    monkeypatch.setattr(actors.pools, "request_resources", lambda bundles: asked.append(bundles))
    cluster.add_node(num_cpus=1, num_gpus=2)
    cluster.wait_for_nodes(timeout=120)
    save_poses_json(synthetic_dance(frames=FRAMES, fps=8, width=64, height=64),
                    tmp_path / "poses.json")  # fmt: skip
    config = load_config(None, overrides=[
        f"poses={tmp_path / 'poses.json'}", "prompt=a dancer", "sampler.steps=2",
        "output.contact_sheet=false", "cluster.samplers=auto", "cluster.sampler_gpus=1",
        "cluster.max_samplers=6", "cluster.min_samplers=1", "cluster.sampler_idle_s=2",
        "cluster.max_preparing=auto", "cluster.max_batch=1", "cluster.batch_wait_s=0",
        f"cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    executor = RayExecutor(config)
    samplers = executor.samplers
    core = EngineCore(config, RenderStore(tmp_path / "root"), executor)
    try:
        for i in range(RENDERS):
            core.submit(config.model_copy(update={"seed": i}), id=f"r{i}")
        _until("one Sampler per GPU", lambda: len(samplers.actors) == 2, core)
        first = set(samplers.actors)
        # 8 ready renders of one frame per batch want 6 Samplers (max_samplers): 6 GPUs asked
        _until("the autoscaler asked", lambda: bool(asked), core)
        assert asked[0] == [{"GPU": 1.0}] * 6
        cluster.add_node(num_cpus=1, num_gpus=2)
        _until("two more Samplers", lambda: len(samplers.actors) == 4, core)
        assert len(samplers.actors) == 4 and ray.cluster_resources()["GPU"] == 4
        added = set(samplers.actors) - first
        _until("the new Samplers take batches",
               lambda: all(samplers.served.get(s, 0) for s in added), core)  # fmt: skip
        core.run_until_idle(timeout_s=300)
        states = {r.id: (r.state, r.error) for r in core.list()}
        assert {s for s, _ in states.values()} == {"done"}, states
        # nothing left: Samplers idle for sampler_idle_s go, down to min_samplers
        _until("the idle pool shrinks", lambda: len(samplers.actors) == 1, core, timeout=60)
        assert executor.elastic is not None and executor.elastic.stats["released"] >= 3
        assert asked[-1] == []  # the request is withdrawn once the queue fits
    finally:
        core.close()


def test_shared_models_auto_give_one_device_worker_per_gpu(cluster, tmp_path: Path, monkeypatch):
    """sd15's layout: ``shared_models`` + ``samplers: auto``: one DeviceWorker (1 GPU: the three
    stages' shares summed) per GPU the cluster has, each training LoRAs and rendering."""
    from actors.devices import DevicePlanner

    monkeypatch.setattr(actors.pools, "request_resources", lambda bundles: None)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 2:  # run alone: give it the GPUs the test above added
        cluster.add_node(num_cpus=1, num_gpus=2)
        cluster.wait_for_nodes(timeout=120)
        gpus = 2
    save_poses_json(synthetic_dance(frames=2, fps=8, width=64, height=64), tmp_path / "p.json")
    config = load_config(None, overrides=[
        f"poses={tmp_path / 'p.json'}", "prompt=a dancer", "sampler.steps=2",
        "appearance.references=2", "appearance.steps=2", "alignment.intra_frame=true",
        "output.contact_sheet=false", "cluster.shared_models=true", "cluster.samplers=auto",
        "cluster.sampler_gpus=0.5", "cluster.trainer_gpus=0.25", "cluster.background_gpus=0.25",
        f"cluster.max_samplers={gpus}", "cluster.sampler_idle_s=600", "cluster.max_preparing=auto",
        "cluster.max_batch=1", "cluster.batch_wait_s=0", f"cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    executor = RayExecutor(config)
    devices = executor.devices
    assert isinstance(devices, DevicePlanner) and executor.samplers is executor.trainers is devices
    core = EngineCore(config, RenderStore(tmp_path / "root"), executor)
    try:
        for i in range(gpus):  # distinct prompts: distinct LoRAs (no adapter cache hit)
            core.submit(config.model_copy(update={"seed": i, "prompt": f"dancer {i}"}), id=f"s{i}")
        _until("one DeviceWorker per GPU", lambda: len(devices.actors) == gpus, core)
        core.run_until_idle(timeout_s=300)
        states = {r.id: (r.state, r.error) for r in core.list()}
        assert {s for s, _ in states.values()} == {"done"}, states
        assert len(devices.actors) == gpus  # one per GPU: 4 x 1.0 GPU fill the cluster
        assert sum(devices.served.values()) >= gpus * 3  # each render: a LoRA + 2 batches
        reports = devices.refresh()
        assert {r["slot"] for r in reports} == set(devices.actors)
        assert (
            sum(r["runs"].get("training", 0) for r in reports) == gpus
        )  # the LoRAs trained on them
    finally:
        core.close()
