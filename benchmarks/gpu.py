"""GPU numbers in one command, sized for a short device lease (``--budget-s``).

    make gpu-wheels                                   # here: the wheels the device lacks (.whl/)
    python -m benchmarks.gpu --out $OUT --budget-s 300   # there (see README "Speed")
    python -m benchmarks.gpu --smoke --out out/gpu-smoke  # CPU: tiny preset, 64², 1 step

On ``sd15-random`` (configs/sd15-random.yaml: 512², 25 DDIM steps, CFG 7.5) it measures, in
order of value, each item only if its estimate still fits the budget (else recorded as skipped,
with the reason): s/frame per character at batch 8, 1, 4, 16 with ``inter_frame`` none, against
the goal (≤ 0.2 s/frame at batch 8) and plain diffusers' StableDiffusionControlNetPipeline
batched in the same run; ``kv`` / ``latent`` / ``kv+latent``; bfloat16; per-row LoRA with 3
adapters; the VAE decode's share; the in-process core feeding the Sampler (busy share, NVML
utilisation); ``sampler.deep_cache``; ``torch.compile`` (with its compile time). Every row
carries the peak GPU memory of its timed calls. ``gpu.json`` and ``gpu.md`` are rewritten after
every item, so a killed run still leaves what it measured. An item still running ``--grace-s``
past the budget is recorded as stopped and ends the run (exit status 3); exit status 1 if any
item failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTHONUNBUFFERED", "1")

import torch

from benchmarks import common, gpu_core
from benchmarks import gpu_cases as cases
from benchmarks.gpu_report import SECTIONS, comparisons, markdown


class Skip(Exception):
    """Raised by a measurement that cannot run (its reason is recorded as a skip)."""


Item = tuple[str, str, Callable[[], float], Callable[[], Any]]
"""(section, label, estimate of its seconds, measurement) of one planned measurement."""


class Run:
    """The budget, the report and its files: every item is recorded as measured, skipped (with
    the reason) or failed (with the error), and the files rewritten after each."""

    def __init__(
        self,
        plan: cases.Plan,
        out: Path,
        budget_s: float,
        grace_s: float = 60.0,
        on_overrun: Callable[[int], Any] = os._exit,
    ):
        """``grace_s``: an item still running that long past the budget is recorded as stopped
        and the process ends with ``on_overrun(3)`` (the estimates are leads: this bounds the
        device time whatever they miss)."""
        self.plan, self.out, self.budget_s, self.grace_s = plan, out, budget_s, grace_s
        self.on_overrun = on_overrun
        self.lock = threading.RLock()
        self.current: tuple[str, str] | None = None
        self.closed = False
        self.start = time.perf_counter()
        self.only: frozenset[str] | None = None
        """``--only``: the sections to measure (None = all); the others are recorded as skipped."""
        self.report: dict[str, Any] = {
            "plan": asdict(plan),
            "budget_s": budget_s,
            "machine": machine(plan.device),
            "sections": {name: {"rows": [], "skipped": [], "errors": []} for name in SECTIONS},
        }
        self.row_step_s = 0.0
        """Slowest seconds per UNet row per step seen so far (the estimates' unit)."""
        self.write()
        self.watchdog = threading.Timer(max(budget_s + grace_s - self.elapsed(), 0), self.overrun)
        self.watchdog.daemon = True
        self.watchdog.start()

    def overrun(self) -> None:
        """The watchdog: record the item in flight as stopped, write the files, end the run."""
        with self.lock:
            if self.closed:
                return
            section, label = self.current or ("batches", "between items")
            over = self.elapsed() - self.budget_s
            reason = (
                f"stopped: still running {over:.0f} s past the budget (grace {self.grace_s:.0f} s)"
            )
            self.report["sections"][section]["skipped"].append({"item": label, "reason": reason})
            self.log(f"{section} {label}: {reason}; ending the run")
            self.write()
            self.closed = True
        self.on_overrun(3)

    def close(self) -> None:
        with self.lock:
            self.closed = True
        self.watchdog.cancel()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {text}", flush=True)

    def estimate(self, rows: int, steps: int, calls: int) -> float:
        """Seconds of ``calls`` calls of ``rows`` UNet rows × ``steps`` steps (+25 % for the
        decode and the warm-up), from the slowest unit seen; 0 before the first measurement."""
        return 1.25 * rows * steps * calls * self.row_step_s

    def learn(self, row: dict[str, Any]) -> None:
        if "unet_rows" in row and row.get("denoise_s"):
            steps = self.plan.steps
            self.row_step_s = max(self.row_step_s, row["denoise_s"] / (row["unet_rows"] * steps))

    def do(
        self,
        section: str,
        label: str,
        estimate: float,
        fn: Callable[[], Any],
        required: bool = False,
    ) -> Any:
        """Run one measurement if its section is selected (``--only``; ``required`` items run
        whatever is selected: the model build and the row that calibrates the estimates) and
        ``estimate`` fits what is left of the budget; record it."""
        entry = self.report["sections"][section]
        if self.only is not None and section not in self.only and not required:
            reason = f"not selected (--only {','.join(sorted(self.only))})"
            entry["skipped"].append({"item": label, "reason": reason})
            self.log(f"{section} {label}: skipped ({reason})")
            self.write()
            return None
        if estimate > self.left():
            reason = f"needs ≈{estimate:.1f} s, {max(self.left(), 0):.1f} s of the budget left"
            entry["skipped"].append({"item": label, "reason": reason})
            self.log(f"{section} {label}: skipped ({reason})")
            self.write()
            return None
        self.log(f"{section} {label}: start (estimate {estimate:.0f} s)")
        self.current = (section, label)
        try:
            result = fn()
        except Skip as e:
            entry["skipped"].append({"item": label, "reason": str(e)})
            self.log(f"{section} {label}: skipped ({e})")
            self.write()
            return None
        except Exception as e:
            entry["errors"].append(
                {"item": label, "error": repr(e), "trace": traceback.format_exc()}
            )
            self.log(f"{section} {label}: FAILED {e!r}")
            self.write()
            return None
        if isinstance(result, dict):
            entry["rows"].append({"item": label, **result})
            self.learn(result)
            shown = {k: result[k] for k in ("s_per_frame", "peak_over_resident_gib") if k in result}
            self.log(f"{section} {label}: {shown or 'done'}")
        self.write()
        return result

    def skip_section(self, section: str, reason: str) -> None:
        self.report["sections"][section]["skipped"].append({"item": "all", "reason": reason})
        self.log(f"{section}: skipped ({reason})")
        self.write()

    def write(self) -> None:
        """Rewrite gpu.json and gpu.md (not after the watchdog ended the run)."""
        with self.lock:
            if self.closed:
                return
            self.current = None
            self.report["elapsed_s"] = round(self.elapsed(), 1)
            self.report["status"] = {k: status(v) for k, v in self.report["sections"].items()}
            self.report["comparisons"] = comparisons(self.report)
            common.write_report(self.report, self.out / "gpu.json", markdown(self.report))


def status(section: dict[str, Any]) -> str:
    """``error`` if any item failed, else ``measured`` / ``partial`` / ``skipped`` / ``pending``."""
    if section["errors"]:
        return "error"
    if section["rows"]:
        return "partial" if section["skipped"] else "measured"
    return "skipped" if section["skipped"] else "pending"


def machine(device: str) -> dict[str, Any]:
    """The host (benchmarks.common.machine_info) plus the GPU, CUDA and driver when there is one."""
    info = common.machine_info()
    info["device"] = device
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"]
            info["nvidia_smi"] = subprocess.run(
                query, capture_output=True, text=True, timeout=20
            ).stdout.strip()
    return info


class Planner:
    """The measurements after the main dtype's goal batch, as :data:`Item` in order of value."""

    def __init__(self, run: Run, benches: dict[str, cases.Bench], root: Path):
        self.run, self.plan, self.benches, self.root = run, run.plan, benches, root
        self.main, self.goal = self.plan.dtypes[0], self.plan.goal_batch
        self._pipe: Any = None

    def estimate(self, rows: int, calls: int) -> Callable[[], float]:
        return lambda: self.run.estimate(rows, self.plan.steps, calls)

    def built(self, dtype: str) -> cases.Bench:
        if dtype not in self.benches:
            raise Skip(f"the {dtype} models were not built (see its errors)")
        return self.benches[dtype]

    def batch(self, dtype: str, mode: str, b: int) -> Item:
        section = "batches" if dtype == self.main else "other_dtype"
        rows = b * (4 if "kv" in mode else 2)
        fn = lambda: cases.measure_batch(self.built(dtype), self.plan, mode, b)  # noqa: E731
        return section, f"{dtype} {mode} b={b}", self.estimate(rows, self.plan.repeats), fn

    def peer(self, b: int) -> Item:
        def fn() -> dict[str, Any]:
            if self._pipe is None:
                self._pipe = cases.peer_pipeline(self.benches[self.main])
            return cases.measure_peer(self.benches[self.main], self._pipe, self.plan, b)

        return "diffusers_peer", f"{self.main} b={b}", self.estimate(2 * b, self.plan.repeats), fn

    def build(self, dtype: str) -> Item:
        def fn() -> dict[str, Any]:
            bench = cases.build_bench(self.plan, dtype, source=self.benches[self.main])
            self.benches[dtype] = bench
            return {"dtype": dtype, "build_s": round(bench.build_s, 3)}

        return "other_dtype", f"build {dtype}", lambda: self.benches[self.main].build_s, fn

    def lora(self) -> Item:
        def fn() -> dict[str, Any]:
            bench, plan, goal = self.benches[self.main], self.plan, self.goal
            with cases.three_adapters(bench):
                unused = cases.measure_batch(bench, plan, "none", goal, adapters=[None])
                mixed = [*cases.ADAPTERS, None]
                both = cases.measure_batch(bench, plan, "none", goal, adapters=mixed)
            return {"loaded_unused": unused, "mixed_3_adapters_and_base": both}

        return (
            "lora",
            f"{self.main} b={self.goal}",
            self.estimate(2 * self.goal, 2 * self.plan.repeats),
            fn,
        )

    def core(self) -> Item:
        plan = self.plan
        rows = plan.core_characters * plan.core_frames * 4
        fn = lambda: gpu_core.measure_core(self.benches[self.main], plan, self.root / "core")  # noqa: E731
        estimate = self.estimate(rows, 1)
        label = f"{self.main} {plan.core_characters}x{plan.core_frames}"
        return "core_utilisation", label, lambda: estimate() + 10, fn

    def deep_cache(self) -> Item:
        n = self.plan.deep_cache

        def fn() -> dict[str, Any]:
            bench = self.benches[self.main]
            return cases.measure_batch(bench, self.plan, "none", self.goal, deep_cache=n)

        label = f"{self.main} none b={self.goal} interval={n}"
        return "deep_cache", label, self.estimate(2 * self.goal, self.plan.repeats), fn

    def compile(self) -> Item:
        """torch.compile of the UNet + ControlNet step: ≈120 s of inductor assumed on a GPU
        machine (a lead, unmeasured here) plus the timed calls; the smoke plan's ``eager``
        back-end only traces."""
        base = 120.0 if self.plan.compile_backend == "inductor" else 0.0
        timed = self.estimate(2 * self.goal, self.plan.repeats)

        def fn() -> dict[str, Any]:
            bench = self.benches[self.main]
            with cases.compiled_step(bench, self.plan):
                return cases.measure_batch(bench, self.plan, "none", self.goal)

        return "compile", f"{self.main} none b={self.goal}", lambda: base + timed(), fn

    def items(self) -> list[Item]:
        main, goal, plan = self.main, self.goal, self.plan
        later = [b for b in plan.batches if b != goal]
        aligned = ("kv+latent", "kv", "latent")
        items = [self.peer(goal)]
        items += [self.batch(main, "none", b) for b in later] + [self.peer(b) for b in later]
        items += [self.batch(main, m, goal) for m in aligned]
        items += [self.batch(main, m, b) for b in later for m in aligned]
        for dtype in plan.dtypes[1:]:
            items += [self.build(dtype), self.batch(dtype, "none", goal)]
            items.append(self.batch(dtype, "kv+latent", goal))
        items += [self.lora(), self.core(), self.deep_cache(), self.compile()]
        for dtype in plan.dtypes[1:]:
            items += [self.batch(dtype, m, b) for b in later for m in ("none", "kv+latent")]
            items += [self.batch(dtype, m, b) for b in plan.batches for m in ("kv", "latent")]
        return items


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=common.OUT / "gpu", help="folder of gpu.json/.md")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for every item")
    p.add_argument(
        "--grace-s", type=float, default=60.0, help="end the run this long past the budget"
    )
    p.add_argument("--smoke", action="store_true", help="tiny preset on the CPU (the test)")
    p.add_argument("--preset", default="sd15-random")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--only", default="", help=f"measure only these sections (comma-separated: {SECTIONS})"
    )
    args = p.parse_args(argv)
    if args.budget_s <= 0 or args.grace_s < 0:
        p.error(f"--budget-s must be > 0 and --grace-s >= 0, got {args.budget_s}, {args.grace_s}")
    only = frozenset(filter(None, args.only.split(",")))
    if only - set(SECTIONS):
        p.error(f"--only: unknown sections {sorted(only - set(SECTIONS))}; use {list(SECTIONS)}")
    plan = cases.SMOKE if args.smoke else cases.full_plan(args.preset, args.device)
    if plan.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here: run on the GPU machine, or --smoke on a CPU")
    if plan.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    run = Run(plan, args.out, args.budget_s, args.grace_s)
    run.only = only or None
    run.log(f"plan {plan}; machine {run.report['machine'].get('gpu', plan.device)}")
    root = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    benches: dict[str, cases.Bench] = {}
    try:
        main_dtype, goal = plan.dtypes[0], plan.goal_batch
        build = lambda: benches.setdefault(main_dtype, cases.build_bench(plan, main_dtype))  # noqa: E731
        built = lambda: {"build_s": build().build_s}  # noqa: E731
        if run.do("batches", f"build {main_dtype}", 0.0, built, required=True):
            run.do(
                "batches", f"{main_dtype} none b={goal}", 0.0,
                lambda: cases.measure_batch(benches[main_dtype], plan, "none", goal),
                required=True,  # the unit of every estimate
            )  # fmt: skip
            for section, label, estimate, fn in Planner(run, benches, root).items():
                run.do(section, label, estimate(), fn)
        else:
            for section in SECTIONS:
                if section != "batches":
                    run.skip_section(section, f"the {main_dtype} models could not be built")
        vae_share(run)
        run.write()
    finally:
        run.close()
        shutil.rmtree(root, ignore_errors=True)
    run.log(f"wrote {args.out / 'gpu.json'} and gpu.md; status {run.report['status']}")
    return 1 if "error" in run.report["status"].values() else 0


def vae_share(run: Run) -> None:
    """The VAE decode's share of each main-dtype batch row (from the rows, no extra run)."""
    rows = [r for r in run.report["sections"]["batches"]["rows"] if "decode_share" in r]
    entry = run.report["sections"]["vae_share"]
    for r in rows:
        keys = ("mode", "batch", "dtype", "decode_s", "denoise_s", "decode_share")
        entry["rows"].append({"item": r["item"], **{k: r[k] for k in keys}})
    if not rows:
        entry["skipped"].append({"item": "all", "reason": "no batch row was measured"})


if __name__ == "__main__":
    sys.exit(main())
