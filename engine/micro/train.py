"""Train the ``micro`` preset from nothing: ``python -m engine.micro.train --out DIR``.

Stages, each stopped by its step count or its share of ``--budget-s``, whichever comes first:

1. ``pool``: draw the world's samples (:mod:`engine.micro.data`), in parallel processes.
2. ``vae``: the 2× AutoencoderKL on figures and empty scenes, trained on the posterior mode
   (deterministic latents; the encoder's variance is then fixed to e^-30, so ``sample()`` = ``mode()``
   for every caller, diffusers' inpainting pipeline included).
3. ``unet``: UNet + ControlNet + text encoder together, v-prediction with min-SNR-5 weighting,
   10 % of captions replaced by an empty or typical negative prompt (classifier-free guidance),
   EMA of the weights.
4. ``inpaint``: the 9-channel inpainting UNet (started from the UNet): 70 % of rows remove the
   figure (mask = dilated figure, target = the empty scene), 30 % fill random rectangles.
5. ``segmenter``: the small figure segmenter of the micro metrics.
6. ``eval``: held-out samples through diffusers' ControlNet pipeline → sample grid + metrics.

Every stage checkpoints (``--ckpt-every-s`` and at its end) and ``--resume`` continues from the
last checkpoint. Writes ``micro_a/b.safetensors`` (float16), ``train_log.json`` (settings, steps,
wall times, the loss curve, the held-out metrics) and ``grid.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from engine.micro import arch
from engine.micro.data import build_pool, negative_bank
from engine.micro.loop import Checkpoints, Clock, TrainConfig, _device, log
from engine.micro.stages import (
    encode_pool,
    psnr,
    train_inpaint,
    train_segmenter,
    train_unet,
    train_vae,
)

EVAL_RESERVE_S = 25.0
"""Seconds of the budget kept for evaluation and writing the weights."""


def run(
    cfg: TrainConfig, out: Path, resume: bool = False, init: Path | None = None
) -> dict[str, Any]:
    """Train every stage within ``cfg.budget_s``; write weights, ``train_log.json``, ``grid.png``.

    ``init``: a folder of micro weights to start every module from (the VAE keeps its latent
    scale, so a UNet trained on it stays valid); ``--steps vae=0`` then keeps the VAE as it is.
    """
    from engine.micro.evaluate import evaluate

    clock = Clock(cfg.budget_s)
    dev = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    out.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(out, resume)
    record: dict[str, Any] = {"config": asdict(cfg), "machine": _machine(dev), "stages": {}}
    pool = build_pool(cfg.seed, cfg.pool, arch.SIZE, cfg.workers).to(dev)
    negatives = negative_bank(cfg.seed).to(dev)
    states, meta = arch.load_weights(init) if init is not None else ({}, {})
    old_vocab = meta.get("tokenizer", "offline")
    if init is not None and old_vocab != arch.TOKENIZER:  # new whole-word tokens
        states["text_encoder"] = arch.extend_text_encoder(
            states["text_encoder"], arch.build_tokenizer(old_vocab),
            arch.build_tokenizer(arch.TOKENIZER),
        )  # fmt: skip
    record["init"] = {"folder": str(init), **meta} if init is not None else None
    record["stages"]["pool"] = {"samples": cfg.pool, "seconds": round(clock.elapsed(), 1)}
    log(f"pool of {cfg.pool} samples", clock)
    shares = dict(cfg.share)

    def deadline(stage: str) -> float:
        d = clock.deadline(shares[stage], sum(shares.values()), EVAL_RESERVE_S)
        shares.pop(stage)
        return d

    vae, record["stages"]["vae"] = _stage(ckpts, "vae", lambda: train_vae(
        pool, cfg, dev, deadline("vae"), ckpts, clock, states), dev, shares)  # fmt: skip
    held = torch.stack([torch.from_numpy(s).permute(2, 0, 1) for s in _held_images(cfg)])
    record["stages"]["vae"]["psnr_db"] = round(psnr(vae, held, dev), 2)
    latents = encode_pool(vae, pool.images, dev)
    scale = float(meta["scaling_factor"]) if init is not None else float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    log(f"vae: PSNR {record['stages']['vae']['psnr_db']} dB, scaling factor {scale:.4f}", clock)
    nets, record["stages"]["unet"] = _stage(ckpts, "unet", lambda: train_unet(
        pool, latents, cfg, dev, deadline("unet"), ckpts, clock, negatives, states), dev, shares)  # fmt: skip
    inpaint, record["stages"]["inpaint"] = _stage(ckpts, "inpaint", lambda: train_inpaint(
        pool, vae, nets["text_encoder"], nets["unet"], scale, cfg, dev, deadline("inpaint"),
        ckpts, clock, negatives, states), dev, shares)  # fmt: skip
    seg, record["stages"]["segmenter"] = _stage(ckpts, "segmenter", lambda: train_segmenter(
        pool, cfg, dev, deadline("segmenter"), ckpts, clock, states), dev, shares)  # fmt: skip

    modules = {"vae": vae, **nets, "inpaint_unet": inpaint, "segmenter": seg}
    meta = {"scaling_factor": scale, "seed": cfg.seed, "size": arch.SIZE,
            "tokenizer": arch.TOKENIZER}  # fmt: skip
    arch.save_weights(modules, out, meta)
    record["eval"] = evaluate(modules, dev, cfg.seed, cfg.eval_samples, cfg.eval_steps,
                              cfg.eval_guidance, out)  # fmt: skip
    record["wall_s"] = round(clock.elapsed(), 1)
    log(
        f"eval: {json.dumps({k: v for k, v in record['eval'].items() if 'iou' in k or 'colour' in k})}",
        clock,
    )
    (out / "train_log.json").write_text(json.dumps(record, indent=1))
    return record


def _held_images(cfg: TrainConfig) -> list[Any]:
    from engine.micro.evaluate import HELD_OUT
    from engine.micro.world import make_sample

    return [make_sample(cfg.seed, HELD_OUT + 1000 + i).image for i in range(64)]


def _stage(ckpts: Checkpoints, name: str, train: Any, dev: torch.device,
           shares: dict[str, float]) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """A finished stage's checkpoint (``--resume``), or ``train()`` then its checkpoint."""
    done = ckpts.done(name)
    if done is not None:
        shares.pop(name, None)
        return _restore(name, done, dev), done["log"]
    result, log_ = train()
    ckpts.save(name, {"result": _states(result), "log": log_}, finished=True)
    return result, log_


def _states(result: Any) -> Any:
    if isinstance(result, dict):
        return {k: m.state_dict() for k, m in result.items()}
    return result.state_dict()


def _restore(name: str, done: dict[str, Any], dev: torch.device) -> Any:
    from engine.micro.data import _tokenizer

    build = {
        "vae": arch.build_vae, "inpaint_unet": lambda: arch.build_unet(9),
        "segmenter": arch.build_segmenter, "unet": arch.build_unet,
        "controlnet": arch.build_controlnet,
        "text_encoder": lambda: arch.build_text_encoder(_tokenizer()),
    }  # fmt: skip

    def make(key: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        module = build[key]()
        module.load_state_dict(state)
        return module.to(dev).eval().requires_grad_(False)

    saved = done["result"]
    if name == "unet":
        return {k: make(k, v) for k, v in saved.items()}
    return make({"inpaint": "inpaint_unet"}.get(name, name), saved)


def _machine(dev: torch.device) -> dict[str, Any]:
    info = {"device": str(dev), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "host_cpus": os.cpu_count()}  # fmt: skip
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m engine.micro.train", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--out", type=Path, required=True, help="folder for weights, log, grid, checkpoints"
    )
    p.add_argument("--budget-s", type=float, default=TrainConfig.budget_s)
    p.add_argument("--pool", type=int, default=TrainConfig.pool, help="world samples drawn")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="drawing processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", default="", help="step caps, e.g. vae=2000,unet=20000")
    p.add_argument("--batch", default="", help="batch sizes, e.g. unet=256")
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt")
    p.add_argument("--init", type=Path, help="start from the micro weights in this folder")
    p.add_argument("--share", default="", help="budget shares, e.g. vae=0,unet=0.8")
    p.add_argument("--lr", default="", help="learning rates, e.g. unet=3e-4")
    p.add_argument("--offset-noise", type=float, default=TrainConfig.offset_noise,
                   help="offset noise of the UNet stage (e.g. 0.1; 0 = plain noise)")  # fmt: skip
    args = p.parse_args(argv)
    cfg = TrainConfig(seed=args.seed, pool=args.pool, workers=args.workers, device=args.device,
                      budget_s=args.budget_s, eval_samples=args.eval_samples,
                      offset_noise=args.offset_noise)  # fmt: skip
    for field_, text in (
        ("steps", args.steps),
        ("batch", args.batch),
        ("share", args.share),
        ("lr", args.lr),
    ):
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if key not in getattr(cfg, field_):
                raise SystemExit(f"--{field_}: unknown stage {key!r}; use {list(cfg.steps)}")
            getattr(cfg, field_)[key] = (float if field_ in ("share", "lr") else int)(value)
    run(cfg, args.out, resume=args.resume, init=args.init)


if __name__ == "__main__":
    main()
