"""``cluster.shared_models``: the full method (LoRA + plate + latent chain) of two characters
through one DeviceWorker (one resident model set) on a local Ray instance, frames equal to the
three-actor path (trainer, background worker and Sampler with a model copy each).

One Ray instance for the module; every wait has a timeout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from cluster.batch import run_batch  # noqa: E402
from engine.pose import save_poses_json, synthetic_dance  # noqa: E402
from engine.resident import COMPONENTS  # noqa: E402
from engine.video import load_png  # noqa: E402

FRAMES = 2
PROMPTS = {"a": ("a woman in a red dress dancing", 1), "b": ("a robot dancing in a city", 2)}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def render(tmp: Path, shared: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Both characters, full method, as one ``cluster.batch`` job: (frames per render, the
    job's summary)."""
    tmp.mkdir()
    save_poses_json(synthetic_dance(frames=FRAMES, fps=8, width=64, height=64), tmp / "p.json")
    manifest = {
        "preset": "tiny",
        "set": ["sampler.steps=2", "alignment.intra_frame=true", "appearance.references=2",
                "appearance.steps=2", "alignment.background=true", "background.inpaint_steps=1",
                "output.contact_sheet=false", "cluster.max_batch=2", "cluster.batch_padding=max",
                f"cluster.shared_models={str(shared).lower()}", f"cache_dir={tmp / 'cache'}"],
        "renders": [{"id": rid, "prompt": prompt, "poses": "p.json", "seed": seed}
                    for rid, (prompt, seed) in PROMPTS.items()],
    }  # fmt: skip
    (tmp / "job.yaml").write_text(yaml.safe_dump(manifest))
    summary = run_batch(tmp / "job.yaml", tmp / "out", timeout_s=400)
    assert {k: v["status"] for k, v in summary["renders"].items()} == dict.fromkeys(PROMPTS, "done")
    frames = {
        rid: np.stack([load_png(tmp / "out" / rid / "frames" / f"{i:06d}.png") for i in range(2)])
        for rid in PROMPTS
    }
    return frames, summary


def test_full_method_on_one_device_worker_equals_the_three_actor_path(tmp_path: Path):
    three, separate = render(tmp_path / "three", shared=False)
    one, devices = render(tmp_path / "one", shared=True)
    assert separate["actors_started"] == 4  # refiner, trainer, background worker, Sampler
    assert devices["actors_started"] == 2  # refiner + one DeviceWorker: one model copy
    for rid in PROMPTS:
        diff = np.abs(one[rid].astype(int) - three[rid].astype(int)).max()
        assert diff <= 1, f"{rid}: device-worker frames differ by {diff} grey levels"

    manifest = json.loads((tmp_path / "one/out/b/manifest.json").read_text())
    [device] = manifest["stages"]["devices"]  # the worker's report as last read
    assert device["slot"] == 0 and device["loads"] == 1 and device["pid"] > 0
    assert set(device["components_bytes"]) == set(COMPONENTS)
    assert all(n > 0 for n in device["components_bytes"].values())
    assert device["weights_bytes"] >= sum(device["components_bytes"].values())
    [final] = devices["devices"]  # the summary's, refreshed after the renders
    assert final["pid"] == device["pid"] and final["loads"] == 1  # one load served everything
    assert final["runs"]["training"] == 2 and final["runs"]["background"] == 2
    assert final["runs"]["sampling"] >= FRAMES and final["sessions"] == 0
    assert final["adapters"] == []  # every render released: the base UNet again
    assert final["plate_models_bytes"]  # the inpainting UNet (+ SAM) next to the base model
    assert "devices" not in separate
    assert (
        "devices" not in json.loads((tmp_path / "three/out/b/manifest.json").read_text())["stages"]
    )


def test_batches_skip_a_device_worker_while_it_prepares(tmp_path: Path):
    """A DeviceWorker runs one call at a time: while one trains a LoRA, batches go to the other
    worker instead of queueing behind the training."""
    import time

    from actors.executor import RayExecutor
    from engine.config import load_config
    from engine.core import EngineCore, RenderStore

    save_poses_json(synthetic_dance(frames=2, fps=8, width=64, height=64), tmp_path / "p.json")
    config = load_config(None, overrides=[
        f"poses={tmp_path / 'p.json'}", "prompt=a dancer", "sampler.steps=2",
        "alignment.intra_frame=true", "appearance.references=2", "appearance.steps=30",
        "output.contact_sheet=false", "cluster.shared_models=true", "cluster.samplers=2",
        "cluster.max_preparing=1", f"cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    executor = RayExecutor(config)
    core = EngineCore(config, RenderStore(tmp_path / "root"), executor)
    try:
        core.submit(config, id="lora")
        deadline = time.monotonic() + 120
        while not executor._preps:  # the prepare stages handed out
            assert time.monotonic() < deadline, "no prepare stage started"
            core.step(0.05)
        (prep,) = executor._preps.values()
        training = prep.slots["training"]
        assert executor._preparing_devices() == {training}  # training is slow (30 steps)
        assert executor._free() == [1 - training] and executor.free_slots() == 1
        core.run_until_idle(timeout_s=300)
        assert [r.state for r in core.list()] == ["done"]
        assert executor._preparing_devices() == set() and executor.free_slots() == 2
    finally:
        core.close()
