"""Cross-character batching: a frame in a mixed batch equals the same frame rendered alone."""

from __future__ import annotations

import pytest
import torch

from engine.appearance.lora import add_lora, loaded_adapters, lora_config
from engine.batching import BatchDenoiser, FrameJob, padded_rows, rows_per_frame
from engine.chain import FrameChain, FrameSettings, Reference
from engine.config import ModelConfig, load_config
from engine.models.registry import build_components
from engine.pose import render_pose_map, synthetic_dance


@pytest.fixture(scope="module")
def lora_chain() -> FrameChain:
    return make_lora_chain()


def make_lora_chain() -> FrameChain:
    """A private tiny chain with two random appearance LoRAs ("a", "b") loaded."""
    parts = build_components(ModelConfig(preset="tiny", seed=7))
    chain = FrameChain(parts)
    gen = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        add_lora(parts.unet, lora_config(4, 4.0, ("to_q", "to_k", "to_v", "to_out.0")), name)
        with torch.no_grad():
            for pname, p in parts.unet.named_parameters():
                if f".{name}." in f"{pname}." and "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    assert loaded_adapters(parts.unet) == ["a", "b"]
    return chain


def settings(mechanism: str = "kv+latent", steps: int = 4, **kw) -> FrameSettings:
    config = load_config(
        None,
        preset="tiny",
        overrides=[f"alignment.inter_frame={mechanism}", f"sampler.steps={steps}"],
    )
    base = FrameSettings.from_config(config)
    return FrameSettings(**{**base.__dict__, **kw})


def make_jobs(chain: FrameChain, adapters=(None, None, None), steps: int = 4) -> list[FrameJob]:
    """Three characters at different points of their chains (frame 0, 1 and 3): 2, 3 and 4
    batch rows (frame 1 has one reference, frame 3 two)."""
    seq = synthetic_dance(frames=4, fps=8, width=64, height=64)
    poses = [chain.image_tensor(render_pose_map(k, 64, 64)) for k in seq.keypoints]
    gen = torch.Generator().manual_seed(1)
    latent = lambda: torch.randn(1, 4, 8, 8, generator=gen)  # noqa: E731
    anchor = Reference(0, latent(), poses[0])
    prompts = ["a woman dancing", "a man in a blue suit", "a robot"]
    texts = [chain.encode_prompt(p, "blurry") for p in prompts]
    return [
        FrameJob(0, 11, poses[0], texts[0], settings(steps=steps), adapter=adapters[0]),
        FrameJob(
            1,
            22,
            poses[1],
            texts[1],
            settings(steps=steps, guidance=3.0),
            previous=anchor,
            anchor=anchor,
            adapter=adapters[1],
        ),
        FrameJob(
            3,
            33,
            poses[3],
            texts[2],
            settings(steps=steps),
            previous=Reference(2, latent(), poses[2]),
            anchor=anchor,
            adapter=adapters[2],
        ),
    ]


def test_mixed_batch_equals_alone_within_tolerance(tiny_chain):
    jobs = make_jobs(tiny_chain)
    denoiser = BatchDenoiser(tiny_chain)
    mixed = denoiser.denoise(jobs)
    for job, got in zip(jobs, mixed, strict=True):
        torch.testing.assert_close(got, denoiser.denoise([job])[0], atol=1e-4, rtol=1e-4)


def test_padded_batches_are_bit_identical(tiny_chain):
    jobs = make_jobs(tiny_chain)
    denoiser = BatchDenoiser(tiny_chain, pad_rows=12, padding="max")
    mixed = denoiser.denoise(jobs)
    reordered = denoiser.denoise([jobs[2], jobs[0]])
    for job, got in zip(jobs, mixed, strict=True):
        assert torch.equal(got, denoiser.denoise([job])[0])
    assert torch.equal(reordered[0], mixed[2]) and torch.equal(reordered[1], mixed[0])


def test_per_sample_lora_in_one_batch(lora_chain):
    jobs = make_jobs(lora_chain, adapters=("a", None, "b"))
    denoiser = BatchDenoiser(lora_chain, pad_rows=12, padding="max")
    mixed = denoiser.denoise(jobs)
    for job, got in zip(jobs, mixed, strict=True):
        assert torch.equal(got, denoiser.denoise([job])[0])
    # The adapters really act, each on its own rows only.
    base = denoiser.denoise(make_jobs(lora_chain))
    assert (mixed[0] - base[0]).abs().mean() > 1e-3 and (mixed[2] - base[2]).abs().mean() > 1e-3
    assert torch.equal(mixed[1], base[1])
    swapped = denoiser.denoise(make_jobs(lora_chain, adapters=("b", None, "a")))
    assert not torch.equal(swapped[0], mixed[0])


def test_mixed_signatures_are_refused(tiny_chain):
    jobs = make_jobs(tiny_chain)
    other = FrameJob(0, 1, jobs[0].pose, jobs[0].text, settings("none"))
    with pytest.raises(ValueError, match="signature"):
        BatchDenoiser(tiny_chain).denoise([jobs[0], other])


@torch.no_grad()
def test_row_results_depend_on_batch_size_only(tiny_components):
    """The CPU fact the padding relies on: content and position of other rows don't matter."""
    unet = tiny_components.unet
    a, b, c = torch.randn(3, 1, 4, 8, 8, generator=torch.Generator().manual_seed(2)).unbind(0)
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(3))

    def row(batch: list[torch.Tensor], i: int) -> torch.Tensor:
        x = torch.cat(batch)
        return unet(
            x, torch.full((len(batch),), 500), encoder_hidden_states=text.expand(len(batch), -1, -1)
        ).sample[i]

    assert torch.equal(row([a, b, c], 0), row([c, b, a], 2))
    assert torch.equal(row([a, b, c], 0), row([a, c, c], 0))


# -- padding policy ---------------------------------------------------------------------------


def test_padded_rows_policies():
    assert [padded_rows(n, "bucket", 32) for n in (1, 2, 3, 4, 5, 9, 17, 32)] == [
        1, 2, 4, 4, 8, 16, 32, 32,
    ]  # fmt: skip
    assert [padded_rows(n, "bucket", 12) for n in (3, 5, 9, 12)] == [4, 8, 12, 12]
    assert [padded_rows(n, "max", 16) for n in (1, 7, 16)] == [16, 16, 16]
    assert [padded_rows(n, "none", 16) for n in (1, 7, 16)] == [1, 7, 16]
    assert rows_per_frame("kv") == 4 and rows_per_frame("latent") == 2
    for bad in (0, 17):
        with pytest.raises(ValueError, match="capacity"):
            padded_rows(bad, "bucket", 16)


def test_bucket_padding_is_bitwise_within_a_bucket(tiny_chain):
    """Frame 3 (4 rows) with frame 0 (2 rows) or with frame 1 (3 rows): 6 and 7 rows, both padded
    to the 8-row bucket → bit-identical. Alone (4-row bucket) it is equal within 1e-4 only."""
    j0, j1, j3 = make_jobs(tiny_chain)
    bucket = BatchDenoiser(tiny_chain, pad_rows=16, padding="bucket")
    with_0 = bucket.denoise([j0, j3])[1]
    with_1 = bucket.denoise([j3, j1])[0]
    assert torch.equal(with_0, with_1)
    alone = bucket.denoise([j3])[0]
    torch.testing.assert_close(alone, with_0, atol=1e-4, rtol=1e-4)


def test_bucket_padding_costs_nothing_for_a_power_of_two(tiny_chain, monkeypatch):
    """The rows each forward pass really runs under each policy (a lone frame: 2 rows)."""
    seen: list[int] = []
    unet = tiny_chain.parts.unet
    hook = unet.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        job = make_jobs(tiny_chain, steps=2)[0]
        for policy in ("none", "bucket", "max"):
            BatchDenoiser(tiny_chain, pad_rows=16, padding=policy).denoise([job])
    finally:
        hook.remove()
    assert seen == [2, 2, 2, 2, 16, 16]


def test_the_step_is_built_for_the_samplers_row_capacity(monkeypatch):
    """A back-end with a fixed row range (TensorRT's profile) gets the Sampler's capacity
    (``cluster.max_batch`` x rows per frame), and is rebuilt when a caller needs more rows."""
    import engine.accel.backends as backends

    chain = FrameChain(build_components(ModelConfig(preset="tiny", seed=3)))  # a fresh step cache
    built: list[int | None] = []
    real = backends.make_step

    def recording(backend, parts, context, **kw):
        built.append(kw.get("max_rows"))
        step = real("eager", parts, context)
        step.limits = {"rows": kw.get("max_rows", 32)}  # as TensorRTStep has
        return step

    monkeypatch.setattr(backends, "make_step", recording)
    job = make_jobs(chain, steps=1)[0]
    BatchDenoiser(chain, pad_rows=16).denoise([job])
    BatchDenoiser(chain, pad_rows=8).denoise([job])  # fits the step built for 16
    BatchDenoiser(chain, pad_rows=48).denoise([job])
    assert built == [16, 48]


@torch.no_grad()
def test_each_frames_pose_is_embedded_once(tiny_chain, monkeypatch):
    """The ControlNet's pose embedding (a function of the pose maps alone) runs once per frame,
    not at every step, and the frames equal those of a step that embeds at every step."""
    import engine.accel.step as step_module

    embedding = type(tiny_chain.parts.controlnet.controlnet_cond_embedding)
    calls: list[int] = []
    real = embedding.forward
    monkeypatch.setattr(embedding, "forward", lambda self, x: calls.append(len(x)) or real(self, x))
    jobs = make_jobs(tiny_chain, steps=4)  # 3 frames: 2 own rows each, 0, 1 and 2 references
    once = BatchDenoiser(tiny_chain).denoise(jobs)
    assert calls == [2, 3, 4], "one embedding per frame, of its own and its references' rows"
    monkeypatch.setattr(step_module.EagerStep, "takes_pose_features", False)
    calls.clear()
    every = BatchDenoiser(tiny_chain).denoise(jobs)
    assert len(calls) == 4  # the whole batch's poses at each of the 4 steps
    for a, b in zip(once, every, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
