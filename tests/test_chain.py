"""The frame chain on the tiny preset: shapes, determinism, resume, pose, plate, alignment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from engine.batching import denoise_frame
from engine.chain import FrameSettings, frame_seed
from engine.compose import person_mask
from engine.pose import load_poses, render_pose_map
from engine.render import RenderError, render
from engine.video import load_png, save_png


def frames_of(out: Path, n: int) -> np.ndarray:
    return np.stack([load_png(out / "frames" / f"{i:06d}.png") for i in range(n)])


def adjacent_l1(frames: np.ndarray) -> float:
    f = frames.astype(np.float32)
    return float(np.abs(f[1:] - f[:-1]).mean())


def test_output_shapes_and_files(tiny_chain, dance_json, tmp_path):
    result = render(
        tiny_config(dance_json, "output.contact_sheet=true"),
        tmp_path / "o",
        chain=tiny_chain,
        progress=False,
    )
    frames = frames_of(result.out_dir, 4)
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    latent = load_file(result.out_dir / "latents" / "000003.safetensors")["latent"]
    assert latent.shape == (1, 4, 8, 8)
    assert load_png(result.out_dir / "poses" / "000000.png").shape == (64, 64, 3)
    assert (result.out_dir / "contact_sheet.png").is_file()
    assert result.video.is_file() and result.manifest.is_file()


def test_determinism(tiny_chain, dance_json, tmp_path):
    config = tiny_config(dance_json, "alignment.inter_frame=kv+latent")
    a = frames_of(render(config, tmp_path / "a", chain=tiny_chain, progress=False).out_dir, 4)
    b = frames_of(render(config, tmp_path / "b", chain=tiny_chain, progress=False).out_dir, 4)
    assert np.array_equal(a, b)
    assert frame_seed(0, 1) != frame_seed(0, 2) and frame_seed(0, 1) == frame_seed(0, 1)


@pytest.mark.parametrize("mechanism", ["kv", "latent"])
def test_resume_equals_uninterrupted(tiny_chain, dance_json, tmp_path, monkeypatch, mechanism):
    config = tiny_config(dance_json, f"alignment.inter_frame={mechanism}")
    full = frames_of(render(config, tmp_path / "full", chain=tiny_chain, progress=False).out_dir, 4)

    from engine.batching import BatchDenoiser

    real = BatchDenoiser.denoise

    def crash_at_2(self, jobs):
        if any(job.index == 2 for job in jobs):
            raise RuntimeError("simulated worker failure")
        return real(self, jobs)

    monkeypatch.setattr(BatchDenoiser, "denoise", crash_at_2)
    with pytest.raises(RenderError, match="simulated"):  # retried, then failed: an infra fault
        render(config, tmp_path / "part", chain=tiny_chain, progress=False)
    monkeypatch.setattr(BatchDenoiser, "denoise", real)
    assert not (tmp_path / "part" / "video.mp4").exists()  # no partial video left behind
    with pytest.raises(Exception, match="--resume"):
        render(config, tmp_path / "part", chain=tiny_chain, progress=False)
    result = render(config, tmp_path / "part", chain=tiny_chain, resume=True, progress=False)
    assert result.resumed_from == 2
    assert np.array_equal(frames_of(result.out_dir, 4), full)


def test_resume_refuses_a_different_config(tiny_chain, dance_json, tmp_path):
    render(tiny_config(dance_json), tmp_path / "o", chain=tiny_chain, progress=False)
    with pytest.raises(RenderError, match="config changed"):
        render(
            tiny_config(dance_json, "seed=5"),
            tmp_path / "o",
            chain=tiny_chain,
            resume=True,
            progress=False,
        )


def test_pose_changes_the_frame(tiny_chain, dance_json):
    seq = load_poses(dance_json)
    settings = FrameSettings.from_config(tiny_config(dance_json, "alignment.inter_frame=none"))
    text = tiny_chain.encode_prompt("a dancer", "")
    latents = []
    for index in (0, 2):
        pose = tiny_chain.image_tensor(render_pose_map(seq.keypoints[index] / 8, 64, 64))
        latents.append(
            denoise_frame(tiny_chain, index=0, seed=0, pose=pose, text=text, settings=settings)
        )
    assert (latents[0] - latents[1]).abs().mean() > 1e-3


def test_plate_holds_background_outside_person(tiny_chain, dance_json, tmp_path):
    rng = np.random.default_rng(0)
    plate = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    save_png(plate, tmp_path / "plate.png")
    config = tiny_config(dance_json, "alignment.background=true", f"plate={tmp_path / 'plate.png'}")
    out = render(config, tmp_path / "o", chain=tiny_chain, progress=False).out_dir
    frames = frames_of(out, 4)
    seq = load_poses(dance_json)
    scaled = seq.keypoints.copy()
    scaled[..., :2] *= 64 / 512
    for i, frame in enumerate(frames):
        mask = person_mask(
            scaled[i], 64, 64, dilate=config.chain.mask_dilate, feather=config.chain.mask_feather
        )
        outside = mask == 0
        assert outside.mean() > 0.3  # the test means something: most of the frame is background
        assert np.array_equal(frame[outside], plate[outside]), f"frame {i}"
        assert not np.array_equal(frame[~outside], plate[~outside])
        assert (out / "masks" / f"{i:06d}.png").is_file()


def test_generated_plate_holds_background(tiny_chain, dance_json, tmp_path):
    """No plate supplied: the background stage makes one (pose mask on tiny) and the chain uses it."""
    config = tiny_config(
        dance_json,
        "alignment.background=true",
        "background.mask_source=pose",
        "background.inpaint_steps=2",
    )
    result = render(config, tmp_path / "o", chain=tiny_chain, progress=False)
    plate = load_png(result.out_dir / "plate" / "plate.png")
    frames = frames_of(result.out_dir, 4)
    mask = load_png(result.out_dir / "masks" / "000002.png")[..., 0]
    assert np.array_equal(frames[2][mask == 0], plate[mask == 0])
    manifest = json.loads(result.manifest.read_text())
    assert manifest["stages"]["plate"]["source"] == "generated"
    assert {"refine", "background", "chain"} <= set(manifest["timings_s"])


def test_latent_alignment_brings_adjacent_frames_closer(tiny_chain, dance_json, tmp_path):
    l1 = {}
    for mechanism in ("none", "latent"):
        config = tiny_config(dance_json, f"alignment.inter_frame={mechanism}", "sampler.steps=4")
        l1[mechanism] = adjacent_l1(
            frames_of(
                render(config, tmp_path / mechanism, chain=tiny_chain, progress=False).out_dir, 4
            )
        )
    assert l1["latent"] < 0.6 * l1["none"], l1


def test_kv_guides_later_frames_only(tiny_chain, dance_json, tmp_path):
    """Frame 0 has no reference: under ``kv`` its forward passes carry no cross-frame keys. What
    holds then: bit-identical to ``none`` when both ran batches of the same shape (same machine);
    otherwise (a padding policy that pads kv and none batches differently) within 1 grey level,
    since BLAS kernels block differently per shape and per CPU."""
    out, calls = {}, {}
    ctx = tiny_chain.context

    def record(_module, args, kwargs):
        calls[mechanism].append((tuple(args[0].shape), ctx.ref_index is None))

    hook = tiny_chain.parts.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for mechanism in ("none", "kv"):
            calls[mechanism] = []
            config = tiny_config(dance_json, f"alignment.inter_frame={mechanism}")
            out[mechanism] = frames_of(
                render(config, tmp_path / mechanism, chain=tiny_chain, progress=False).out_dir, 4
            )
    finally:
        hook.remove()
    steps = 3  # tiny_config's sampler.steps: frame 0 is the first 3 UNet calls
    kv0, none0 = calls["kv"][:steps], calls["none"][:steps]
    assert all(plain for _, plain in kv0), "frame 0 attended to cross-frame keys"
    assert not any(plain for _, plain in calls["kv"][steps:]), "later frames had no references"
    if [shape for shape, _ in kv0] == [shape for shape, _ in none0]:
        assert np.array_equal(out["none"][0], out["kv"][0])
    else:
        diff = np.abs(out["none"][0].astype(int) - out["kv"][0].astype(int)).max()
        assert diff <= 1, f"frame 0 differs by {diff} grey levels between kv and none"
    for t in (1, 2, 3):
        assert not np.array_equal(out["none"][t], out["kv"][t])


def test_memory_state_is_two_references(tiny_chain, dance_json):
    settings = FrameSettings.from_config(tiny_config(dance_json, "alignment.inter_frame=kv"))
    from engine.chain import Reference

    pose = torch.zeros(1, 3, 64, 64)
    anchor, prev = (
        Reference(0, torch.zeros(1, 4, 8, 8), pose),
        Reference(41, torch.zeros(1, 4, 8, 8), pose),
    )
    assert [r.index for r in tiny_chain.references(settings, prev, anchor)] == [0, 41]
    assert [r.index for r in tiny_chain.references(settings, anchor, anchor)] == [0]


def test_full_method_refine_lora_plate_chain(tiny_chain, dance_json, tmp_path):
    """refine → appearance LoRA → plate → chain, each stage's output named in the manifest."""
    config = tiny_config(
        dance_json,
        "alignment.intra_frame=true",
        "alignment.background=true",
        "background.inpaint_steps=2",
        "appearance.references=2",
        "appearance.steps=3",
        f"cache_dir={tmp_path / 'cache'}",
    )
    result = render(config, tmp_path / "full", chain=tiny_chain, progress=False)
    manifest = json.loads(result.manifest.read_text())
    stages = manifest["stages"]
    assert stages["adapter"]["trained"] is True
    assert Path(stages["adapter"]["path"]).is_dir()
    assert (result.out_dir / "refined_prompt.json").is_file() and (
        result.out_dir / "plate" / "plate.png"
    ).is_file()
    assert {"refine", "appearance", "background", "chain"} <= set(manifest["timings_s"])
    assert "sks" in manifest["prompt"]["frame"]
    # The resident UNet is back to the base model, and a second render reuses the cached adapter.
    from engine.appearance import active_adapter

    assert active_adapter(tiny_chain.parts.unet) is None
    again = render(config, tmp_path / "again", chain=tiny_chain, progress=False)
    assert json.loads(again.manifest.read_text())["stages"]["adapter"]["trained"] is False
    assert np.array_equal(frames_of(result.out_dir, 4), frames_of(again.out_dir, 4))


def test_legacy_scheduler_config_is_fixed_like_diffusers(dance_json):
    """An old SD-1.x scheduler config (steps_offset 0, clip_sample true): the chain applies the
    fixes StableDiffusionPipeline applies, with the same FutureWarnings, and samples exactly as
    with the fixed config."""
    import dataclasses
    import warnings

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from engine.chain import FrameChain
    from engine.config import ModelConfig
    from engine.models.registry import SD_SCHEDULER, build_components

    parts = build_components(ModelConfig(preset="tiny", device="cpu", seed=5))  # private UNet
    legacy = {**SD_SCHEDULER, "steps_offset": 0, "clip_sample": True}
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        chain = FrameChain(dataclasses.replace(parts, scheduler=DDIMScheduler.from_config(legacy)))
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        pipe = StableDiffusionPipeline(
            parts.vae, parts.text_encoder, parts.tokenizer, parts.unet,
            DDIMScheduler.from_config(legacy), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
    expected = [str(w.message) for w in theirs if w.category is FutureWarning]
    assert len(expected) == 2 and "steps_offset" in expected[0] and "clip_sample" in expected[1]
    assert [str(w.message) for w in ours if w.category is FutureWarning] == expected
    assert dict(chain.scheduler.config) == dict(pipe.scheduler.config)
    assert chain.scheduler.config.steps_offset == 1 and chain.scheduler.config.clip_sample is False

    settings = FrameSettings.from_config(tiny_config(dance_json, "alignment.inter_frame=none"))
    pose = chain.image_tensor(render_pose_map(load_poses(dance_json).keypoints[0] / 8, 64, 64))
    text = chain.encode_prompt("a dancer", "")
    got = denoise_frame(chain, index=0, seed=1, pose=pose, text=text, settings=settings)
    modern = FrameChain(
        dataclasses.replace(parts, scheduler=DDIMScheduler.from_config(SD_SCHEDULER))
    )
    want = denoise_frame(modern, index=0, seed=1, pose=pose, text=text, settings=settings)
    assert torch.equal(got, want)
