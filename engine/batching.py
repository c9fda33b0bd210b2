"""Cross-character batching: denoise frames of several characters in one UNet batch.

A character's chain is strictly sequential, so throughput comes from denoising frame t of A with
frame t' of B in the same forward pass. Each frame keeps its own prompt, pose, guidance scale,
timestep schedule (the ``latent`` mechanism starts later), reference frames (``kv``), background
plate and appearance LoRA (per-row peft ``adapter_names``).

Determinism: on a CPU a batch row's result depends on the batch *size* only, not on the other
rows' content or on its position (checked bitwise in tests/test_batching.py). With ``pad_rows``
every forward pass has the same size, so a frame is bit-identical whichever frames share its
batch — a resumed or re-scheduled render reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from engine.chain import (
    Background,
    FrameChain,
    FrameSettings,
    Reference,
    blend_background,
    frame_seed,
)

REF_SLOTS = 2
"""Reference columns per row under ``kv`` (anchor frame 0 and frame t-1; fewer are padded)."""


@dataclass
class FrameJob:
    """One frame of one character, ready to denoise."""

    index: int
    seed: int
    pose: torch.Tensor
    """(1, 3, H, W) pose map in [0, 1]."""
    text: torch.Tensor
    """(2, 77, D) [negative, prompt] embeddings."""
    settings: FrameSettings
    previous: Reference | None = None
    anchor: Reference | None = None
    background: Background | None = None
    adapter: str | None = None
    """Appearance LoRA name loaded on the UNet, or None for the base model."""


@dataclass
class _Run:
    """Per-job denoising state inside a batch."""

    job: FrameJob
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    refs: list[Reference]
    ref_noise: list[torch.Tensor]
    generator: torch.Generator
    n_cur: int
    step: int = 0
    blend_steps: int = 0
    rows: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)


class BatchDenoiser:
    """Denoises many :class:`FrameJob` together with one resident :class:`FrameChain`."""

    def __init__(self, chain: FrameChain, pad_rows: int | None = None):
        self.chain = chain
        self.pad_rows = pad_rows
        self.sched = chain.scheduler

    @staticmethod
    def signature(job: FrameJob) -> tuple[int, int, int, bool, bool]:
        """Jobs with equal signatures may share a batch: (height, width, steps, kv, kv self)."""
        _, _, height, width = job.pose.shape
        s = job.settings
        return height, width, s.steps, "kv" in s.inter_frame, s.kv_include_self

    @torch.no_grad()
    def denoise(self, jobs: Sequence[FrameJob]) -> list[torch.Tensor]:
        """Denoise ``jobs`` (equal :meth:`signature`) → their (1, 4, h, w) clean latents."""
        if len({self.signature(j) for j in jobs}) > 1:
            raise ValueError(
                "jobs of one batch must share size and inter-frame mode; group them by signature()"
            )
        schedule = self._schedule(jobs[0].settings.steps)  # equal steps: part of the signature
        runs = [self._start(job, schedule) for job in jobs]
        while not all(r.done for r in runs):
            active = [r for r in runs if not r.done]
            eps = self._forward(active)
            for run in active:
                self._advance(run, eps)
        return [r.latents for r in runs]

    # -- setup -----------------------------------------------------------------------------

    def _schedule(self, steps: int) -> torch.Tensor:
        self.sched.set_timesteps(steps, device=self.chain.device)
        return self.sched.timesteps.clone()

    def _start(self, job: FrameJob, schedule: torch.Tensor) -> _Run:
        s = job.settings
        _, _, height, width = job.pose.shape
        noise = self.chain.initial_noise(job.seed, job.index, height, width)
        timesteps = schedule
        latents = noise * self.sched.init_noise_sigma
        if "latent" in s.inter_frame and job.previous is not None:
            start = min(s.steps - round(s.steps * s.latent_strength), s.steps - 1)
            timesteps = timesteps[start:]
            latents = self.sched.add_noise(job.previous.latent, noise, timesteps[:1])
        refs = self.chain.references(s, job.previous, job.anchor)
        return _Run(
            job=job,
            latents=latents,
            noise=noise,
            timesteps=timesteps,
            refs=refs,
            ref_noise=[self.chain.initial_noise(job.seed, r.index, height, width) for r in refs],
            generator=torch.Generator().manual_seed(frame_seed(job.seed, job.index) ^ 0x5EED),
            n_cur=2 if s.guidance > 1.0 else 1,
            blend_steps=round(s.blend_until * len(timesteps)),
        )

    # -- one step ----------------------------------------------------------------------------

    def _forward(self, active: list[_Run]) -> torch.Tensor:
        """One ControlNet + UNet pass over every active job's rows → (B, 4, h, w) noise preds."""
        latents: list[torch.Tensor] = []
        steps: list[torch.Tensor] = []
        text: list[torch.Tensor] = []
        pose: list[torch.Tensor] = []
        scale: list[float] = []
        ref_cols: list[list[int]] = []
        names: list[str | None] = []
        uses_kv = "kv" in active[0].job.settings.inter_frame
        for run in active:
            t = run.timesteps[run.step]
            first = len(latents)
            own = list(range(first, first + run.n_cur))
            ref_rows = list(range(first + run.n_cur, first + run.n_cur + len(run.refs)))
            run.rows = own
            latents += [run.latents] * run.n_cur
            latents += [
                self.sched.add_noise(r.latent, n, t[None])
                for r, n in zip(run.refs, run.ref_noise, strict=True)
            ]
            text += [run.job.text[2 - run.n_cur :]] + [run.job.text[1:2]] * len(run.refs)
            pose += [run.job.pose] * run.n_cur + [r.pose for r in run.refs]
            count = run.n_cur + len(run.refs)
            steps += [t] * count
            scale += [run.job.settings.controlnet_scale] * count
            names += [run.job.adapter] * count
            padded = (ref_rows * REF_SLOTS)[:REF_SLOTS] if ref_rows else None
            ref_cols += [padded or [row] * REF_SLOTS for row in own] + [
                [row] * REF_SLOTS for row in ref_rows
            ]
        real = len(latents)
        pad = max(0, (self.pad_rows or 0) - real)
        x = _pad(torch.cat(latents), pad)
        timestep = _pad(torch.stack(steps), pad)
        cond = _pad(torch.cat(text), pad)
        image = _pad(torch.cat(pose), pad)
        ref_cols += [[real + i] * REF_SLOTS for i in range(pad)]
        names += [None] * pad
        weights = _pad(torch.tensor(scale, dtype=x.dtype, device=x.device), pad).view(-1, 1, 1, 1)
        ctx = self.chain.context
        ctx.ref_index = torch.tensor(ref_cols, device=x.device) if uses_kv else None
        ctx.include_self = active[0].job.settings.kv_include_self
        parts = self.chain.parts
        try:
            with _adapters(parts.unet, names):
                x_in = self.sched.scale_model_input(x, timestep)
                down, mid = parts.controlnet(
                    x_in,
                    timestep,
                    encoder_hidden_states=cond,
                    controlnet_cond=image,
                    conditioning_scale=1.0,
                    return_dict=False,
                )
                down = [d * weights for d in down]
                eps = parts.unet(
                    x_in,
                    timestep,
                    encoder_hidden_states=cond,
                    down_block_additional_residuals=down,
                    mid_block_additional_residual=mid * weights,
                    return_dict=False,
                )[0]
        finally:
            ctx.ref_index = None
        return eps

    def _advance(self, run: _Run, eps: torch.Tensor) -> None:
        """Guidance, one DDIM step and background blending for one job."""
        e = eps[run.rows[0] : run.rows[-1] + 1]
        if run.n_cur == 2:
            e = e[:1] + run.job.settings.guidance * (e[1:] - e[:1])
        t = run.timesteps[run.step]
        run.latents = self.sched.step(
            e, t, run.latents, eta=run.job.settings.eta, generator=run.generator
        ).prev_sample
        if run.job.background is not None and run.step < run.blend_steps:
            nxt = run.timesteps[run.step + 1 :][:1]
            run.latents = blend_background(
                run.latents, run.job.background, run.noise, self.sched, nxt
            )
        run.step += 1


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Append ``rows`` zero rows along dim 0 (padding rows never touch real rows' results)."""
    if rows == 0:
        return x
    return torch.cat([x, x.new_zeros((rows, *x.shape[1:]))])


@contextlib.contextmanager
def _adapters(unet: torch.nn.Module, names: list[str | None]) -> Iterator[None]:
    """Row i runs with appearance LoRA ``names[i]``; None rows (and all rows when no name is
    given) run the base model, whatever adapter is active on the UNet."""
    from engine.appearance.lora import per_row_adapters

    with per_row_adapters(unet, names):
        yield
