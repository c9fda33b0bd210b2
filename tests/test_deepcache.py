"""DeepCache (``sampler.deep_cache``): the shallow branch on the deep features of the same step
reproduces the whole step; in a batch, each frame's features follow its rows as frames finish;
whole-UNet passes happen exactly at the key steps; compiled back-ends refuse it."""

from __future__ import annotations

import pytest
import torch
from accel_helpers import random_step_inputs
from test_batching import make_jobs, make_lora_chain

from engine.accel import DeepFeatures, EagerStep, StepInputs
from engine.accel.deepcache import check_supported
from engine.batching import BatchDenoiser
from engine.config import ConfigError, load_config

TOL = 1e-5
"""Max abs error of the shallow branch on this step's own deep features vs the whole step (the
same modules on the same inputs; fp32, CPU)."""


def with_deep(inputs: StepInputs, deep: DeepFeatures) -> StepInputs:
    return StepInputs(**{**inputs.__dict__, "deep": deep})


@torch.no_grad()
@pytest.mark.parametrize("kv", [True, False])
def test_shallow_branch_on_its_own_features_is_the_whole_step(kv):
    chain = make_lora_chain()  # per-row LoRA runs in the shallow branch too
    step = EagerStep(chain.parts, chain.context)
    inputs = random_step_inputs(6, 5, kv=kv, adapters=["a", None, "b", "a", None, None])
    whole = step(inputs)
    key = DeepFeatures()
    assert torch.equal(step(with_deep(inputs, key)), whole), "a key step is the whole step"
    assert key.kept is not None and key.kept.shape[0] == 6
    shallow = step(with_deep(inputs, DeepFeatures(reuse=key.kept)))
    err = (shallow - whole).abs().max().item()
    assert err < TOL, f"shallow branch vs whole step: max abs error {err:.2e}"
    stale = step(with_deep(inputs, DeepFeatures(reuse=torch.zeros_like(key.kept))))
    assert (stale - whole).abs().max().item() > 1e3 * TOL  # the kept features do matter


def count_whole_steps(chain, fn) -> int:
    """UNet mid-block calls (the deep branch) while ``fn`` runs."""
    calls: list[int] = []
    hook = chain.parts.unet.mid_block.register_forward_hook(lambda *_: calls.append(1))
    try:
        fn()
    finally:
        hook.remove()
    return len(calls)


def deep_jobs(chain, interval: int, steps: int = 6):
    jobs = make_jobs(chain, steps=steps)  # frames 0, 1, 3: kv+latent, so 6, 3 and 3 steps
    for job in jobs:
        job.settings = type(job.settings)(**{**job.settings.__dict__, "deep_cache": interval})
    return jobs


@torch.no_grad()
def test_each_frame_keeps_its_own_features_as_the_batch_shrinks(tiny_chain):
    """Frames 3 and 1 start later in the schedule (latent alignment) and finish after 3 steps,
    before frame 0, whose rows then move from the end of the batch to its start between a key
    step and a shallow one: they must take their own kept features along."""
    denoiser = BatchDenoiser(tiny_chain)
    jobs = deep_jobs(tiny_chain, 2)[::-1]
    mixed = denoiser.denoise(jobs)
    for job, got in zip(jobs, mixed, strict=True):
        torch.testing.assert_close(got, denoiser.denoise([job])[0], atol=1e-4, rtol=1e-4)
    plain = BatchDenoiser(tiny_chain).denoise(deep_jobs(tiny_chain, 0)[::-1])
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(mixed, plain, strict=True)), (
        "deep_cache=2 must change the result (shallow steps ran)"
    )


@torch.no_grad()
@pytest.mark.parametrize(("interval", "whole"), [(0, 6), (1, 6), (2, 3), (3, 2), (6, 1)])
def test_the_deep_branch_runs_at_key_steps_only(tiny_chain, interval, whole):
    job = deep_jobs(tiny_chain, interval)[0]  # frame 0: all 6 steps
    denoiser = BatchDenoiser(tiny_chain)
    assert count_whole_steps(tiny_chain, lambda: denoiser.denoise([job])) == whole


def test_compiled_backends_refuse_it():
    with pytest.raises(ConfigError, match=r"sampler.deep_cache=3 runs on model.backend=eager"):
        load_config(None, preset="tiny", overrides=["sampler.deep_cache=3", "model.backend=onnx"])
    config = load_config(None, preset="tiny", overrides=["sampler.deep_cache=3"])
    assert config.sampler.deep_cache == 3


def test_unsupported_unets_are_named(tiny_chain, monkeypatch):
    unet = tiny_chain.parts.unet
    monkeypatch.setattr(unet, "class_embedding", torch.nn.Identity())
    with pytest.raises(ValueError, match="does not support this UNet: class embeddings"):
        check_supported(unet, tiny_chain.parts.controlnet)
