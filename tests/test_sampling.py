"""``sampler.scheduler: dpmpp_2m``: DPM-Solver++ 2M in the batched denoise loop, one solver per
frame (a multistep solver carries the previous model outputs), equal to a plain diffusers loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from test_batching import make_jobs, settings

from engine.accel.graph import controlnet_unet
from engine.batching import BatchDenoiser, FrameJob, decode_frames, denoise_frame
from engine.config import ConfigError, load_config

TOL = 1e-5
"""Max abs latent error vs the reference loop (same ops in fp32; batches of other shapes)."""


def dpm_jobs(chain, steps: int = 4) -> list[FrameJob]:
    jobs = make_jobs(chain, steps=steps)
    for job in jobs:
        job.settings = settings(steps=steps, guidance=job.settings.guidance, scheduler="dpmpp_2m")
    return jobs


@torch.no_grad()
def reference_loop(chain, job: FrameJob) -> torch.Tensor:
    """One frame (no kv references) with a fresh diffusers DPMSolverMultistepScheduler."""
    s = job.settings
    sched = DPMSolverMultistepScheduler.from_config(
        chain.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    sched.set_timesteps(s.steps)
    timesteps = sched.timesteps
    noise = chain.initial_noise(job.seed, job.index, 64, 64)
    latents = noise
    if job.previous is not None:  # latent: start later in the schedule from frame t-1
        start = s.steps - round(s.steps * s.latent_strength)
        timesteps = timesteps[start:]
        a = chain.scheduler.alphas_cumprod[timesteps[0]]
        latents = a.sqrt() * job.previous.latent + (1 - a).sqrt() * noise
    parts = chain.parts
    for t in timesteps:
        x = torch.cat([latents, latents])
        eps = controlnet_unet(
            parts.unet,
            parts.controlnet,
            x,
            t.expand(2),
            job.text,
            job.pose.expand(2, -1, -1, -1),
            torch.full((2, 1, 1, 1), s.controlnet_scale),
        )
        e = eps[:1] + s.guidance * (eps[1:] - eps[:1])
        latents = sched.step(e, t, latents).prev_sample
    return latents


@pytest.mark.parametrize("mechanism", ["none", "latent"])
def test_dpmpp_frame_equals_a_plain_diffusers_loop(tiny_chain, mechanism):
    job = dpm_jobs(tiny_chain)[1]
    job.settings = settings(mechanism, steps=4, scheduler="dpmpp_2m")
    job.anchor = None
    if mechanism == "none":
        job.previous = None
    got = BatchDenoiser(tiny_chain).denoise([job])[0]
    err = (got - reference_loop(tiny_chain, job)).abs().max().item()
    assert err < TOL, f"{mechanism}: max abs latent error {err:.2e} vs diffusers' loop"


def test_dpmpp_frames_keep_their_own_solver_state_in_a_batch(tiny_chain):
    """Frames at different points of their schedules (frame 0 from pure noise, frames 1 and 3
    later under ``latent``) in one padded batch equal each frame alone, bit for bit: a solver
    shared across frames would mix their model-output histories."""
    jobs = dpm_jobs(tiny_chain)
    denoiser = BatchDenoiser(tiny_chain, pad_rows=12, padding="max")
    mixed = denoiser.denoise(jobs)
    for job, got in zip(jobs, mixed, strict=True):
        assert torch.equal(got, denoiser.denoise([job])[0])
    ddim = BatchDenoiser(tiny_chain, pad_rows=12, padding="max").denoise(make_jobs(tiny_chain))
    assert (mixed[0] - ddim[0]).abs().max() > 1e-2  # the solver really changed


def test_ddim_and_dpmpp_frames_share_a_batch(tiny_chain):
    jobs = dpm_jobs(tiny_chain)
    jobs[0] = make_jobs(tiny_chain)[0]  # DDIM, same step count
    denoiser = BatchDenoiser(tiny_chain, pad_rows=12, padding="max")
    mixed = denoiser.denoise(jobs)
    for job, got in zip(jobs, mixed, strict=True):
        assert torch.equal(got, denoiser.denoise([job])[0])


def test_eta_is_refused_with_dpmpp():
    with pytest.raises(ConfigError, match=r"sampler\.eta.*ddim only"):
        load_config(
            None, preset="tiny", overrides=["sampler.scheduler=dpmpp_2m", "sampler.eta=0.5"]
        )


# -- VAE decode batched across the rows of a batch ---------------------------------------------


def test_batched_decode_matches_per_frame_and_pads_bitwise(tiny_chain):
    g = torch.Generator().manual_seed(5)
    latents = [torch.randn(1, 4, 8, 8, generator=g) * 3 for _ in range(3)]
    alone = [tiny_chain.decode(x) for x in latents]
    frames = decode_frames(tiny_chain, latents, "none", max_frames=4)
    for got, want in zip(frames, alone, strict=True):
        assert got is not None and got.shape == want.shape == (64, 64, 3)
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # 1 grey level, on few pixels
    # padded to the capacity: a frame is bitwise whatever it was decoded with
    full = decode_frames(tiny_chain, latents, "max", max_frames=4)
    pair = decode_frames(tiny_chain, [latents[2], latents[0]], "max", max_frames=4)
    assert np.array_equal(pair[0], full[2]) and np.array_equal(pair[1], full[0])


def test_batched_decode_skips_non_finite_latents(tiny_chain):
    good = torch.zeros(1, 4, 8, 8)
    frames = decode_frames(tiny_chain, [torch.full((1, 4, 8, 8), float("nan")), good], "none", 4)
    assert frames[0] is None
    assert np.array_equal(frames[1], tiny_chain.decode(good))


# -- reference images in one batch ------------------------------------------------------------


def test_references_in_one_batch_match_one_at_a_time(tiny_chain):
    """The K references denoised together equal each rendered alone within the batching
    tolerance (latents ≈1e-5 apart: pixels within 2 grey levels, mean < 0.05)."""
    from engine.appearance.references import (
        reference_pose_maps,
        reference_prompts,
        reference_settings,
        synthesize_references,
    )
    from engine.config import AppearanceConfig, SamplerConfig
    from engine.refine import RefineConfig, refine

    refined = refine("a dancer in a red dress", config=RefineConfig(), cache_dir=None)
    config, sampler = AppearanceConfig(references=3, resolution=64), SamplerConfig(steps=3)
    batched = synthesize_references(tiny_chain, refined, config, negative="", sampler=sampler)
    maps, prompts = reference_pose_maps(config), reference_prompts(refined, config)
    for i, (image, pose, prompt) in enumerate(zip(batched, maps, prompts, strict=True)):
        latent = denoise_frame(
            tiny_chain,
            index=i,
            seed=config.seed,
            pose=tiny_chain.image_tensor(pose),
            text=tiny_chain.encode_prompt(prompt, ""),
            settings=reference_settings(sampler),
        )
        diff = np.abs(image.astype(int) - tiny_chain.decode(latent).astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05, f"reference {i}: {diff.max()}, {diff.mean()}"
