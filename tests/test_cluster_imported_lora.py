"""A character LoRA brought from elsewhere (appearance.lora) on the Ray executor: imported by the
trainer actor, shipped to the Sampler, rendered per row beside a base render; the frames equal
`avatar render`'s. One Ray instance for the module; every wait has a timeout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from actors.executor import RayExecutor  # noqa: E402
from engine.core import EngineCore, RenderStore  # noqa: E402
from tests import weights_layouts as wl  # noqa: E402
from tests.test_cluster import cfg, frames, run  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def test_imported_lora_on_ray_matches_in_process(tmp_path: Path):
    from engine.render import render

    parts = wl.tiny_parts()
    lora = tmp_path / "character.safetensors"
    kohya = wl.kohya_lora(parts.unet, parts.text_encoder, seed=11, std=0.2, extra=True)
    save_file(kohya, str(lora))
    imported = ("alignment.intra_frame=true", f"appearance.lora={lora}", "alignment.inter_frame=kv")
    plain = cfg(tmp_path, "seed=6", "alignment.inter_frame=kv", frames=8)
    specs = {"char": cfg(tmp_path, *imported), "plain": plain}
    engine = cfg(tmp_path)
    core = EngineCore(engine, RenderStore(tmp_path / "ray"), RayExecutor(engine))
    try:
        records = run(core, specs)
        mixed = [b for b in core.stats["batches"] if {r for r, _ in b} == {"char", "plain"}]
    finally:
        core.close()
    assert {r.state for r in records.values()} == {"done"}, records
    assert mixed, core.stats["batches"]
    render(specs["char"], tmp_path / "inproc", progress=False)
    ray_frames, local = frames(tmp_path / "ray" / "char"), frames(tmp_path / "inproc")
    # Same batch shapes (padding max); the Ray worker runs 1 torch thread: ≤ 1 grey level.
    assert np.abs(ray_frames.astype(int) - local).max() <= 1
    assert np.abs(ray_frames.astype(int) - frames(tmp_path / "ray" / "plain", 3)).mean() > 1
