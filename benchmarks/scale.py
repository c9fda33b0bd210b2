"""Scale benchmark: can one engine core feed 1 … 256 GPUs? ``python -m benchmarks.scale``

The real engine core (scheduler, SQLite index, loader, writers, backlog bound) and the real
storage backend (a local folder: temp + fsync + rename per object, under ``--tmp``), with a
simulated GPU executor: a batch of B frames takes T = B × ``--frame-s`` seconds of wall time
(no CPU) and yields real frames of the configured size — real PNG bytes and a real
(1, 4, side/8, side/8) float32 latent per frame — written where the real system writes them:
by the worker itself on a shared backend (``--write worker``: the folder is declared shared, as
an object store is), or sent back encoded and written by the core's writer pool (``--write
head``, a head-local folder). A worker delivers a batch's frames side by side, as the Sampler
does (:func:`engine.core.work.deliver`).

Encoding: each simulated GPU encodes a pool of 8 distinct frames once and reuses their bytes; on
a real cluster the encoding runs on the GPU node's CPU inside T (its cost per frame on this
machine is reported). Finishing (video + manifest, the core's finisher threads) is skipped: it
runs after a render's last frame, outside the frame path measured here.

Reported per (side, GPUs), with GPUs × B renders of ``--frames`` frames: frames/s; efficiency =
the frames the GPUs computed in the steady window ÷ (window × GPUs × B ÷ T), where the window
runs from the moment every GPU has had work until the first render ends (a GPU the core leaves
idle, or hands a part-full batch, lowers it); efficiency end to end (durable frames ÷ wall time
÷ the ideal rate, ramp and tail included); the core's stepping-thread CPU ms per frame; the
ramp-up until every GPU has had work; the tail after the last batch is handed out; the peak
unwritten backlog; the peak RSS of the process and its growth during the run (each
configuration runs in its own process). JSON at ``--out`` (``efficiency["512"]["64"]`` = steady
efficiency at 64 GPUs with 512² frames).
"""

from __future__ import annotations

import argparse
import heapq
import io
import json
import os
import queue
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import OUT, machine_info
from engine.config import load_config
from engine.core import EngineCore, RenderStore
from engine.core.encode import EncodedFrame, frame_keys, latent_bytes, png_bytes
from engine.core.executor import BatchDone, Executor, Outcome, Prepared, PrepareJob
from engine.core.work import FrameOutcome, FrameWork, SessionSpec, deliver
from engine.pose import save_poses_json, synthetic_dance
from engine.storage import LocalStorage, Storage

GPUS = (1, 8, 64)
"""Default GPU counts (``--gpus 1 8 64 256`` adds 256: about 10 more minutes on this machine)."""
SIDES = (64, 512)
NOTE = (
    "the simulated GPUs' clocks, the workers' writes and the core share this machine's CPU "
    "cores (2, shared with other engineers' work): a real head runs the core alone"
)
TARGET = {"side": 512, "gpus": 64, "efficiency": 0.90}


def frame_pool(side: int, count: int = 8, seed: int = 0) -> list[tuple[bytes, bytes, bytes]]:
    """``count`` distinct (frame PNG, pose-map PNG, latent safetensors) of a ``side``² render:
    smooth colour fields with noise (a generated frame's PNG size, not a flat image's)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    pool = []
    for i in range(count):
        base = np.stack([np.sin(6 * x + i), np.cos(5 * y - i), np.sin(4 * (x + y))], -1)
        image = np.clip(127 + 90 * base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        pose = np.zeros_like(image)
        pose[side // 4 : 3 * side // 4, side // 2 - 2 : side // 2 + 2] = (255, 0, 0)
        latent = rng.standard_normal((1, 4, side // 8, side // 8)).astype(np.float32)
        pool.append((png_bytes(image), png_bytes(pose), latent_bytes(latent)))
    return pool


class SimulatedGPUs(Executor):
    """``gpus`` Samplers whose batches take ``batch_s`` seconds of wall time each and come back
    as real encoded frames, written by the worker (``write_on_worker``) or by the core."""

    name = "simulated"

    def __init__(self, gpus: int, batch_s: float, side: int, write_on_worker: bool):
        self.gpus, self.batch_s, self.side = gpus, batch_s, side
        self.write_on_worker = write_on_worker
        self.pool = frame_pool(side)
        self.latent = np.zeros((1, 4, side // 8, side // 8), np.float32)
        self.busy: dict[int, int] = {}  # batch id → gpu
        self.free = list(range(gpus))
        self.first_busy: dict[int, float] = {}
        self.spans: list[tuple[float, float, int]] = []
        """(start, end, frames) of every batch that ran."""
        self.outs: dict[str, Storage | None] = {}
        self._timers: list[tuple[float, int, int, list[FrameWork]]] = []
        self._cv = threading.Condition()
        self._done: queue.Queue[Outcome] = queue.Queue()
        self._stop = False
        self._threads = [threading.Thread(target=self._finish_loop, daemon=True)
                         for _ in range(min(256, gpus))]  # fmt: skip
        for t in self._threads:
            t.start()

    def prepare(self, job: PrepareJob) -> None:
        refined = {"full": job.config.prompt, "clothes": "", "face": "", "background": "",
                   "negative": ""}  # fmt: skip
        self._done.put(Prepared(job.render_id, refined, None, None, {}))
        self._ring()

    def open(self, render_id: str, spec: SessionSpec) -> None:
        self.outs[render_id] = spec.out

    def free_slots(self) -> int:
        return len(self.free)

    def execute(self, batch_id: int, work: list[FrameWork]) -> None:
        gpu = self.free.pop()
        self.first_busy.setdefault(gpu, time.monotonic())
        with self._cv:
            now = time.monotonic()
            self.spans.append((now, now + self.batch_s, len(work)))
            heapq.heappush(self._timers, (now + self.batch_s, batch_id, gpu, work))
            self._cv.notify()

    def _finish_loop(self) -> None:
        """The GPUs' clocks: a batch is due ``batch_s`` after it started; its worker then
        delivers its frames (writes them itself on a shared backend)."""
        while True:
            with self._cv:
                while not self._stop and (
                    not self._timers or self._timers[0][0] > time.monotonic()
                ):
                    wait = self._timers[0][0] - time.monotonic() if self._timers else None
                    self._cv.wait(wait)
                if self._stop:
                    return
                _, batch_id, gpu, work = heapq.heappop(self._timers)
            outcomes = [self._outcome(w) for w in work]
            if self.write_on_worker:  # as the Sampler does: the batch's frames side by side
                deliver(outcomes, self.outs.get)
            self._done.put(BatchDone(batch_id, outcomes, self.batch_s, 0.0))
            self._done.put(_Freed(gpu))
            self._ring()

    def _outcome(self, w: FrameWork) -> FrameOutcome:
        frame, pose, latent = self.pool[(hash(w.render_id) + w.index) % len(self.pool)]
        keys = frame_keys(w.index)
        encoded = EncodedFrame(w.index, {keys["pose"]: pose, keys["frame"]: frame,
                                         keys["latent"]: latent})  # fmt: skip
        return FrameOutcome(w.render_id, w.index, latent=self.latent.copy(), encoded=encoded)

    def poll(self, timeout: float) -> list[Outcome]:
        if self._done.empty():
            self._doze(timeout)  # a batch due, or the core's writers / loader ring
        out: list[Outcome] = []
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return out
            if isinstance(item, _Freed):
                self.free.append(item.gpu)
            else:
                out.append(item)

    def release(self, render_id: str) -> None:
        self.outs.pop(render_id, None)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()


class _Freed:
    def __init__(self, gpu: int):
        self.gpu = gpu


class SharedFolder(LocalStorage):
    """A local folder declared shared (an NFS mount on every node; here, this machine's disk)."""

    def __init__(self, root: Path, prefix: str = ""):
        super().__init__(root, prefix, shared=True)

    def _clone(self, prefix: str) -> Storage:
        return SharedFolder(self.root, prefix)


class FramePathCore(EngineCore):
    """The engine core without the finisher's video encoding (outside the frame path)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._finisher.outputs = lambda live, **_: None


def run_one(gpus: int, side: int, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this process → its record."""
    batch, frames = args.batch, args.frames
    batch_s = batch * args.frame_s
    with tempfile.TemporaryDirectory(prefix="avatar-scale-", dir=args.tmp) as tmp:
        root = Path(tmp)
        save_poses_json(synthetic_dance(frames=frames, fps=8, width=side, height=side),
                        root / "poses.json")  # fmt: skip
        overrides = [f"poses={root / 'poses.json'}", "prompt=a dancer", f"width={side}",
                     f"height={side}", f"cluster.max_batch={batch}",
                     "cluster.max_preparing=1024", "cluster.max_queued=100000",
                     f"cluster.max_unwritten_frames={args.max_unwritten}",
                     f"cluster.writers={args.writers}", f"cluster.loaders={args.loaders}",
                     "output.contact_sheet=false",
                     f"cache_dir={root / 'cache'}"]  # fmt: skip
        config = load_config(None, overrides=overrides)
        storage = (
            SharedFolder(root / "renders")
            if args.write == "worker"
            else LocalStorage(root / "renders")
        )
        executor = SimulatedGPUs(gpus, batch_s, side, args.write == "worker")
        core = FramePathCore(config, RenderStore(root / "index", storage=storage), executor)
        renders = gpus * batch
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.monotonic()
        for i in range(renders):
            core.submit(config, id=f"r{i}")
        submit_s = time.monotonic() - t0
        done_times: list[float] = []
        last_frames: list[float] = []  # when each render's last frame became durable

        def on_event(e: dict[str, Any]) -> None:
            if e["type"] == "frame":
                done_times.append(time.monotonic())
                if e["frame"] == frames - 1:
                    last_frames.append(time.monotonic())

        core.on_event = on_event
        start = time.monotonic()
        cpu0 = time.thread_time()
        last_dispatch = start
        batches = 0
        while not core.idle:
            if time.monotonic() - start > args.timeout:
                raise TimeoutError(f"{gpus} GPUs, {side}²: not done after {args.timeout} s")
            core.step()
            if len(core.stats["batch_sizes"]) != batches:
                batches, last_dispatch = len(core.stats["batch_sizes"]), time.monotonic()
        end = time.monotonic()
        cpu_s = time.thread_time() - cpu0
        stats = dict(core.stats)
        states = {r.state for r in core.list(limit=renders)}
        core.close()
        executor.close()
    total = len(done_times)
    ideal = gpus * batch / batch_s
    ramp_end = max(executor.first_busy.values()) if len(executor.first_busy) == gpus else end
    # steady window: every GPU has had work … the first render ended (from then on fewer
    # frames than GPUs x B can be ready); the frames the GPUs computed in it, each batch's
    # frames weighted by its overlap with the window
    window_end = min(last_frames) if last_frames else end
    steady_s = window_end - ramp_end
    computed = sum(
        n * max(0.0, min(b, window_end) - max(a, ramp_end)) / batch_s for a, b, n in executor.spans
    )
    steady = computed / steady_s / ideal if steady_s >= batch_s else None
    return {
        "gpus": gpus,
        "side": side,
        "write": args.write,
        "renders": renders,
        "frames": total,
        "states": sorted(states),
        "batch": batch,
        "batch_s": batch_s,
        "ideal_fps": round(ideal, 2),
        "fps": round(total / (end - start), 2),
        "efficiency": None if steady is None else round(steady, 3),
        "efficiency_end_to_end": round(total / (end - start) / ideal, 3),
        "steady_window_s": round(steady_s, 2),
        "core_cpu_ms_per_frame": round(1000 * cpu_s / max(total, 1), 3),
        "submit_s": round(submit_s, 2),
        "ramp_s": round(ramp_end - start, 2),
        "tail_s": round(end - last_dispatch, 2),
        "wall_s": round(end - start, 2),
        "max_unwritten": stats["max_unwritten"],
        "held_for_writes": stats["held_for_writes"],
        "written_by_workers": stats["written_by_workers"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_growth_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0, 1),
    }


def encode_cost_ms(side: int, repeats: int = 5) -> float:
    """ms to encode one frame's objects (frame + pose map PNG, latent) on this machine."""
    image = frame_pool(side, 1)[0][0]
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    latent = np.zeros((1, 4, side // 8, side // 8), np.float32)
    start = time.perf_counter()
    for _ in range(repeats):
        png_bytes(array), png_bytes(array), latent_bytes(latent)
    return round(1000 * (time.perf_counter() - start) / repeats, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=__doc__.split("\n")[0]
    )
    p.add_argument("--gpus", type=int, nargs="+", default=list(GPUS))
    p.add_argument("--sides", type=int, nargs="+", default=list(SIDES))
    p.add_argument("--batch", type=int, default=8, help="frames per simulated batch (B)")
    p.add_argument("--frames", type=int, default=6, help="frames per render")
    p.add_argument("--frame-s", type=float, default=0.25,
                   help="simulated GPU seconds per frame (T = B × this)")  # fmt: skip
    p.add_argument(
        "--write",
        choices=("worker", "head"),
        default="worker",
        help="worker: Samplers write to a shared backend; head: the core's writers",
    )
    p.add_argument("--max-unwritten", type=int, default=256)
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--loaders", type=int, default=4, help="the core's loader threads")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument(
        "--tmp",
        type=Path,
        default=None,
        help="folder of the temporary renders (default: the system's; /dev/shm takes the disk "
        "out of the measurement)",
    )
    p.add_argument("--out", type=Path, default=OUT / "scale.json")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:  # a child: one configuration, its record on stdout
        print(json.dumps(run_one(args.gpus[0], args.sides[0], args)))
        return 0
    records = []
    for side in args.sides:
        for gpus in args.gpus:
            child = [sys.executable, "-m", "benchmarks.scale", "--one", "--gpus", str(gpus),
                     "--sides", str(side), *_passthrough(args)]  # fmt: skip
            result = subprocess.run(
                child, capture_output=True, text=True, timeout=args.timeout + 120
            )
            if result.returncode:
                raise RuntimeError(f"{gpus} GPUs, {side}²: {result.stderr[-2000:]}")
            record = json.loads(result.stdout.strip().splitlines()[-1])
            records.append(record)
            print(_line(record), flush=True)
    report = _report(records, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from engine.files import atomic_json

    atomic_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


def _passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--batch", str(args.batch), "--frames", str(args.frames), "--frame-s",
           str(args.frame_s), "--write", args.write, "--max-unwritten", str(args.max_unwritten),
           "--writers", str(args.writers), "--loaders", str(args.loaders),
           "--timeout", str(args.timeout)]  # fmt: skip
    return [*out, "--tmp", str(args.tmp)] if args.tmp else out


def _line(r: dict[str, Any]) -> str:
    eff = "—" if r["efficiency"] is None else f"{r['efficiency']:.3f}"
    return (f"{r['side']:>4}² {r['gpus']:>4} GPUs: {r['fps']:8.1f} frames/s (ideal "
            f"{r['ideal_fps']:.1f}), efficiency {eff} steady / {r['efficiency_end_to_end']:.3f} "
            f"end to end, core {r['core_cpu_ms_per_frame']:.2f} ms/frame, ramp {r['ramp_s']} s, "
            f"tail {r['tail_s']} s, backlog ≤ {r['max_unwritten']}, RSS {r['peak_rss_mb']} MB")  # fmt: skip


def _report(records: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    efficiency: dict[str, dict[str, float | None]] = {}
    for r in records:
        efficiency.setdefault(str(r["side"]), {})[str(r["gpus"])] = r["efficiency"]
    got = efficiency.get(str(TARGET["side"]), {}).get(str(TARGET["gpus"]))
    return {
        "machine": {
            **machine_info(),
            "load_avg_1m": os.getloadavg()[0],
            "note": NOTE,
        },
        "settings": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("one", "out")
        },
        "encode_ms_per_frame": {str(s): encode_cost_ms(s) for s in args.sides},
        "efficiency": efficiency,
        "target": {
            **TARGET,
            "measured": got,
            "met": got is not None and got >= TARGET["efficiency"],
        },
        "runs": records,
    }


if __name__ == "__main__":
    sys.exit(main())
