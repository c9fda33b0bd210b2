"""Cluster renders on a local Ray instance: many characters, mixed batches, faults, batch jobs.

One Ray instance for the module; every wait has a timeout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from actors.driver import ClusterRenderer  # noqa: E402
from actors.scheduler import Stage  # noqa: E402
from cluster.batch import load_manifest, run_batch  # noqa: E402
from engine.pose import save_poses_json, synthetic_dance  # noqa: E402
from engine.video import load_png, probe_video  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def write_manifest(tmp: Path, renders: list[dict], settings: list[str] | None = None) -> Path:
    save_poses_json(synthetic_dance(frames=3, fps=8, width=512, height=512), tmp / "poses.json")
    base = [
        "sampler.steps=2",
        "output.contact_sheet=false",
        "cluster.max_batch=4",
        f"cache_dir={tmp / 'cache'}",
    ]
    manifest = {"preset": "tiny", "set": base + (settings or []), "renders": renders}
    path = tmp / "batch.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def frames(out: Path, n: int = 3) -> np.ndarray:
    return np.stack([load_png(out / "frames" / f"{i:06d}.png") for i in range(n)])


RENDERS = [
    {"id": "a", "prompt": "a woman dancing", "poses": "poses.json", "seed": 1},
    {"id": "b", "prompt": "a robot dancing", "poses": "poses.json", "seed": 2},
    {"id": "c", "prompt": "a man dancing", "poses": "poses.json", "seed": 3, "priority": 1},
]


def test_batch_renders_many_characters_and_resumes(tmp_path: Path):
    manifest = write_manifest(tmp_path, RENDERS, ["alignment.inter_frame=kv"])
    summary = run_batch(manifest, tmp_path / "out", timeout_s=300)
    assert {k: v["status"] for k, v in summary["renders"].items()} == {
        "a": "done",
        "b": "done",
        "c": "done",
    }
    for render_id in "abc":
        out = tmp_path / "out" / render_id
        assert probe_video(out / "video.mp4")["frames"] == 3
        assert json.loads((out / "manifest.json").read_text())["stages"]["executor"] == "ray"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["frames_rendered"] == 9
    # Re-running the manifest skips what is finished.
    again = run_batch(manifest, tmp_path / "out", timeout_s=120)
    assert {k: v["status"] for k, v in again["renders"].items() if k != "bad"} == dict.fromkeys(
        "abc", "skipped"
    )


def test_mixed_batches_and_sampler_failure_lose_nothing(tmp_path: Path):
    """Kill the Sampler mid-chain: the batch is re-run on the restarted actor, frames identical."""
    manifest = write_manifest(tmp_path, RENDERS[:2], ["alignment.inter_frame=kv+latent"])
    engine, renders = load_manifest(manifest)

    def run(out: Path, kill_after: int | None) -> ClusterRenderer:
        done = []

        def on_event(event):
            # The driver keeps two latents per chain (anchor + latest), however long it is.
            assert all(len(t.latents) <= 2 for t in renderer.tasks.values())
            if event.frames_done and event.stage is Stage.RENDERING:
                done.append(event)
                if kill_after is not None and len(done) == kill_after:
                    ray.kill(renderer.samplers[0], no_restart=False)

        renderer = ClusterRenderer(engine, on_event=on_event)
        for entry, config in renders:
            renderer.submit(entry.id, config, out / entry.id)
        status = renderer.run(timeout_s=300)
        assert {s.stage for s in status.values()} == {Stage.DONE}
        return renderer

    clean = run(tmp_path / "clean", None)
    faulty = run(tmp_path / "faulty", kill_after=2)
    assert max(clean.stats["batch_sizes"]) == 2  # frames of both characters in one batch
    assert faulty.stats["sampler_failures"] >= 1 and faulty.stats["requeued_frames"] >= 1
    for render_id in ("a", "b"):
        assert np.array_equal(
            frames(tmp_path / "clean" / render_id), frames(tmp_path / "faulty" / render_id)
        )
