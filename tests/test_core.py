"""The engine core in one process: store, ids, idempotency, continuous admission, cancellation,
input faults, and a SIGKILLed core whose renders finish after a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.config import ConfigError, load_config
from engine.core import (
    ConflictError,
    EngineCore,
    InProcessExecutor,
    QueueFullError,
    RenderStore,
)
from engine.pose import save_poses_json, synthetic_dance
from engine.video import load_png, probe_video

ROOT = Path(__file__).resolve().parents[1]


def spec(tmp: Path, *overrides: str, frames: int = 3):
    poses = tmp / f"poses{frames}.json"
    if not poses.is_file():
        save_poses_json(synthetic_dance(frames=frames, fps=8, width=512, height=512), poses)
    base = [
        f"poses={poses}",
        "prompt=a woman dancing",
        "sampler.steps=2",
        "output.contact_sheet=false",
        "cluster.max_batch=4",
        "cluster.batch_wait_s=0",
        f"cache_dir={tmp / 'cache'}",
    ]
    return load_config(None, overrides=[*base, *overrides])


@pytest.fixture(scope="module")
def chain():
    from engine.core.work import build_chain

    return build_chain(spec(Path("/tmp")).model)


def core_at(root: Path, config, chain, **kw) -> EngineCore:
    return EngineCore(config, RenderStore(root), InProcessExecutor(config, chain), **kw)


def frames(out: Path, n: int) -> np.ndarray:
    return np.stack([load_png(out / "frames" / f"{i:06d}.png") for i in range(n)])


def test_ids_are_validated_or_generated(tmp_path: Path, chain):
    config = spec(tmp_path)
    core = core_at(tmp_path / "root", config, chain)
    try:
        for bad in ("..", ".", "a/b", "", "x" * 65, "a b"):
            with pytest.raises(ConfigError, match="render id"):
                core.submit(config, id=bad)
        generated = core.submit(config)
        assert len(generated) == 16 and core.folder(generated) == tmp_path / "root" / generated
        core.cancel(generated)
    finally:
        core.close()


def test_submit_is_idempotent_and_conflicts_name_the_id(tmp_path: Path, chain):
    config = spec(tmp_path)
    core = core_at(tmp_path / "root", config, chain)
    try:
        assert core.submit(config, id="same") == "same"
        assert core.submit(config, id="same") == "same"  # same spec: the same render
        with pytest.raises(ConflictError, match="same"):
            core.submit(spec(tmp_path, "seed=9"), id="same")
        core.run_until_idle(timeout_s=300)
        assert [r.id for r in core.list()] == ["same"] and core.get("same").state == "done"
        states = [e["state"] for e in core.events("same") if e["type"] == "state"]
        assert states == ["queued", "refining", "rendering", "encoding", "done"]
        frame_events = [e for e in core.events("same") if e["type"] == "frame"]
        assert [e["frame"] for e in frame_events] == [0, 1, 2]
        seqs = [e["seq"] for e in core.events("same")]
        assert seqs == list(range(1, len(seqs) + 1))  # replay from any point: after=seq
        assert [e["seq"] for e in core.events("same", after=seqs[-3])] == seqs[-2:]
    finally:
        core.close()


def test_queue_is_bounded(tmp_path: Path, chain):
    config = spec(tmp_path, "cluster.max_queued=2")
    core = core_at(tmp_path / "root", config, chain)
    try:
        core.submit(config)
        core.submit(config)
        with pytest.raises(QueueFullError):
            core.submit(config)
    finally:
        core.close()


def test_continuous_admission_and_cancellation(tmp_path: Path, chain):
    """A render submitted while two others render shares their batches; a render cancelled
    mid-chain ends CANCELLED with its session and LoRA freed, the others finish."""
    config = spec(tmp_path, "seed=1", "cluster.max_preparing=3", frames=6)
    lora = ("alignment.intra_frame=true", "appearance.references=2", "appearance.steps=2")
    executor = InProcessExecutor(config, chain)
    core = EngineCore(config, RenderStore(tmp_path / "root"), executor)
    try:
        core.submit(config, id="a")
        core.submit(spec(tmp_path, "seed=2", "cluster.max_preparing=3", *lora, frames=6), id="b")
        core.submit(spec(tmp_path, "seed=4", "cluster.max_preparing=3", frames=6), id="victim")
        deadline = time.monotonic() + 300
        while core.get("a").frames_done < 2 or core.get("victim").frames_done < 1:
            assert time.monotonic() < deadline
            core.step()
        core.submit(spec(tmp_path, "seed=3", "cluster.max_preparing=3", frames=6), id="c")
        assert "victim" in executor.sampler.sessions
        core.cancel("victim")
        assert core.get("victim").state == "cancelled"
        assert "victim" not in executor.sampler.sessions
        core.run_until_idle(timeout_s=300)
        assert {r.id: r.state for r in core.list()} == {
            "a": "done",
            "b": "done",
            "c": "done",
            "victim": "cancelled",
        }
        mixed = [set(r for r, _ in b) for b in core.stats["batches"]]
        assert any("c" in m and m & {"a", "b"} for m in mixed), mixed  # c joined running ones
        assert all("victim" not in m for m in mixed[-3:])
        assert executor.sampler.sessions == {}  # every session freed
        from engine.appearance import loaded_adapters

        assert loaded_adapters(chain.parts.unet) == []  # b's LoRA left with b
    finally:
        core.close()


def test_input_faults_fail_their_render_alone(tmp_path: Path, chain):
    """A missing pose file, too few mask images, and an unreadable mask fail only their render,
    each with a one-line reason naming the file."""
    masks = tmp_path / "masks"
    masks.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"m{i}.png").write_bytes(b"not a png")
    bg = ("alignment.background=true", "background.mask_source=pose", "background.inpaint_steps=1")
    config = spec(tmp_path)
    core = core_at(tmp_path / "root", config, chain)
    try:
        core.submit(config, id="good")
        core.submit(spec(tmp_path, f"poses={tmp_path / 'nowhere.json'}"), id="noposes")
        core.submit(spec(tmp_path, *bg, f"masks={masks}"), id="fewmasks")
        core.submit(spec(tmp_path, *bg, f"masks={corrupt}"), id="badmask")
        core.run_until_idle(timeout_s=300)
        records = {r.id: r for r in core.list()}
        assert records["good"].state == "done"
        for rid, needle in [("noposes", "nowhere.json"), ("fewmasks", "masks"),
                            ("badmask", "m0.png")]:  # fmt: skip
            record = records[rid]
            assert record.state == "failed" and record.error_kind == "input", record
            assert needle in record.error and "\n" not in record.error, record.error
            assert record.attempts <= 1  # input faults are not retried
    finally:
        core.close()


_WORKER = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from engine.config import load_config
from engine.core import EngineCore, InProcessExecutor, RenderStore
configs = [load_config(None, overrides=[*{base!r}, f"seed={{i}}"]) for i in range(3)]
core = EngineCore(configs[0], RenderStore(Path({store!r})), InProcessExecutor(configs[0]))
for i, c in enumerate(configs):
    core.submit(c, id=f"r{{i}}")
core.run_until_idle(timeout_s=600)
"""


def test_sigkilled_core_resumes_every_render_exactly(tmp_path: Path, chain):
    """SIGKILL the process running the core with 3 renders in flight; a new core on the same
    store finishes them without resubmission, frames equal to an uninterrupted run."""
    base = [
        f"poses={tmp_path / 'poses6.json'}",
        "prompt=a woman dancing",
        "sampler.steps=2",
        "output.contact_sheet=false",
        "cluster.max_batch=4",
        "cluster.batch_wait_s=0",
        "alignment.inter_frame=kv+latent",
        "cluster.batch_padding=max",  # one batch shape: bitwise on this machine
        f"cache_dir={tmp_path / 'cache'}",
    ]
    save_poses_json(synthetic_dance(frames=6, fps=8, width=512, height=512),
                    tmp_path / "poses6.json")  # fmt: skip
    store = tmp_path / "killed"
    code = _WORKER.format(root=str(ROOT), base=base, store=str(store))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "the core ended before it was killed"
            assert time.monotonic() < deadline
            done = [len(list((store / f"r{i}" / "latents").glob("*.safetensors")))
                    for i in range(3)]  # fmt: skip
            if min(done) >= 1 and max(done) >= 2:
                break
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    configs = [load_config(None, overrides=[*base, f"seed={i}"]) for i in range(3)]
    resumed = core_at(store, configs[0], chain)  # no resubmission
    try:
        assert {r.id for r in resumed.store.unfinished()} <= {"r0", "r1", "r2"}
        resumed.run_until_idle(timeout_s=300)
        assert {r.id: r.state for r in resumed.list()} == dict.fromkeys(["r0", "r1", "r2"], "done")
    finally:
        resumed.close()
    clean = core_at(tmp_path / "clean", configs[0], chain)
    try:
        for i, c in enumerate(configs):
            clean.submit(c, id=f"r{i}")
        clean.run_until_idle(timeout_s=300)
    finally:
        clean.close()
    for i in range(3):
        killed, ref = frames(store / f"r{i}", 6), frames(tmp_path / "clean" / f"r{i}", 6)
        assert np.array_equal(killed, ref), f"r{i}: max diff {np.abs(killed - ref).max()}"
        assert probe_video(store / f"r{i}" / "video.mp4")["frames"] == 6


def _partial(root: Path, config, chain, frames_wanted: int) -> None:
    """Run a render until ``frames_wanted`` frames are persisted, then drop the core (a crash)."""
    core = core_at(root, config, chain)
    core.submit(config, id="r")
    deadline = time.monotonic() + 300
    while core.get("r").frames_done < frames_wanted:
        assert time.monotonic() < deadline
        core.step()
    core.close()


def test_resume_reuses_the_refined_prompt_and_refuses_changed_inputs(tmp_path: Path, chain,
                                                                    monkeypatch):  # fmt: skip
    """A resumed render never asks the refiner again and reuses its plate, read from the render
    folder's copy of the inputs (the original may be gone); a copy whose content changed since
    the render started is refused, naming it."""
    import engine.core.executor as executor_module
    from engine.video import save_png

    plate = tmp_path / "plate.png"
    save_png(np.full((64, 64, 3), 90, np.uint8), plate)
    config = spec(tmp_path, "alignment.background=true", f"plate={plate}", frames=6)
    _partial(tmp_path / "a", config, chain, 2)

    def no_refiner(*_args, **_kw):
        raise AssertionError("the refiner was asked again on resume")

    monkeypatch.setattr(executor_module, "refine_stage", no_refiner)
    plate.rename(tmp_path / "moved.png")  # the submitter's file is gone
    core = core_at(tmp_path / "a", config, chain)  # resumes "r" from the store
    try:
        core.run_until_idle(timeout_s=300)
        assert core.get("r").state == "done", core.get("r").error
    finally:
        core.close()
    monkeypatch.undo()
    (tmp_path / "moved.png").rename(plate)
    _partial(tmp_path / "b", config, chain, 2)
    save_png(
        np.full((64, 64, 3), 200, np.uint8), tmp_path / "b" / "r" / "inputs" / "plate" / "plate.png"
    )
    core = core_at(tmp_path / "b", config, chain)
    try:
        core.run_until_idle(timeout_s=300)
        record = core.get("r")
    finally:
        core.close()
    assert record.state == "failed" and record.error_kind == "input"
    assert "plate_file" in record.error and "changed" in record.error, record.error


@pytest.mark.parametrize("loaders", [1, 3])
def test_loader_threads_read_renders_side_by_side(tmp_path: Path, chain, monkeypatch, loaders):
    """``cluster.loaders`` renders have their inputs read at once (the ramp of a big batch)."""
    import threading

    import engine.core.handover as handover

    active, peak, guard = 0, 0, threading.Lock()
    real = handover.load_render

    def slow_load(*args, **kwargs):
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        time.sleep(0.3)  # a slow input read (object store, bounded decode child)
        with guard:
            active -= 1
        return real(*args, **kwargs)

    monkeypatch.setattr(handover, "load_render", slow_load)
    config = spec(tmp_path, f"cluster.loaders={loaders}")
    core = core_at(tmp_path / "root", config, chain)
    try:
        for i in range(3):
            core.submit(config, id=f"r{i}")
    finally:
        core.close()  # waits for the loads
    assert peak == loaders
