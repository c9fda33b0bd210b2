"""Cross-character batching: denoise frames of several characters in one UNet batch.

A character's chain is strictly sequential, so throughput comes from denoising frame t of A with
frame t' of B in the same forward pass. Each frame keeps its own prompt, pose, guidance scale,
timestep schedule (the ``latent`` mechanism starts later), reference frames (``kv``), background
plate and appearance LoRA (per row: one batched low-rank update per projection, engine/accel).
Each frame also keeps its own solver (``sampler.scheduler``: DDIM, or DPM-Solver++ 2M whose
multistep history is per frame).

Determinism (what is bitwise and what is within a tolerance):

- Bitwise: the same frame computed twice in forward passes of the *same shape* on the same machine
  (same build of torch and its CPU/GPU kernels). On this machine a row's result also does not
  depend on the other rows' content or its position in a batch of that shape (checked in
  tests/test_batching.py). A frame with no reference (frame 0, ``none``, ``latent``) runs the
  same shapes under every inter-frame mode.
- Within a tolerance: the same frame in batches of different shapes (alone vs with other
  characters, or in another padding bucket). BLAS and convolution kernels pick different blockings
  per shape and per CPU, so the last bits differ. Measured on the tiny preset (20 steps, 4-frame
  chains, benchmarks/padding.py): latents within 4e-5, frames within 1 grey level; a chained
  frame starts from its predecessors, so a long chain can drift further.

Padding (:func:`padded_rows`) turns the first into a guarantee for re-scheduled work: ``max`` pads
every forward pass to the batch capacity, so a frame is bit-identical whatever shares its batch
(a resumed or re-scheduled render reproduces the uninterrupted one exactly) at the cost of the
padding rows; ``bucket`` pads to the next of 1, 2, 4, 8, … rows (at most 2x, nothing for a full
or power-of-two batch), so a frame is bit-identical whenever its batches fall in the same buckets;
``none`` never pads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
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
"""Reference columns per row under ``kv`` (anchor frame 0 and frame t-1; fewer are padded with
the row itself, which the attention masks out: each distinct frame is attended to once)."""

PadPolicy = Literal["none", "bucket", "max"]
"""How a forward pass is padded: ``none``, ``bucket`` (next power of two) or ``max`` (capacity)."""


def rows_per_frame(inter_frame: str) -> int:
    """Most batch rows one frame takes: 2 (unconditional + prompt) plus, under ``kv``, one per
    reference slot."""
    return 2 + (REF_SLOTS if "kv" in inter_frame else 0)


def padded_rows(real: int, policy: PadPolicy, max_rows: int) -> int:
    """Rows of the forward pass that carries ``real`` rows.

    Args:
        real: rows of the frames in the batch (>= 1).
        policy: ``none`` → ``real``; ``bucket`` → the smallest of 1, 2, 4, 8, … and ``max_rows``
            that holds ``real``; ``max`` → ``max_rows``.
        max_rows: the batch capacity in rows (``cluster.max_batch`` x :func:`rows_per_frame`).

    Raises:
        ValueError: ``real`` is not in [1, max_rows], or an unknown policy.
    """
    if not 1 <= real <= max_rows:
        raise ValueError(
            f"a batch of {real} rows does not fit the capacity of {max_rows} rows; schedule at "
            "most cluster.max_batch frames per batch"
        )
    if policy == "none":
        return real
    if policy == "max":
        return max_rows
    if policy == "bucket":
        return min(1 << (real - 1).bit_length(), max_rows)
    raise ValueError(f"unknown batch padding policy {policy!r}; use none, bucket or max")


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
    solver: Any
    """The scheduler stepping this frame (``FrameChain.solver``: DDIM shared, DPM++ its own)."""
    step: int = 0
    blend_steps: int = 0
    rows: list[int] = field(default_factory=list)
    span: tuple[int, int] = (0, 0)
    """Its rows in the current forward pass (own, then references)."""
    deep: torch.Tensor | None = None
    """DeepCache: its rows' deep features from the last key step."""
    pose_features: torch.Tensor | None = None
    """The ControlNet's embedding of its rows' poses (its own, once per own row, then its
    references'), computed at its first step and reused by the others
    (:func:`~engine.accel.graph.pose_features`)."""

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)


class BatchDenoiser:
    """Denoises many :class:`FrameJob` together with one resident :class:`FrameChain`."""

    def __init__(
        self, chain: FrameChain, pad_rows: int | None = None, padding: PadPolicy = "bucket"
    ):
        """``pad_rows``: the batch capacity in rows (None = never pad); ``padding``: how each
        forward pass is padded under it (:func:`padded_rows`)."""
        self.chain = chain
        self.pad_rows = pad_rows
        self.padding = padding
        self.sched = chain.scheduler

    @staticmethod
    def signature(job: FrameJob) -> tuple[int, int, int, bool, bool, int]:
        """Jobs with equal signatures may share a batch: (height, width, steps, kv, kv self,
        DeepCache interval)."""
        _, _, height, width = job.pose.shape
        s = job.settings
        deep = s.deep_cache if s.deep_cache > 1 else 0
        return height, width, s.steps, "kv" in s.inter_frame, s.kv_include_self, deep

    @torch.no_grad()
    def denoise(self, jobs: Sequence[FrameJob]) -> list[torch.Tensor]:
        """Denoise ``jobs`` (equal :meth:`signature`) → their (1, 4, h, w) clean latents."""
        if len({self.signature(j) for j in jobs}) > 1:
            raise ValueError(
                "jobs of one batch must share size and inter-frame mode; group them by signature()"
            )
        runs = [self._start(job) for job in jobs]
        interval, loop = self.signature(jobs[0])[-1], 0
        while not all(r.done for r in runs):
            active = [r for r in runs if not r.done]
            # DeepCache: a whole step first and every ``interval``-th after (the batch's rows
            # only shrink as frames finish, so every active run has features kept then).
            eps = self._forward(active, deep=(loop % interval == 0) if interval else None)
            for run in active:
                self._advance(run, eps)
            loop += 1
        return [r.latents for r in runs]

    # -- setup -----------------------------------------------------------------------------

    def _start(self, job: FrameJob) -> _Run:
        s = job.settings
        _, _, height, width = job.pose.shape
        noise = self.chain.initial_noise(job.seed, job.index, height, width)
        solver = self.chain.solver(s.scheduler, s.steps)
        if solver is self.sched:  # the shared DDIM: its step reads the step count
            solver.set_timesteps(s.steps, device=self.chain.device)
        timesteps = solver.timesteps.clone()
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
            solver=solver,
            blend_steps=round(s.blend_until * len(timesteps)),
        )

    # -- one step ----------------------------------------------------------------------------

    def _forward(self, active: list[_Run], deep: bool | None = None) -> torch.Tensor:
        """One ControlNet + UNet pass over every active job's rows → (B, 4, h, w) noise preds.

        ``deep`` (DeepCache): True = a whole step that keeps each run's deep features, False = the
        shallow branch on the kept ones, None = a whole step, nothing kept."""
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
            run.span = (first, first + count)
            padded = (ref_rows * REF_SLOTS)[:REF_SLOTS] if ref_rows else None
            ref_cols += [padded or [row] * REF_SLOTS for row in own] + [
                [row] * REF_SLOTS for row in ref_rows
            ]
        real = len(latents)
        pad = 0
        if self.pad_rows is not None:
            pad = padded_rows(real, self.padding, self.pad_rows) - real
        x = _pad(torch.cat(latents), pad)
        timestep = _pad(torch.stack(steps), pad)
        cond = _pad(torch.cat(text), pad)
        image = _pad(torch.cat(pose), pad)
        ref_cols += [[real + i] * REF_SLOTS for i in range(pad)]
        names += [None] * pad
        weights = _pad(torch.tensor(scale, dtype=x.dtype, device=x.device), pad).view(-1, 1, 1, 1)
        # No row with a reference (frame 0 alone): plain self-attention, the shapes of ``none``.
        has_refs = uses_kv and any(r.refs for r in active)
        from engine.accel import DeepFeatures, StepInputs, step_for  # model.backend's step
        from engine.accel.graph import pose_features

        step = step_for(self.chain, self.pad_rows)
        embedded = None
        if getattr(step, "takes_pose_features", False):  # each frame's, once for all its steps
            for run in active:
                if run.pose_features is None:
                    mine = [run.job.pose] * run.n_cur  # as a lone frame's forward embeds them
                    poses = torch.cat([*mine, *(r.pose for r in run.refs)])
                    run.pose_features = pose_features(self.chain.parts.controlnet, poses)
            embedded = _pad(torch.cat([r.pose_features for r in active]), pad)  # type: ignore[misc]

        features = None
        if deep is not None:
            kept = None if deep else _pad(torch.cat([r.deep for r in active]), pad)  # type: ignore[misc]
            features = DeepFeatures(reuse=kept)
        eps = step(
            StepInputs(
                sample=self.sched.scale_model_input(x, timestep),
                timestep=timestep,
                text=cond,
                pose=image,
                control_scale=weights,
                ref_index=torch.tensor(ref_cols, device=x.device) if has_refs else None,
                include_self=active[0].job.settings.kv_include_self,
                adapters=names,
                pose_features=embedded,
                deep=features,
            )
        )
        if features is not None and features.kept is not None:
            for run in active:
                run.deep = features.kept[run.span[0] : run.span[1]]
        return eps

    def _advance(self, run: _Run, eps: torch.Tensor) -> None:
        """Guidance, one solver step and background blending for one job."""
        e = eps[run.rows[0] : run.rows[-1] + 1]
        if run.n_cur == 2:
            e = e[:1] + run.job.settings.guidance * (e[1:] - e[:1])
        t = run.timesteps[run.step]
        if run.solver is self.sched:
            step = self.sched.step(
                e, t, run.latents, eta=run.job.settings.eta, generator=run.generator
            )
        else:  # DPM-Solver++ (deterministic): its own history of model outputs
            step = run.solver.step(e, t, run.latents)
        run.latents = step.prev_sample
        if run.job.background is not None and run.step < run.blend_steps:
            nxt = run.timesteps[run.step + 1 :][:1]
            run.latents = blend_background(
                run.latents, run.job.background, run.noise, self.sched, nxt
            )
        run.step += 1


def denoise_frame(
    chain: FrameChain,
    *,
    index: int,
    seed: int,
    pose: torch.Tensor,
    text: torch.Tensor,
    settings: FrameSettings,
    previous: Reference | None = None,
    anchor: Reference | None = None,
    background: Background | None = None,
    adapter: str | None = None,
) -> torch.Tensor:
    """Denoise frame ``index`` alone → its (1, 4, h, w) clean latent (a batch of one job).

    Args:
        pose: (1, 3, H, W) pose map in [0, 1]. text: (2, 77, D) from ``chain.encode_prompt``.
        previous, anchor: finished frames t-1 and 0 (None for frame 0).
        background: plate latent + latent person mask, or None for a free background.
        adapter: appearance LoRA loaded on the UNet to apply, or None.
    """
    job = FrameJob(index, seed, pose, text, settings, previous, anchor, background, adapter)
    return BatchDenoiser(chain).denoise([job])[0]


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Append ``rows`` zero rows along dim 0 (padding rows never touch real rows' results)."""
    if rows == 0:
        return x
    return torch.cat([x, x.new_zeros((rows, *x.shape[1:]))])


def decode_frames(
    chain: FrameChain, latents: Sequence[torch.Tensor], padding: PadPolicy, max_frames: int
) -> list[np.ndarray | None]:
    """The frames of one batch's latents in one VAE call → (H, W, 3) uint8 each, None for a
    non-finite latent (not decoded). The VAE batch is padded like the denoising batch
    (:func:`padded_rows` over frames, capacity ``max_frames``), so under ``max`` or within a
    bucket a frame's pixels are bitwise whatever else was decoded with it."""
    finite = [i for i, x in enumerate(latents) if bool(torch.isfinite(x).all())]
    out: list[np.ndarray | None] = [None] * len(latents)
    if finite:
        capacity = max(max_frames, len(finite))
        rows = padded_rows(len(finite), padding, capacity)
        frames = chain.decode_batch([latents[i] for i in finite], rows=rows)
        for i, frame in zip(finite, frames, strict=True):
            out[i] = frame
    return out
