"""``avatar models check``: each component described from headers and configs, each problem
named with its fix (weights in the real layouts from tests/weights_layouts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import load_config
from tests import weights_layouts as wl


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return wl.write_all_layouts(tmp_path_factory.mktemp("weights"))


def _check(layouts: dict[str, Path], *sets: str) -> list[str]:
    from engine.models.check import check_models

    base = [
        f"model.base={layouts['safetensors']}",
        f"model.controlnet={layouts['cn11']}",
        f"model.inpaint={layouts['inpaint_file']}",
        f"model.base_config={layouts['folder']}",
        f"model.controlnet_config={layouts['controlnet_folder']}",
        f"model.inpaint_config={layouts['inpaint_folder']}",
        "model.device=cpu",
        "model.dtype=float32",
        "background.mask_source=pose",
    ]
    return [
        str(line)
        for line in check_models(load_config(None, preset="sd15", overrides=[*base, *sets]))
    ]


def test_models_check_describes_each_component_without_loading(layouts, tmp_path):
    lines = _check(layouts)
    assert all(line.startswith("ok") for line in lines), lines
    joined = "\n".join(lines)
    assert "model.base: file model.safetensors: SD (context 32), float32, 4.7 MB" in joined
    assert "model.inpaint: file inpainting.safetensors: SD (context 32) inpainting" in joined
    assert "model.controlnet: file control_v11p_openpose.pth: ControlNet (context 32)" in joined
    folder = _check(
        layouts,
        f"model.base={layouts['folder']}",
        f"model.controlnet={layouts['controlnet_folder']}",
    )
    assert all(line.startswith("ok") for line in folder), folder
    sam = _check(layouts, "background.mask_source=sam", f"model.sam_checkpoint={layouts['hf_sam']}")
    assert "ok      model.sam_checkpoint: transformers SAM 64," in "\n".join(sam)
    # The tiny single file against SD-1.5's shipped configs: the architectures differ.
    shipped = _check(layouts, "model.base_config=null")
    problems = [line for line in shipped if line.startswith("problem")]
    assert len(problems) == 3  # base, controlnet and inpaint are all context-32 models
    assert problems[0] == (
        "problem model.base: file model.safetensors: UNet context width 32, the model's is 768 "
        "(SD-1.x 768, SD-2.x 1024); fix: name a checkpoint of the same architecture"
    )


def test_models_check_names_every_problem_with_its_fix(layouts, tmp_path):
    lora = tmp_path / "other_model_lora.safetensors"
    from safetensors.torch import save_file

    save_file(
        {"lora_unet_x_attn2_to_k.lora_down.weight": torch.zeros(4, 1024),
         "lora_unet_x_attn2_to_k.lora_up.weight": torch.zeros(8, 4)},
        str(lora),
    )  # fmt: skip
    problems = [
        line
        for line in _check(
            layouts,
            "model.dtype=float16",
            f"model.inpaint={layouts['safetensors']}",  # a text-to-image UNet
            f"model.controlnet={layouts['folder']}",  # not a ControlNet
            "model.base=./weights/missing",
            "background.mask_source=sam",
            "alignment.intra_frame=true",
            f"appearance.lora={lora}",
        )
        if line.startswith("problem")
    ]
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "model.dtype: model.dtype=float16 on a CPU" in text and "set model.dtype=float32" in text
    assert "does not exist" in text  # model.base
    assert "9 input channels" not in text and "4 input channels, an inpainting UNet has 9" in text
    assert "no ControlNet weights in it" in text
    assert "model.sam_checkpoint: not set" in text and "background.mask_source=pose" in text
    assert "a LoRA of another model (context 1024)" in text


def test_models_check_cli_exit_codes(layouts, tmp_path):
    from typer.testing import CliRunner

    from engine.cli import app

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"preset: sd15\nmodel:\n  base: {layouts['safetensors']}\n  controlnet: {layouts['cn11']}\n"
        f"  base_config: {layouts['folder']}\n  controlnet_config: {layouts['controlnet_folder']}\n"
        "  device: cpu\n  dtype: float32\nalignment:\n  background: false\n"
    )
    ok = CliRunner().invoke(app, ["models", "check", str(spec)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("\n") == 3  # dtype, base, controlnet
    bad = CliRunner().invoke(app, ["models", "check", str(spec), "--set", "model.dtype=float16"])
    assert bad.exit_code == 1 and bad.output.startswith("problem model.dtype")


def test_models_check_knows_sdxl_sam_variants_and_uncached_hub_ids(layouts, tmp_path):
    from engine.models.check import check_models

    sdxl = wl.write_single_file(
        {
            "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
        },
        tmp_path / "sdxl.safetensors",
    )
    sam_b = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, sam_b)
    config = load_config(
        None,
        preset="sd15",
        overrides=[
            f"model.base={sdxl}",
            "model.controlnet=someone/not-cached",
            "model.offline=true",
            f"model.sam_checkpoint={sam_b}",
            "model.sam_type=vit_h",
            "model.dtype=float32",
            "model.device=cpu",
        ],
    )
    lines = {line.component: line for line in check_models(config)}
    assert "an SDXL checkpoint" in lines["model.base"].text
    assert "not in the local hub cache" in lines["model.controlnet"].text
    assert lines["model.sam_checkpoint"].text.endswith("fix: set model.sam_type=vit_b")
    assert not any(line.ok for name, line in lines.items() if name != "model.dtype")


def test_models_check_of_presets_without_files():
    from typer.testing import CliRunner

    from engine.cli import app

    out = CliRunner().invoke(app, ["models", "check", "--preset", "tiny"])
    assert out.exit_code == 0 and "model.preset: tiny: random weights built in code" in out.output
