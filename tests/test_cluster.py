"""The engine core on a local Ray instance (RayExecutor): batch jobs, mixed batches, the fault
table through the real actors, Samplers killed while idle and busy, text-encoder LoRA.

One Ray instance for the module; every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from actors.executor import RayExecutor  # noqa: E402
from cluster.batch import run_batch  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.core import EngineCore, RenderStore  # noqa: E402
from engine.pose import save_poses_json, synthetic_dance  # noqa: E402
from engine.video import load_png, probe_video, save_png  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def poses(tmp: Path, frames: int = 3) -> Path:
    path = tmp / f"poses{frames}.json"
    if not path.is_file():
        save_poses_json(synthetic_dance(frames=frames, fps=8, width=512, height=512), path)
    return path


def cfg(tmp: Path, *overrides: str, frames: int = 3):
    base = [
        f"poses={poses(tmp, frames)}",
        "prompt=a woman dancing",
        "sampler.steps=2",
        "output.contact_sheet=false",
        "cluster.max_batch=4",
        "cluster.batch_padding=max",
        f"cache_dir={tmp / 'cache'}",
    ]
    return load_config(None, overrides=[*base, *overrides])


def frames(out: Path, n: int = 3) -> np.ndarray:
    return np.stack([load_png(out / "frames" / f"{i:06d}.png") for i in range(n)])


def run(core: EngineCore, specs: dict, timeout: float = 300) -> dict[str, object]:
    for rid, config in specs.items():
        core.submit(config, id=rid)
    core.run_until_idle(timeout_s=timeout)
    return {r.id: r for r in core.list()}


def test_batch_job_renders_resumes_and_reruns_without_actors(tmp_path: Path):
    poses(tmp_path)
    manifest = {
        "preset": "tiny",
        "set": ["sampler.steps=2", "output.contact_sheet=false", "cluster.max_batch=4",
                f"cache_dir={tmp_path / 'cache'}", "alignment.inter_frame=kv"],
        "renders": [
            {"id": "a", "prompt": "a woman dancing", "poses": "poses3.json", "seed": 1},
            {"id": "b", "prompt": "a robot dancing", "poses": "poses3.json", "seed": 2},
            {"id": "c", "prompt": "a man", "poses": "poses3.json", "seed": 3, "priority": 1},
            {"id": "bad", "prompt": "x", "poses": "nowhere.json"},
        ],
    }  # fmt: skip
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(manifest))
    summary = run_batch(path, tmp_path / "out", timeout_s=300)
    status = {k: v["status"] for k, v in summary["renders"].items()}
    assert status == {"a": "done", "b": "done", "c": "done", "bad": "failed"}
    assert "nowhere.json" in summary["renders"]["bad"]["error"]
    for rid in "abc":
        out = tmp_path / "out" / rid
        assert probe_video(out / "video.mp4")["frames"] == 3
        manifest_json = json.loads((out / "manifest.json").read_text())
        assert manifest_json["stages"]["executor"] == "ray"
        assert (out / "refined_prompt.json").is_file() and manifest_json["seconds_per_frame"] > 0
        assert manifest_json["peak_rss_mb"] > 0  # the Sampler's, not the driver's
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["frames_rendered"] == 9
    again = run_batch(path, tmp_path / "out", timeout_s=120)
    assert {k: v["status"] for k, v in again["renders"].items() if k != "bad"} == dict.fromkeys(
        "abc", "skipped"
    )
    assert again["actors_started"] == 0  # nothing left to render: no actor started
    assert again["renders"]["bad"]["status"] == "failed"


def test_input_faults_in_every_actor_fail_only_their_render(tmp_path: Path):
    """The refiner, the trainer, the background worker, and the Sampler's open and denoise each
    raise for one render; each fails alone, at once, with a reason naming the cause."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    few = tmp_path / "few"
    few.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"m{i}.png").write_bytes(b"not a png")
    bg = ("alignment.background=true", "background.inpaint_steps=1")
    specs = {
        "good": cfg(tmp_path, "alignment.inter_frame=kv"),
        "refiner": cfg(tmp_path, "refine.backend=openai", "refine.base_url=http://127.0.0.1:9/v1",
                       "refine.max_retries=0", "refine.timeout_s=2",
                       "refine.fallback_to_template=false"),
        "trainer": cfg(tmp_path, "alignment.intra_frame=true", f"cache_dir={not_a_dir}",
                       f"refine.cache_dir={tmp_path / 'refine'}"),
        "background": cfg(tmp_path, *bg, "background.mask_source=sam",
                          "background.fallback_to_pose=false"),
        "open": cfg(tmp_path, *bg, "background.mask_source=pose", f"masks={few}"),
        "denoise": cfg(tmp_path, *bg, "background.mask_source=pose", f"masks={corrupt}"),
    }  # fmt: skip
    core = EngineCore(specs["good"], RenderStore(tmp_path / "root"), RayExecutor(specs["good"]))
    try:
        records = run(core, specs)
    finally:
        core.close()
    assert records["good"].state == "done"
    needles = {"refiner": "refin", "trainer": "file", "background": "SAM", "open": "masks",
               "denoise": "m0.png"}  # fmt: skip
    for rid, needle in needles.items():
        r = records[rid]
        assert r.state == "failed" and r.error_kind == "input", (rid, r.error)
        assert needle.lower() in r.error.lower() and "\n" not in r.error, (rid, r.error)
        assert r.attempts <= 1, (rid, r.attempts)


def test_sampler_killed_idle_and_busy_loses_nothing(tmp_path: Path):
    """Kill the Sampler between batches (it restarts with no sessions) and in the middle of a
    batch (the batch is retried on the restarted actor); frames equal the clean run's."""
    specs = {
        rid: cfg(tmp_path, "alignment.inter_frame=kv+latent", "sampler.steps=6", f"seed={i}",
                 frames=5)
        for i, rid in enumerate(("a", "b"))
    }  # fmt: skip
    first = specs["a"]
    clean = EngineCore(first, RenderStore(tmp_path / "clean"), RayExecutor(first))
    try:
        assert {r.state for r in run(clean, specs).values()} == {"done"}
        assert max(clean.stats["batch_sizes"]) == 2  # frames of both characters in one batch
    finally:
        clean.close()
    executor = RayExecutor(first)
    kills: list[str] = []

    def on_event(event):
        if event["type"] != "frame":
            return
        sampler = executor.samplers.actors[0]
        if len(kills) == 0 and event["frame"] == 0:  # the update phase: no batch in flight
            kills.append("idle")
            ray.kill(sampler, no_restart=False)
        elif len(kills) == 1 and event["frame"] == 2:
            kills.append("busy")
            threading.Thread(target=kill_when_busy, args=(sampler,), daemon=True).start()

    def kill_when_busy(sampler) -> None:  # the next batch is submitted right after this event
        deadline = time.monotonic() + 60
        while not executor._busy and time.monotonic() < deadline:
            time.sleep(0.005)
        ray.kill(sampler, no_restart=False)

    faulty = EngineCore(first, RenderStore(tmp_path / "faulty"), executor, on_event=on_event)
    try:
        records = run(faulty, specs)
        sessions = _when_available(lambda: executor.samplers.actors[0].sessions.remote())
        assert executor.stats["replaced_actors"] == 0  # restarted by Ray, not replaced
    finally:
        faulty.close()
    assert kills == ["idle", "busy"] and {r.state for r in records.values()} == {"done"}
    assert faulty.stats["retries"] >= 2  # each kill cost a batch, retried
    assert sessions == []  # every session closed when its render ended
    for rid in specs:
        assert np.array_equal(frames(tmp_path / "clean" / rid, 5),
                              frames(tmp_path / "faulty" / rid, 5)), rid  # fmt: skip


def _when_available(call, timeout: float = 60.0):
    """``ray.get(call())``, asked again while the actor is restarting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(call(), timeout=timeout)
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_failing_constructor_fails_the_render_after_the_retry_cap(tmp_path: Path):
    """Samplers whose constructor raises (real weights that are not there): the render fails
    after cluster.max_attempts batches with the reason; no busy loop."""
    weights = tmp_path / "weights"
    weights.mkdir()
    config = cfg(tmp_path, "model.preset=sd15", f"model.base={weights}", "model.offline=true",
                 "model.dtype=float32", "model.device=cpu", "cluster.max_restarts=0",
                 "cluster.max_attempts=2", "cluster.sampler_gpus=0", "cluster.trainer_gpus=0",
                 "cluster.background_gpus=0")  # fmt: skip
    core = EngineCore(config, RenderStore(tmp_path / "root"), RayExecutor(config))
    try:
        record = run(core, {"x": config}, timeout=240)["x"]
        batches = len(core.stats["batch_sizes"])
    finally:
        core.close()
    assert record.state == "failed" and record.error_kind == "infra"
    assert "worker died" in record.error and "2 attempts" in record.error, record.error
    assert batches == 2


def test_text_encoder_lora_and_a_supplied_plate_on_ray_match_in_process(tmp_path: Path):
    """A text-encoder LoRA renders on Ray with the frames `avatar render` makes; a supplied
    plate with intra-frame alignment does not stall other renders while the LoRA trains."""
    from engine.render import render

    plate = tmp_path / "plate.png"
    save_png(np.full((64, 64, 3), 90, np.uint8), plate)
    lora = ("alignment.intra_frame=true", "appearance.references=2", "appearance.steps=4",
            "appearance.train_text_encoder=true", "alignment.inter_frame=kv+latent")  # fmt: skip
    slow = ("alignment.intra_frame=true", "appearance.references=4", "appearance.steps=300",
            "alignment.background=true", f"plate={plate}", "seed=5")  # fmt: skip
    specs = {
        "plated": cfg(tmp_path, *slow),
        "plain": cfg(tmp_path, "seed=6", frames=3),
        "te": cfg(tmp_path, *lora),
    }
    engine = cfg(tmp_path, "cluster.max_preparing=3", "cluster.trainers=2")
    core = EngineCore(engine, RenderStore(tmp_path / "ray"), RayExecutor(engine))
    try:
        records = run(core, specs)
        batches = core.stats["batches"]
    finally:
        core.close()
    assert {r.state for r in records.values()} == {"done"}, records
    first = {rid: next(i for i, b in enumerate(batches) if any(r == rid for r, _ in b))
             for rid in specs}  # fmt: skip
    plain_frames_before = sum(1 for b in batches[: first["plated"]] for r, _ in b if r == "plain")
    assert plain_frames_before >= 2, batches  # not held behind the training LoRA
    render(specs["te"], tmp_path / "inproc", progress=False)
    ray_frames, local = frames(tmp_path / "ray" / "te"), frames(tmp_path / "inproc")
    # Same batch shapes; the Ray worker runs 1 torch thread, this process maybe more: ≤ 1 level.
    assert np.abs(ray_frames.astype(int) - local).max() <= 1
