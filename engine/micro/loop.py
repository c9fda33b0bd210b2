"""Training infrastructure of the micro preset: settings, budget clock, checkpoints, the loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class TrainConfig:
    """Every setting of a training run (recorded in ``train_log.json``)."""

    seed: int = 0
    pool: int = 100_000
    workers: int = 1
    device: str = "auto"
    budget_s: float = 7200.0
    share: dict[str, float] = field(
        default_factory=lambda: {"vae": 0.17, "unet": 0.62, "inpaint": 0.14, "segmenter": 0.03}
    )
    """Fraction of the budget left after the pool that each stage may use."""
    steps: dict[str, int] = field(
        default_factory=lambda: {
            "vae": 100_000,
            "unet": 1_000_000,
            "inpaint": 100_000,
            "segmenter": 20_000,
        }
    )
    """Step cap of each stage (the budget usually stops it first)."""
    batch: dict[str, int] = field(
        default_factory=lambda: {"vae": 128, "unet": 256, "inpaint": 256, "segmenter": 256}
    )
    lr: dict[str, float] = field(
        default_factory=lambda: {"vae": 5e-4, "unet": 1e-3, "inpaint": 5e-4, "segmenter": 2e-3}
    )
    log_every: int = 50
    """Steps per point of the loss curve (mean loss over those steps)."""
    warmup: int = 200
    """Steps of linear learning-rate warm-up in every stage."""
    min_snr: float = 5.0
    uncond: float = 0.1
    refined: float = 0.45
    """Share of rows whose text is the refiner's full prompt instead of the grammar caption."""
    ema: float = 0.999
    offset_noise: float = 0.0
    """Std of a per-(sample, channel) constant added to the UNet stage's training noise (offset
    noise): without it the starting noise's mean fixes the image's mean colour, hence the scene."""
    ckpt_every_s: float = 600.0
    eval_samples: int = 16
    eval_steps: int = 20
    eval_guidance: float = 4.0


class Clock:
    """Budget bookkeeping: the run's start and each stage's deadline."""

    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def deadline(self, share: float, shares_left: float, reserve_s: float) -> float:
        """Monotonic deadline giving this stage ``share / shares_left`` of what is left."""
        left = max(0.0, self.budget_s - self.elapsed() - reserve_s)
        return time.monotonic() + left * share / max(shares_left, 1e-9)


def log(msg: str, clock: Clock) -> None:
    print(f"[{clock.elapsed():7.1f}s] {msg}", flush=True)


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA; plain float32 on CPU (bf16 autocast is slower there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _optimizer(params: Any, lr: float, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=device.type == "cuda")


def _pixels(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, C, H, W) → float in [-1, 1] on ``device``."""
    return x.to(device, non_blocking=True).float() / 127.5 - 1.0


class Checkpoints:
    """``<out>/ckpt/<stage>.pt`` (finished) and ``<stage>.latest.pt`` (in progress)."""

    def __init__(self, out: Path, resume: bool):
        self.dir = out / "ckpt"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.resume = resume

    def done(self, stage: str) -> dict[str, Any] | None:
        path = self.dir / f"{stage}.pt"
        return (
            torch.load(path, map_location="cpu", weights_only=False)
            if (self.resume and path.is_file())
            else None
        )

    def latest(self, stage: str) -> dict[str, Any] | None:
        path = self.dir / f"{stage}.latest.pt"
        return (
            torch.load(path, map_location="cpu", weights_only=False)
            if (self.resume and path.is_file())
            else None
        )

    def save(self, stage: str, state: dict[str, Any], finished: bool) -> None:
        path = self.dir / (f"{stage}.pt" if finished else f"{stage}.latest.pt")
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)


def train_loop(
    name: str,
    step_fn: Any,
    modules: dict[str, torch.nn.Module],
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    deadline: float,
    ckpts: Checkpoints,
    clock: Clock,
    ema: dict[str, torch.nn.Module] | None = None,
) -> dict[str, Any]:
    """Run ``step_fn(step) -> loss`` until the stage's step cap or deadline; EMA, checkpoints and
    a loss curve (mean loss per 1 % of the elapsed stage) along the way. Returns the stage log."""
    state = ckpts.latest(name)
    step, curve, seconds = 0, [], 0.0
    if state is not None:
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        for key, module in (ema or {}).items():
            module.load_state_dict(state["ema"][key])
        opt.load_state_dict(state["opt"])
        step, curve, seconds = state["step"], state["curve"], state["seconds"]
        log(f"{name}: resumed at step {step}", clock)
    t0, last_ckpt, window = time.monotonic() - seconds, time.monotonic(), []
    base_lr = [g["lr"] for g in opt.param_groups]
    params = [p for m in modules.values() for p in m.parameters()]
    while step < cfg.steps[name] and time.monotonic() < deadline:
        for group, lr in zip(opt.param_groups, base_lr, strict=True):  # linear warm-up
            group["lr"] = lr * min(1.0, (step + 1) / cfg.warmup)
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                decay = min(cfg.ema, (1 + step) / (10 + step))  # EMA warm-up
                for key, avg in ema.items():
                    torch._foreach_lerp_(
                        list(avg.parameters()), list(modules[key].parameters()), 1.0 - decay
                    )
        step += 1
        window.append(loss.detach())
        if len(window) == cfg.log_every:
            curve.append([step, round(time.monotonic() - t0, 2), float(torch.stack(window).mean())])
            window = []
            if len(curve) % 20 == 0:
                log(f"{name}: step {step} loss {curve[-1][2]:.4f}", clock)
        if time.monotonic() - last_ckpt > cfg.ckpt_every_s:
            ckpts.save(name, _state(modules, ema, opt, step, curve, t0), finished=False)
            last_ckpt = time.monotonic()
    result = {"steps": step, "seconds": round(time.monotonic() - t0, 1), "curve": curve}
    log(f"{name}: {step} steps in {result['seconds']} s", clock)
    return result


def _state(
    modules: dict[str, torch.nn.Module],
    ema: dict[str, torch.nn.Module] | None,
    opt: torch.optim.Optimizer,
    step: int,
    curve: list,
    t0: float,
) -> dict[str, Any]:
    return {
        "modules": {k: m.state_dict() for k, m in modules.items()},
        "ema": {k: m.state_dict() for k, m in (ema or {}).items()},
        "opt": opt.state_dict(),
        "step": step,
        "curve": curve,
        "seconds": time.monotonic() - t0,
    }
