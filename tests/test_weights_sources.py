"""Real weights as users have them: diffusers folders, hub caches, single files (LDM layout).

The weights are the tiny preset's, written in each on-disk layout (tests/weights_layouts.py),
so every source must give the very same models, and therefore the very same frames.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from huggingface_hub import constants as hf_constants

from engine.config import ConfigError, ModelConfig, load_config
from engine.models.errors import WeightsNotFoundError
from engine.models.registry import build_components, check_dtype
from engine.models.sources import classify, content_digest, hub_patterns, shipped_config
from engine.video import load_png
from tests import weights_layouts as wl


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny weights in every layout: folders, a hub cache, LDM single files."""
    return wl.write_all_layouts(tmp_path_factory.mktemp("weights"))


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_ldm_single_file_loads_the_same_tensors(layouts, kind):
    """diffusers' from_single_file of our LDM files gives back the tiny weights exactly."""
    parts = build_components(_model(layouts, base=layouts[kind], controlnet=layouts["cn11"]))
    tiny = wl.tiny_parts()
    for name in ("unet", "vae", "text_encoder", "controlnet"):
        assert _equal(getattr(parts, name), getattr(tiny, name)), name
    assert parts.name.startswith("sd15:")


def test_controlnet_v10_file_holds_a_whole_sd_and_loads_its_controlnet(layouts):
    v10 = ControlNetModel.from_single_file(
        str(layouts["cn10"]), config=str(layouts["controlnet_folder"]), local_files_only=True
    )
    assert _equal(v10, wl.tiny_parts().controlnet)


def _model(layouts: dict[str, Path], **kw: object) -> ModelConfig:
    defaults = {
        "preset": "sd15",
        "device": "cpu",
        "dtype": "float32",
        "base_config": str(layouts["folder"]),
        "controlnet_config": str(layouts["controlnet_folder"]),
        "inpaint_config": str(layouts["inpaint_folder"]),
    }
    return ModelConfig(**{**defaults, **{k: str(v) for k, v in kw.items()}})


def _render(tmp: Path, poses: Path, layouts: dict[str, Path], *sets: str) -> list[np.ndarray]:
    from engine.render import render

    overrides = [
        f"poses={poses}",
        "prompt=a woman in a red dress dancing",
        "width=64",
        "height=64",
        "sampler.steps=2",
        "model.device=cpu",
        "model.dtype=float32",
        f"model.base_config={layouts['folder']}",
        f"model.controlnet_config={layouts['controlnet_folder']}",
        f"model.inpaint_config={layouts['inpaint_folder']}",
        "alignment.intra_frame=false",
        "alignment.background=false",
        "output.contact_sheet=false",
        "limits.max_frames=2",
        *sets,
    ]
    config = load_config(None, preset="sd15", overrides=overrides)
    result = render(config, tmp, progress=False)
    assert result.frames == 2
    return [load_png(p) for p in sorted((tmp / "frames").glob("*.png"))]


@pytest.fixture()
def two_frames(tmp_path: Path) -> Path:
    from engine.pose import save_poses_json, synthetic_dance

    path = tmp_path / "poses.json"
    save_poses_json(synthetic_dance(frames=2, fps=8, width=64, height=64), path)
    return path


def test_every_source_renders_the_same_frames(layouts, two_frames, tmp_path, monkeypatch):
    """Folder, hub cache (by hub id, offline), .safetensors and .ckpt single files and ControlNet
    v1.1 file: the same weights, so the same frames (bit-identical PNGs)."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(layouts["hub_cache"]))
    sources = {
        "folder": (layouts["folder"], layouts["controlnet_folder"]),
        "hub": ("someone/tiny-sd", "someone/tiny-cn"),
        "safetensors": (layouts["safetensors"], layouts["cn11"]),
        "ckpt": (layouts["ckpt"], layouts["cn10"]),
    }
    frames = {
        name: _render(
            tmp_path / name, two_frames, layouts, f"model.base={base}", f"model.controlnet={cn}"
        )
        for name, (base, cn) in sources.items()
    }
    reference = frames.pop("folder")
    assert len(reference) == 2 and reference[0].std() > 0
    for name, got in frames.items():
        assert all(np.array_equal(a, b) for a, b in zip(reference, got, strict=True)), name


def test_single_file_renders_the_whole_method(layouts, two_frames, tmp_path):
    """LoRA training, a SAM mask from a transformers-layout SAM, an inpainted plate from a
    single-file inpainting UNet, kv chain."""
    frames = _render(
        tmp_path / "full",
        two_frames,
        layouts,
        f"model.base={layouts['safetensors']}",
        f"model.controlnet={layouts['cn11']}",
        f"model.inpaint={layouts['inpaint_file']}",
        "alignment.intra_frame=true",
        "alignment.background=true",
        "alignment.inter_frame=kv",
        "background.mask_source=sam",
        f"model.sam_checkpoint={layouts['hf_sam']}",
        "background.fallback_to_pose=true",
        "background.inpaint_steps=2",
        "appearance.references=1",
        "appearance.steps=2",
        "appearance.resolution=64",
    )
    assert len(frames) == 2
    assert (tmp_path / "full" / "plate" / "plate.png").is_file()
    assert (tmp_path / "full" / "adapter").is_dir()
    plate = json.loads((tmp_path / "full" / "plate" / "plate.json").read_text())
    assert plate["sam_score"] is not None  # SAM ran (its mask may still fall back to the pose's)


def test_hf_sam_predicts_like_segment_anythings_predictor(layouts):
    """The transformers SAM behind SamPredictor's interface: 3 masks at the image size."""
    from engine.background import segment_person
    from engine.models.sam import build_sam_predictor
    from engine.pose import synthetic_dance

    predictor = build_sam_predictor(
        _model(layouts, sam_checkpoint=layouts["hf_sam"], sam_type="vit_b")
    )
    image = (np.random.default_rng(0).random((64, 48, 3)) * 255).astype(np.uint8)
    keypoints = synthetic_dance(frames=1, fps=8, width=48, height=64).keypoints[0]
    seg = segment_person(predictor, image, keypoints)
    assert seg.mask.shape == (64, 48) and seg.mask.dtype == bool and 0 <= seg.chosen < 3
    wrong = layouts["folder"] / "unet"  # a folder, but not a SAM
    with pytest.raises(WeightsNotFoundError, match="transformers SAM folder"):
        build_sam_predictor(_model(layouts, sam_checkpoint=wrong))


def test_single_file_of_another_model_is_refused_with_the_fix(layouts, tmp_path):
    wrong = wl.write_single_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsNotFoundError, match=r"not an SD-1.x checkpoint.*model.base_config"):
        build_components(_model(layouts, base=str(wrong), controlnet=str(layouts["cn11"])))
    with pytest.raises(WeightsNotFoundError, match=r"model.controlnet=.*ControlNetModel"):
        build_components(_model(layouts, base=str(layouts["folder"]), controlnet=str(wrong)))


def test_classify_never_takes_a_missing_local_path_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    assert classify("owner/name", "base").kind == "hub"
    for missing in ("weights/sd15", "./sd15", "/nowhere/sd15", "model.safetensors"):
        with pytest.raises(WeightsNotFoundError, match="does not exist"):
            classify(missing, "base")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(WeightsNotFoundError, match="not a checkpoint"):
        classify("notes.txt", "base")


def test_spec_model_paths_resolve_against_the_specs_folder(tmp_path, monkeypatch):
    spec_dir = tmp_path / "project"
    (spec_dir / "weights" / "sd15").mkdir(parents=True)
    (spec_dir / "lora.safetensors").write_bytes(b"")
    (spec_dir / "spec.yaml").write_text(
        "preset: sd15\nmodel:\n  base: weights/sd15\n  controlnet: lllyasviel/sd-controlnet-openpose\n"
        "  inpaint: weights/missing-inpaint\nappearance:\n  lora: ./lora.safetensors\n"
    )
    monkeypatch.chdir(tmp_path)  # not the spec's folder
    c = load_config(spec_dir / "spec.yaml")
    assert c.model.base == str(spec_dir / "weights" / "sd15")
    assert c.model.inpaint == str(spec_dir / "weights" / "missing-inpaint")  # local, not a hub id
    assert c.model.controlnet == "lllyasviel/sd-controlnet-openpose"
    assert c.appearance.lora == str(spec_dir / "lora.safetensors")
    with pytest.raises(WeightsNotFoundError, match="missing-inpaint does not exist"):
        classify(c.model.inpaint, "inpaint")


def test_hub_patterns_pick_variant_then_safetensors_then_bin():
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",  # an older repo: .bin only
        "text_encoder/model.fp16.safetensors",  # an fp16-only repo folder
        "tokenizer/vocab.json",
        "v1-5-pruned.ckpt",
        "safety_checker/model.safetensors",
    ]
    plain = hub_patterns(files, None)
    assert "unet/diffusion_pytorch_model.safetensors" in plain
    assert "unet/diffusion_pytorch_model.bin" not in plain
    assert "vae/diffusion_pytorch_model.bin" in plain  # the .bin fallback
    assert "v1-5-pruned.ckpt" not in plain and "tokenizer/vocab.json" in plain
    fp16 = hub_patterns(files, "fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "unet/diffusion_pytorch_model.safetensors" not in fp16
    assert "text_encoder/model.fp16.safetensors" in fp16
    control = hub_patterns(["config.json", "diffusion_pytorch_model.safetensors"], None)
    assert control == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_variant_loads_fp16_files_of_a_folder(layouts, tmp_path):
    folder = tmp_path / "fp16"
    parts = wl.tiny_parts()
    wl.write_diffusers_folder(parts, folder)
    for sub in ("unet", "vae"):  # only the fp16 variant of these two
        getattr(parts, sub).save_pretrained(folder / sub, variant="fp16")
        (folder / sub / "diffusion_pytorch_model.safetensors").unlink()
    parts.text_encoder.save_pretrained(folder / "text_encoder", variant="fp16")
    (folder / "text_encoder" / "model.safetensors").unlink()
    model = _model(layouts, base=str(folder), controlnet=str(layouts["controlnet_folder"]))
    with pytest.raises(WeightsNotFoundError, match=r"UNet|text encoder"):
        build_components(model)
    loaded = build_components(model.model_copy(update={"variant": "fp16"}))
    assert _equal(loaded.unet, parts.unet)


def test_content_digest_follows_the_bytes_not_the_path(layouts, tmp_path):
    a = content_digest(layouts["safetensors"])
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(layouts["safetensors"].read_bytes())
    assert content_digest(copy) == a
    state = wl.sd_single_file(wl.tiny_parts(seed=1))
    wl.write_single_file(state, copy)  # replaced in place
    assert content_digest(copy) != a
    # Hub blobs are named by their sha256: the digest is the file name, read without hashing.
    blob = next((layouts["hub"] / "unet").glob("*.safetensors"))
    assert content_digest(blob) == blob.resolve().name


def test_components_name_changes_when_weights_are_replaced(layouts, tmp_path):
    base = tmp_path / "model.safetensors"
    base.write_bytes(layouts["safetensors"].read_bytes())
    model = _model(layouts, base=str(base), controlnet=str(layouts["cn11"]))
    first = build_components(model).name
    wl.write_single_file(wl.sd_single_file(wl.tiny_parts(seed=1)), base)
    assert build_components(model).name != first


def test_float16_on_cpu_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"float16 on a CPU.*model.dtype=float32"):
        check_dtype(ModelConfig(preset="sd15", dtype="float16"), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"model\.dtype=float32"):
        build_components(ModelConfig(preset="sd15-random", dtype="float16", device="cpu"))
    assert check_dtype(ModelConfig(dtype="bfloat16"), torch.device("cpu")) == torch.bfloat16


def test_shipped_configs_are_sd15s_architectures():
    """configs/models/* build exactly the parameter shapes of SD-1.5 (sd15-random's builders)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.models.real import clip_tokenizer
    from engine.models.registry import SD15_UNET, SD15_VAE

    def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}

    sd15 = shipped_config("sd15")
    with init_empty_weights():
        pairs = [
            (UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd15 / "unet")),
             UNet2DConditionModel(**SD15_UNET)),
            (AutoencoderKL.from_config(AutoencoderKL.load_config(sd15 / "vae")),
             AutoencoderKL(**SD15_VAE)),
            (ControlNetModel.from_config(
                ControlNetModel.load_config(shipped_config("sd15-controlnet-openpose"))),
             ControlNetModel(cross_attention_dim=768)),
        ]  # fmt: skip
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(sd15 / "text_encoder"))
    for shipped, reference in pairs:
        assert shapes(shipped) == shapes(reference)
    assert shapes(text)["embeddings.token_embedding.weight"] == (49408, 768)
    inpaint = UNet2DConditionModel.load_config(shipped_config("sd15-inpainting") / "unet")
    assert inpaint["in_channels"] == 9
    tokenizer = clip_tokenizer(None)  # CLIP's BPE vocabulary: known ids
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_batch_manifest_takes_model_keys_in_set_and_names_them_when_a_spec_holds_them(tmp_path):
    from cluster.batch import load_manifest
    from engine.pose import save_poses_json, synthetic_dance

    (tmp_path / "weights" / "sd15").mkdir(parents=True)
    save_poses_json(synthetic_dance(frames=2, fps=8, width=64, height=64), tmp_path / "p.json")
    (tmp_path / "a.yaml").write_text("prompt: a dancer\nposes: p.json\n")
    (tmp_path / "b.yaml").write_text(
        "prompt: a dancer\nposes: p.json\nmodel:\n  base: weights/sd15\n"
    )
    manifest = tmp_path / "batch.yaml"
    manifest.write_text(
        "preset: sd15\nset: ['model.base=weights/sd15', 'model.dtype=float32']\n"
        "renders:\n  - {id: a, spec: a.yaml}\n"
    )
    engine, renders = load_manifest(manifest)
    assert engine.model.base == str(tmp_path / "weights" / "sd15")  # the manifest's folder
    assert renders[0][1].model == engine.model
    manifest.write_text("preset: sd15\nrenders:\n  - {id: b, spec: b.yaml}\n")
    with pytest.raises(
        ConfigError, match=r"sets model\.base .*manifest's top-level set: \['model\.base="
    ):
        load_manifest(manifest)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("AVATAR_SLOW_TESTS"),
    reason="writes and reads ≈5.7 GB of SD-1.5-size weights; AVATAR_SLOW_TESTS=1",
)
@pytest.mark.timeout(1200)
def test_sd15_single_files_at_the_real_configs_render(tmp_path, two_frames):
    """SD-1.5-size random weights as an LDM .safetensors + a ControlNet v1.1 .pth, loaded against
    the configs and CLIP tokenizer shipped in configs/models (no configs folder named): 2 frames
    at 64², float32, CPU. Slow: ≈5.7 GB of weights written and read back."""
    import gc
    import time

    from transformers import CLIPTextConfig, CLIPTextModel

    start = time.perf_counter()
    parts = build_components(ModelConfig(preset="sd15-random", device="cpu", dtype="float32"))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(shipped_config("sd15") / "text_encoder"))
    state = wl.unet_to_ldm(dict(parts.unet.state_dict()), parts.unet.config)
    state.update(wl.vae_to_ldm(dict(parts.vae.state_dict()), parts.vae.config))
    state.update(wl.text_to_ldm(dict(text.state_dict())))
    base = wl.write_single_file(state, tmp_path / "sd15.safetensors")
    control = wl.controlnet_to_ldm(dict(parts.controlnet.state_dict()), parts.controlnet.config)
    cn = wl.write_single_file(control, tmp_path / "control_v11p_sd15_openpose.pth")
    del parts, text, state, control
    gc.collect()
    built = time.perf_counter() - start
    from engine.render import render

    config = load_config(
        None,
        preset="sd15",
        overrides=[
            f"poses={two_frames}",
            "prompt=a woman in a red dress dancing",
            "width=64",
            "height=64",
            "sampler.steps=2",
            "model.device=cpu",
            "model.dtype=float32",
            f"model.base={base}",
            f"model.controlnet={cn}",
            "alignment.intra_frame=false",
            "alignment.background=false",
            "output.contact_sheet=false",
        ],
    )
    result = render(config, tmp_path / "out", progress=False)
    print(f"built {built:.1f} s, rendered {time.perf_counter() - start - built:.1f} s")
    assert result.frames == 2


def test_model_name_is_the_loaded_components_name(layouts, monkeypatch):
    """The fingerprint of a render (model_name) and the components' name agree, by content."""
    from engine.models.registry import model_name

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(layouts["hub_cache"]))
    by_path = _model(layouts, base=layouts["folder"], controlnet=layouts["controlnet_folder"])
    by_hub = _model(layouts, base="someone/tiny-sd", controlnet="someone/tiny-cn")
    assert model_name(by_path) == build_components(by_path).name
    assert model_name(by_hub) == build_components(by_hub).name
    assert model_name(by_path) == model_name(by_hub)  # the same bytes in a folder and a hub cache
    missing = _model(layouts, base="someone/elsewhere", controlnet="someone/tiny-cn")
    assert model_name(missing).startswith("sd15:someone/elsewhere+")


def test_a_folder_of_bin_weights_loads(layouts, tmp_path):
    """Older checkpoints hold pytorch_model.bin / diffusion_pytorch_model.bin: diffusers and
    transformers load them when no safetensors are there."""
    folder = tmp_path / "bin"
    parts = wl.tiny_parts()
    wl.write_diffusers_folder(parts, folder)
    for sub in ("unet", "vae"):
        (folder / sub / "diffusion_pytorch_model.safetensors").unlink()
        torch.save(getattr(parts, sub).state_dict(), folder / sub / "diffusion_pytorch_model.bin")
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(parts.text_encoder.state_dict(), folder / "text_encoder" / "pytorch_model.bin")
    loaded = build_components(_model(layouts, base=folder, controlnet=layouts["controlnet_folder"]))
    for name in ("unet", "vae", "text_encoder"):
        assert _equal(getattr(loaded, name), getattr(parts, name)), name
