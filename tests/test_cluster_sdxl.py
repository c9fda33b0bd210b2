"""SDXL on the Ray executor: a character with a LoRA trained by the trainer actor (SDXL's
conditioning in training and references) and a plain one, batched together in the Sampler with
``kv``; the character's frames equal the in-process render's. One Ray instance for the module;
every wait has a timeout. ``AVATAR_SLOW_TESTS=1`` (Ray's start-up on 2 cores: minutes)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(
    not os.environ.get("AVATAR_SLOW_TESTS"),
    reason="starts Ray and renders SDXL on actors (minutes on 2 cores); AVATAR_SLOW_TESTS=1",
)

from actors.executor import RayExecutor  # noqa: E402
from engine.core import EngineCore, RenderStore  # noqa: E402
from tests.test_cluster import cfg, frames, run  # noqa: E402

XL = ("model.preset=sdxl-tiny", "alignment.inter_frame=kv")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def test_sdxl_lora_and_plain_renders_on_ray_match_in_process(tmp_path: Path):
    from engine.render import render

    trained = ("alignment.intra_frame=true", "appearance.steps=3", "appearance.references=2")
    specs = {"char": cfg(tmp_path, *XL, *trained), "plain": cfg(tmp_path, *XL, "seed=6", frames=12)}
    engine = cfg(tmp_path, *XL)
    core = EngineCore(engine, RenderStore(tmp_path / "ray"), RayExecutor(engine))
    try:
        records = run(core, specs, timeout=600)
        mixed = [b for b in core.stats["batches"] if {r for r, _ in b} == {"char", "plain"}]
    finally:
        core.close()
    assert {r.state for r in records.values()} == {"done"}, records
    assert mixed, core.stats["batches"]
    render(specs["char"], tmp_path / "inproc", progress=False)
    ray_frames, local = frames(tmp_path / "ray" / "char"), frames(tmp_path / "inproc")
    assert np.abs(ray_frames.astype(int) - local).max() <= 1
