"""SDXL + an SDXL OpenPose ControlNet (``sdxl`` / ``sdxl-tiny``): the frame chain equals diffusers'
own StableDiffusionXLControlNetPipeline on the same weights and seed, per-row LoRA in mixed
batches equals each row alone, and a single-file SDXL checkpoint renders the folder's frame."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sdxl_layouts import write_xl_layouts
from test_batching import settings

from engine.appearance.lora import UNET_TARGETS, add_lora, lora_config, remove_lora
from engine.batching import BatchDenoiser, FrameJob, denoise_frame
from engine.chain import FrameChain
from engine.config import load_config
from engine.models.components import DiffusionComponents
from engine.models.registry import build_components
from engine.pose.draw import render_pose_map
from engine.pose.synth import synthetic_dance

TOL = 1e-5
"""Max abs latent error vs diffusers' pipeline (fp32, CPU, the same ops; batches differ)."""
SIZE = 64
PROMPT, NEGATIVE = "a dancer in a red dress", "blurry"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return write_xl_layouts(tmp_path_factory.mktemp("sdxl"))


def sdxl_chain(base, controlnet, **extra) -> FrameChain:
    overrides = [
        f"model.base={base}",
        f"model.controlnet={controlnet}",
        "model.device=cpu",
        "model.offline=true",
        "model.dtype=float32",
    ] + [f"model.{k}={v}" for k, v in extra.items()]
    config = load_config(None, preset="sdxl", overrides=overrides)
    return FrameChain(build_components(config.model))


@pytest.fixture(scope="module")
def chain(layouts) -> FrameChain:
    return sdxl_chain(layouts["folder"], layouts["controlnet"])


def pose_maps(n: int = 2) -> list[np.ndarray]:
    seq = synthetic_dance(frames=n, fps=8, width=SIZE, height=SIZE)
    return [render_pose_map(k, SIZE, SIZE) for k in seq.keypoints]


def render(chain: FrameChain, pose: np.ndarray, seed: int = 7, steps: int = 3) -> torch.Tensor:
    text = chain.encode_prompt(PROMPT, NEGATIVE)
    return denoise_frame(
        chain,
        index=0,
        seed=seed,
        pose=chain.image_tensor(pose),
        text=text,
        settings=settings("none", steps=steps),
    )


def diffusers_latents(
    chain: FrameChain, parts: DiffusionComponents, pose: np.ndarray
) -> torch.Tensor:
    """diffusers' StableDiffusionXLControlNetPipeline on ``parts`` (DDIM with the chain's schedule,
    CFG 7.5, 3 steps, the chain's noise for seed 7): the reference latents of one frame."""
    from diffusers import DDIMScheduler, StableDiffusionXLControlNetPipeline
    from PIL import Image

    pipe = StableDiffusionXLControlNetPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2,
        unet=parts.unet,
        controlnet=parts.controlnet,
        scheduler=DDIMScheduler.from_config(chain.scheduler.config),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        image=Image.fromarray(pose),
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        guidance_scale=7.5,
        latents=chain.initial_noise(7, 0, SIZE, SIZE),
        output_type="latent",
    ).images


def test_sdxl_frame_equals_diffusers_pipeline(chain):
    """One frame of the chain (DDIM, CFG 7.5, ControlNet scale 1, time_ids for 64²) = diffusers'
    StableDiffusionXLControlNetPipeline's latents with the same components, noise and steps."""
    pose = pose_maps(1)[0]
    expected = diffusers_latents(chain, chain.parts, pose)
    got = render(chain, pose)
    err = (got - expected).abs().max().item()
    assert err < TOL, f"max abs latent error {err:.2e} vs diffusers' SDXL ControlNet pipeline"
    assert chain.parts.is_sdxl and chain.encode_prompt(PROMPT, NEGATIVE).shape[1] == 78


def test_single_file_sdxl_renders_the_folders_frame(chain, layouts):
    """A single-file SDXL checkpoint (Stability's key layout, configs from the folder) and a
    single-file SDXL ControlNet load the same weights: the same frame, bit for bit."""
    single = sdxl_chain(
        layouts["single"],
        layouts["controlnet_file"],
        base_config=layouts["folder"],
        controlnet_config=layouts["controlnet"],
    )
    pose = pose_maps(1)[0]
    assert torch.equal(render(single, pose), render(chain, pose))
    assert single.parts.name.startswith("sdxl:") and single.parts.name != chain.parts.name


def test_sdxl_mixed_lora_batch_equals_rows_alone(chain):
    """Frames of two characters (one with a LoRA, one without) in one batch = each alone, with
    SDXL's pooled + time_ids conditioning carried per row."""
    unet = chain.parts.unet
    add_lora(unet, lora_config(4, 4, UNET_TARGETS), "xl_char")
    g = torch.Generator().manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B.xl_char." in name:
            p.data.normal_(0.0, 0.2, generator=g)
    try:
        poses = [chain.image_tensor(p) for p in pose_maps(2)]
        texts = [chain.encode_prompt(p, NEGATIVE) for p in (PROMPT, "a robot dancing")]
        jobs = [
            FrameJob(0, 11, poses[0], texts[0], settings("none", steps=2), adapter="xl_char"),
            FrameJob(1, 22, poses[1], texts[1], settings("none", steps=2, guidance=3.0)),
        ]
        together = BatchDenoiser(chain).denoise(jobs)
        alone = [BatchDenoiser(chain).denoise([job])[0] for job in jobs]
        for a, b in zip(together, alone, strict=True):
            assert (a - b).abs().max().item() < TOL
        base = BatchDenoiser(chain).denoise([FrameJob(**{**jobs[0].__dict__, "adapter": None})])
        assert (base[0] - alone[0]).abs().max().item() > 1e-3  # the LoRA changes the frame
    finally:
        remove_lora(unet, "xl_char")


@torch.no_grad()
def test_sdxl_deep_cache_shallow_branch_is_the_whole_step(chain):
    """DeepCache's shallow branch carries SDXL's added conditioning (pooled + time_ids in the
    time embedding of ControlNet and UNet): on this step's own deep features it is the step."""
    from engine.accel import DeepFeatures, EagerStep, StepInputs

    g = torch.Generator().manual_seed(3)
    text = torch.cat([chain.encode_prompt(PROMPT, NEGATIVE), chain.encode_prompt("a robot", "")])
    inputs = StepInputs(
        sample=torch.randn(4, 4, 8, 8, generator=g),
        timestep=torch.tensor([900, 900, 400, 400]),
        text=text,
        pose=torch.rand(4, 3, SIZE, SIZE, generator=g),
        control_scale=torch.ones(4, 1, 1, 1),
        ref_index=None,
        include_self=True,
        adapters=[None] * 4,
    )
    step = EagerStep(chain.parts, chain.context)
    whole = step(inputs)
    key = DeepFeatures()
    step(StepInputs(**{**inputs.__dict__, "deep": key}))
    shallow = step(StepInputs(**{**inputs.__dict__, "deep": DeepFeatures(reuse=key.kept)}))
    assert (shallow - whole).abs().max().item() < TOL
    pooled_off = text.clone()
    pooled_off[:, -1] = 0  # without the pooled embedding the step differs: it is used
    off = step(StepInputs(**{**inputs.__dict__, "text": pooled_off}))
    assert (off - whole).abs().max().item() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("diffusers_names", [False, True], ids=["sgm-blocks", "diffusers-paths"])
def test_kohya_sdxl_lora_equals_peft_injection(chain, tmp_path, diffusers_names):
    """A kohya SDXL LoRA (lora_unet_ with SGM block names or diffusers paths, lora_te1_) imported through diffusers' SDXL converter
    and normalised: UNet (with SDXL's added conditioning) and text encoder outputs equal peft's
    own injection of the raw tensors within 1e-4."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import save_file
    from sdxl_layouts import kohya_xl_lora

    from engine.appearance.adapter import load_adapter
    from engine.appearance.imported import import_lora
    from engine.models.components import text_kwargs

    parts = chain.parts
    lora, names = kohya_xl_lora(parts.unet, parts.text_encoder, diffusers_names=diffusers_names)
    path = tmp_path / "xl_character.safetensors"
    save_file(lora, str(path))
    weights = import_lora(path, parts.unet, parts.text_encoder)
    assert weights.text_encoder is not None
    unet, text = copy.deepcopy(parts.unet), copy.deepcopy(parts.text_encoder)
    load_adapter(unet, weights, "imported", text_encoder=text)

    def reference(module, prefix):
        keys = [k for k in names if k.startswith(prefix)]
        state = {}
        for k in keys:
            state[f"{names[k]}.lora_A.weight"] = lora[f"{k}.lora_down.weight"]
            state[f"{names[k]}.lora_B.weight"] = lora[f"{k}.lora_up.weight"]
        config = LoraConfig(r=4, lora_alpha=2, target_modules=sorted(names[k] for k in keys))
        ref = copy.deepcopy(module)
        inject_adapter_in_model(config, ref, adapter_name="ref")
        set_peft_model_state_dict(ref, state, adapter_name="ref")
        return ref

    ref_unet, ref_text = (
        reference(parts.unet, "lora_unet_"),
        reference(parts.text_encoder, "lora_te1_"),
    )
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    cond = chain.encode_prompt(PROMPT, NEGATIVE)
    t = torch.tensor([500, 20])
    got = unet(sample, t, **text_kwargs(unet, cond, sample)).sample
    want = ref_unet(sample, t, **text_kwargs(unet, cond, sample)).sample
    base = parts.unet(sample, t, **text_kwargs(unet, cond, sample)).sample
    assert (got - want).abs().max() < 1e-4
    assert (want - base).abs().max() > 2e-3  # the LoRA changes the output (measured 0.0099)
    ids = torch.randint(0, 300, (2, 77), generator=g)
    assert (text(ids)[0] - ref_text(ids)[0]).abs().max() < 1e-4
    assert (text(ids)[0] - parts.text_encoder(ids)[0]).abs().max() > 1e-2


def check_lines(**model) -> dict[str, str]:
    from engine.models.check import check_models

    sets = [f"model.{k}={v}" for k, v in {"dtype": "float32", "device": "cpu", **model}.items()]
    preset = "sdxl-random" if "preset" in model else "sdxl"
    lines = check_models(load_config(None, preset=preset, overrides=sets))
    return {line.component: str(line) for line in lines}


def test_models_check_knows_sdxl(layouts, tmp_path):
    """`avatar models check`: SDXL folders and single files are recognised, an SD-1.x folder or
    a ControlNet of another width is a problem line, and sdxl-random reports SDXL base 1.0's
    parameter counts from the shipped configs (meta device)."""
    folder = check_lines(
        base=layouts["folder"], controlnet=layouts["controlnet"], inpaint=layouts["inpaint"]
    )
    assert folder["model.base"].startswith("ok") and "SDXL" in folder["model.base"]
    assert folder["model.controlnet"].startswith("ok")
    assert folder["model.inpaint"].startswith("ok"), folder["model.inpaint"]
    text_to_image = check_lines(base=layouts["folder"], inpaint=layouts["folder"])
    assert "4 input channels" in text_to_image["model.inpaint"]
    single = check_lines(
        base=layouts["single"], base_config=layouts["folder"], controlnet=layouts["controlnet"]
    )
    assert single["model.base"].startswith("ok") and "14." in single["model.base"]
    from engine.models.sources import shipped_config

    sd15 = check_lines(base=shipped_config("sd15"), controlnet=layouts["controlnet"])
    assert sd15["model.base"].startswith("problem") and "not an SDXL" in sd15["model.base"]
    wrong = check_lines(base=shipped_config("sdxl"), controlnet=layouts["controlnet"])
    assert wrong["model.controlnet"].startswith("problem") and "96" in wrong["model.controlnet"]
    real = check_lines(preset="sdxl-random")["model.preset"]
    for count in ("2,567,463,684", "1,251,014,160", "123,060,480", "694,659,840"):
        assert count in real


@torch.no_grad()
@pytest.mark.skipif(
    not os.environ.get("AVATAR_SLOW_TESTS"),
    reason="exporting the sdxl-tiny step to ONNX takes 20-70 s on 2 cores; AVATAR_SLOW_TESTS=1",
)
def test_sdxl_onnx_step_equals_eager(chain, tmp_path):
    """The exported ONNX step (SDXL's pooled + time_ids split inside the graph) equals eager at
    two batch sizes from one export, with kv references and a per-row LoRA as runtime inputs."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from engine.accel import EagerStep, StepInputs, make_step

    unet = chain.parts.unet
    add_lora(unet, lora_config(4, 4, UNET_TARGETS), "xl_onnx")
    g = torch.Generator().manual_seed(5)
    for name, p in unet.named_parameters():
        if "lora_B.xl_onnx." in name:
            p.data.normal_(0.0, 0.2, generator=g)
    text = torch.cat([chain.encode_prompt(p, NEGATIVE) for p in (PROMPT, "a robot", "a cat")])
    try:
        step = make_step("onnx", chain.parts, chain.context, cache_dir=tmp_path)
        eager = EagerStep(chain.parts, chain.context)
        for rows in (3, 6):
            inputs = StepInputs(
                sample=torch.randn(rows, 4, 8, 8, generator=g),
                timestep=torch.randint(1, 999, (rows,), generator=g),
                text=text[torch.arange(rows) % 6],
                pose=torch.rand(rows, 3, SIZE, SIZE, generator=g),
                control_scale=torch.ones(rows, 1, 1, 1),
                ref_index=torch.randint(0, rows, (rows, 2), generator=g),
                include_self=True,
                adapters=["xl_onnx" if i % 2 else None for i in range(rows)],
            )
            err = (step(inputs) - eager(inputs)).abs().max().item()
            assert err < 1e-4, f"batch {rows}: max abs error {err:.2e} vs eager"
        assert len(list((tmp_path / "onnx").iterdir())) == 1  # one graph for both batch sizes
    finally:
        remove_lora(unet, "xl_onnx")


def test_tensorrt_refuses_sdxl_in_one_line(chain):
    from engine.accel import make_step

    with pytest.raises(RuntimeError, match=r"not verified for SDXL.*model.backend=onnx or eager"):
        make_step("tensorrt", chain.parts, chain.context)


def test_sdxl_whole_method_from_the_folder_layouts(layouts, tmp_path):
    """The whole method on SDXL weights in the real layouts: references + LoRA training (UNet
    and text encoder) with SDXL's conditioning, the plate through StableDiffusionXLInpaintPipeline
    with a 9-channel SDXL inpainting UNet, and the kv chain."""
    import json

    from engine.pose import save_poses_json
    from engine.render import render

    poses = save_poses_json(
        synthetic_dance(frames=2, fps=8, width=SIZE, height=SIZE), tmp_path / "p.json"
    )
    overrides = [
        f"poses={poses}",
        f"prompt={PROMPT}",
        f"width={SIZE}",
        f"height={SIZE}",
        "sampler.steps=2",
        "model.device=cpu",
        "model.dtype=float32",
        "model.offline=true",
        f"model.base={layouts['folder']}",
        f"model.controlnet={layouts['controlnet']}",
        f"model.inpaint={layouts['inpaint']}",
        "alignment.intra_frame=true",
        "alignment.background=true",
        "alignment.inter_frame=kv",
        "appearance.references=2",
        "appearance.steps=3",
        f"appearance.resolution={SIZE}",
        "appearance.train_text_encoder=true",
        "background.mask_source=pose",
        "background.inpaint_steps=2",
        "output.contact_sheet=false",
    ]
    result = render(load_config(None, preset="sdxl", overrides=overrides), tmp_path / "out")
    assert result.frames == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "sdxl:" in json.dumps(manifest)
    assert list((tmp_path / "out" / "plate").glob("*.png"))


def test_sdxl_step_benchmark_writes_its_report(tmp_path):
    """benchmarks.sdxl_step (the GPU lease's command) on sdxl-tiny: one timed step per size,
    JSON + Markdown written."""
    import json

    from benchmarks.sdxl_step import main

    main(["--out", str(tmp_path), "--preset", "sdxl-tiny", "--sizes", "64,128", "--repeats", "1"])
    report = json.loads((tmp_path / "sdxl_step-sdxl-tiny.json").read_text())
    assert [s["size"] for s in report["steps"]] == [64, 128]
    assert all(s["median_s"] > 0 and s["rows"] == 2 for s in report["steps"])
    assert "| 128² | 2 |" in (tmp_path / "sdxl_step-sdxl-tiny.md").read_text()
