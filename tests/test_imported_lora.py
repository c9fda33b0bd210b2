"""appearance.lora: a character LoRA brought from elsewhere (kohya, diffusers, peft formats)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accel_helpers import random_step_inputs
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import save_file

from engine.accel import EagerStep
from engine.appearance import load_adapter, remove_adapter
from engine.appearance.imported import import_lora
from engine.appearance.lora import loaded_adapters, per_row_adapters
from engine.config import ConfigError
from engine.models.errors import WeightsNotFoundError
from tests import weights_layouts as wl

TOL = 1e-5
"""Max abs difference of outputs (fp32, CPU; the same low-rank products, padded or folded)."""


@pytest.fixture(scope="module")
def parts():
    return wl.tiny_parts(seed=3)


@pytest.fixture(scope="module")
def kohya(parts) -> dict[str, torch.Tensor]:
    """Attention q/k/v/out at rank 4 (alpha 2) + proj_in (1x1 conv) and ff at rank 2 (alpha 1),
    and the text encoder's attention: the mixed ranks and targets of real kohya files."""
    return wl.kohya_lora(
        parts.unet, parts.text_encoder, rank=4, alpha=2.0, seed=7, std=0.2, extra=True
    )


def _peft_reference(module: torch.nn.Module, lora: dict[str, torch.Tensor], prefix: str) -> None:
    """Inject the kohya tensors with peft directly (per-module rank and alpha), adapter "ref"."""
    names = {n.replace(".", "_"): n for n, _ in module.named_modules()}
    ranks, alphas, state = {}, {}, {}
    for key, value in lora.items():
        if not key.startswith(prefix) or not key.endswith(".alpha"):
            continue
        flat = key[len(prefix) : -len(".alpha")].removeprefix("text_model_")
        name = names[flat]
        down, up = (
            lora[key.replace(".alpha", ".lora_down.weight")],
            lora[key.replace(".alpha", ".lora_up.weight")],
        )
        ranks[name], alphas[name] = down.shape[0], float(value)
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
    config = LoraConfig(
        r=4,
        lora_alpha=2,
        target_modules=sorted(ranks),
        rank_pattern={f"^{n}$": r for n, r in ranks.items()},
        alpha_pattern={f"^{n}$": a for n, a in alphas.items()},
    )
    inject_adapter_in_model(config, module, adapter_name="ref")
    result = set_peft_model_state_dict(module, state, adapter_name="ref")
    assert not [k for k in result.unexpected_keys if "lora_" in k]


@torch.no_grad()
def test_kohya_lora_equals_the_same_weights_through_peft(parts, kohya, tmp_path):
    """UNet and text encoder outputs with the imported kohya LoRA (through diffusers' converter,
    normalised to one rank) equal peft's own injection of the raw tensors within TOL."""
    import copy

    path = tmp_path / "character.safetensors"
    save_file(kohya, str(path))
    weights = import_lora(path, parts.unet, parts.text_encoder)
    assert loaded_adapters(parts.unet) == []  # the models are left as they were
    assert any("proj_in" in t for t in weights.target_modules)
    assert weights.text_encoder is not None
    unet, text = copy.deepcopy(parts.unet), copy.deepcopy(parts.text_encoder)
    load_adapter(unet, weights, "imported", text_encoder=text)
    ref_unet, ref_text = copy.deepcopy(parts.unet), copy.deepcopy(parts.text_encoder)
    _peft_reference(ref_unet, kohya, "lora_unet_")
    _peft_reference(ref_text, kohya, "lora_te_")
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    ids = torch.randint(0, 300, (2, 77), generator=g)
    hidden = parts.text_encoder(ids)[0]
    t = torch.tensor([500, 20])
    got, want = unet(sample, t, hidden).sample, ref_unet(sample, t, hidden).sample
    base = parts.unet(sample, t, hidden).sample
    assert (got - want).abs().max() < TOL
    assert (want - base).abs().max() > 100 * TOL  # the LoRA changes the output
    assert (text(ids)[0] - ref_text(ids)[0]).abs().max() < TOL
    assert (text(ids)[0] - hidden).abs().max() > 100 * TOL


@torch.no_grad()
def test_scale_scales_the_update(parts, kohya, tmp_path):
    import copy

    path = tmp_path / "character.safetensors"
    save_file(kohya, str(path))
    full = import_lora(path, parts.unet, parts.text_encoder, scale=1.0)
    half = import_lora(path, parts.unet, parts.text_encoder, scale=0.5)
    key = next(k for k in full.unet if k.endswith("lora_B.weight"))
    assert torch.allclose(half.unet[key], 0.5 * full.unet[key])
    assert full.digest() != half.digest()
    unet, text = copy.deepcopy(parts.unet), copy.deepcopy(parts.text_encoder)
    load_adapter(unet, half, "halved", text_encoder=text)
    assert loaded_adapters(unet) == ["halved"] and loaded_adapters(text) == ["halved"]


def test_diffusers_and_peft_formats_give_the_same_adapter(parts, kohya, tmp_path):
    """The imported adapter saved as diffusers' pytorch_lora_weights and as a peft folder reads
    back to the same tensors."""
    from peft import get_peft_model_state_dict

    path = tmp_path / "k.safetensors"
    save_file(kohya, str(path))
    weights = import_lora(path, parts.unet, parts.text_encoder)
    # diffusers layout: unet.<peft key> / text_encoder.<peft key> (what save_lora_weights writes)
    diffusers_dir = tmp_path / "diffusers"
    diffusers_dir.mkdir()
    tensors = {f"unet.{k}": v for k, v in weights.unet.items()}
    tensors.update({f"text_encoder.{k}": v for k, v in (weights.text_encoder or {}).items()})
    save_file(tensors, str(diffusers_dir / "pytorch_lora_weights.safetensors"))
    from_diffusers = import_lora(diffusers_dir, parts.unet, parts.text_encoder)
    # peft layout: adapter_config.json + adapter_model.safetensors (UNet), text_encoder/ likewise
    import copy

    peft_dir = tmp_path / "peft"
    for sub, module, state, targets in (
        ("", parts.unet, weights.unet, weights.target_modules),
        ("text_encoder", parts.text_encoder, weights.text_encoder, weights.text_target_modules),
    ):
        model = copy.deepcopy(module)
        config = LoraConfig(r=weights.rank, lora_alpha=weights.alpha, target_modules=list(targets))
        inject_adapter_in_model(config, model, adapter_name="default")
        set_peft_model_state_dict(model, state, adapter_name="default")
        folder = peft_dir / sub
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(folder))
        save_file(get_peft_model_state_dict(model), str(folder / "adapter_model.safetensors"))
    from_peft = import_lora(peft_dir, parts.unet, parts.text_encoder)
    for other in (from_diffusers, from_peft):
        assert other.unet.keys() == weights.unet.keys()
        assert all(torch.allclose(other.unet[k], weights.unet[k], atol=1e-7) for k in weights.unet)
        assert other.text_encoder is not None and weights.text_encoder is not None
        assert other.text_encoder.keys() == weights.text_encoder.keys()


@torch.no_grad()
def test_imported_lora_runs_per_row_in_a_mixed_batch(kohya, tmp_path):
    """Rows of an imported LoRA (with proj_in / ff targets outside the attention slots), of a
    trained-style adapter and of the base model in one eager batch equal peft's per-row path."""
    from engine.appearance.lora import UNET_TARGETS, add_lora, lora_config
    from engine.chain import FrameChain
    from tests.test_accel_lora import peft_per_row

    chain = FrameChain(wl.tiny_parts(seed=3))
    path = tmp_path / "k.safetensors"
    save_file(kohya, str(path))
    weights = import_lora(path, chain.parts.unet, chain.parts.text_encoder)
    load_adapter(chain.parts.unet, weights, "imported", text_encoder=chain.parts.text_encoder)
    add_lora(chain.parts.unet, lora_config(4, 4, UNET_TARGETS), "trained")
    for name, p in chain.parts.unet.named_parameters():
        if "lora_B.trained." in name:
            p.data.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(1))
    names = ["imported", None, "trained", "imported"]
    inputs = random_step_inputs(4, 5, kv=True, adapters=names)
    want = peft_per_row(chain, inputs)
    got = EagerStep(chain.parts, chain.context)(inputs)
    assert (got - want).abs().max() < TOL
    alone = peft_per_row(chain, random_step_inputs(4, 5, kv=True, adapters=[None] * 4))
    assert (want[0] - alone[0]).abs().max() > 100 * TOL  # the imported rows differ from base
    remove_adapter(chain.parts.unet, "imported", text_encoder=chain.parts.text_encoder)
    with per_row_adapters(chain.parts.unet, [None]):
        pass


def test_bad_sources_are_refused_with_the_fix(parts, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        import_lora(tmp_path / "missing.safetensors", parts.unet, parts.text_encoder)
    other = tmp_path / "other.safetensors"
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 3)}, str(other))
    with pytest.raises(WeightsNotFoundError, match=r"appearance\.lora=.*kohya"):
        import_lora(other, parts.unet, parts.text_encoder)
    assert loaded_adapters(parts.unet) == []


def test_a_lora_without_intra_frame_alignment_is_a_config_error(tmp_path):
    from engine.config import load_config

    with pytest.raises(ConfigError, match=r"alignment\.intra_frame=true"):
        load_config(
            None, preset="tiny", overrides=[f"appearance.lora={tmp_path / 'x.safetensors'}"]
        )


def test_render_with_an_imported_lora(kohya, tmp_path, dance_json):
    """The whole in-process render with appearance.lora: no training, the adapter recorded."""
    import json

    from engine.render import render
    from tests.conftest import tiny_config

    path = tmp_path / "character.safetensors"
    save_file(wl.kohya_lora(wl.tiny_parts().unet, None, seed=2, std=0.2, extra=True), str(path))
    config = tiny_config(
        dance_json,
        "alignment.intra_frame=true",
        f"appearance.lora={path}",
        "appearance.lora_scale=0.8",
        "width=64",
        "height=64",
        "sampler.steps=2",
    )
    out = tmp_path / "out"
    result = render(config, out, progress=False)
    manifest = json.loads(result.manifest.read_text())
    assert "imported" in json.dumps(manifest)
    assert Path(out / "adapter" / "adapter.safetensors").is_file()
    # Resume after the last frame is lost: the persisted adapter is reused, the frame is equal.
    from engine.video import load_png

    last = result.frames - 1
    before = load_png(out / "frames" / f"{last:06d}.png")
    (out / "latents" / f"{last:06d}.safetensors").unlink()
    again = render(config, out, resume=True, progress=False)
    assert again.resumed_from == last
    assert (load_png(out / "frames" / f"{last:06d}.png") == before).all()
    _ = kohya


def test_compiled_steps_refuse_what_they_cannot_run_and_dora_is_refused(parts, kohya, tmp_path):
    """Feed-forward / proj_in LoRA: the compiled steps' packing names the module; DoRA: refused."""
    import copy

    from peft import get_peft_model_state_dict

    from engine.accel.graph import lora_layout, pack_adapters

    path = tmp_path / "k.safetensors"
    save_file(kohya, str(path))
    weights = import_lora(path, parts.unet, parts.text_encoder)
    unet = copy.deepcopy(parts.unet)
    load_adapter(unet, weights, "imported", text_encoder=copy.deepcopy(parts.text_encoder))
    layout = lora_layout(unet, weights.rank)
    with pytest.raises(ValueError, match=r"adapts .*proj_in, which the compiled step lacks"):
        pack_adapters(unet, ["imported"], layout)
    pack_adapters(unet, ["imported"], layout, strict=False)  # the eager step's packing
    # An attention-only kohya LoRA (q/k/v/out, like a trained adapter) packs for every back-end.
    attention = tmp_path / "attention.safetensors"
    save_file(wl.kohya_lora(parts.unet, None, rank=4, alpha=2.0, seed=9), str(attention))
    plain = copy.deepcopy(parts.unet)
    load_adapter(plain, import_lora(attention, parts.unet, parts.text_encoder), "attention")
    lora_a, lora_b, _ = pack_adapters(plain, ["attention"], lora_layout(plain, 4))
    assert lora_a[1].abs().sum() > 0 and lora_b[1].abs().sum() > 0
    dora = copy.deepcopy(parts.unet)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], use_dora=True)
    inject_adapter_in_model(config, dora, adapter_name="default")
    folder = tmp_path / "dora"
    folder.mkdir()
    config.save_pretrained(str(folder))
    save_file(get_peft_model_state_dict(dora), str(folder / "adapter_model.safetensors"))
    with pytest.raises(WeightsNotFoundError, match="DoRA"):
        import_lora(folder, parts.unet, parts.text_encoder)
    assert loaded_adapters(parts.unet) == []


def test_a_lora_by_hub_id_comes_from_the_hub_cache(parts, kohya, tmp_path, monkeypatch):
    from huggingface_hub import constants as hf_constants

    from engine.appearance.imported import lora_location
    from engine.config import ModelConfig, load_config
    from engine.models.check import check_models

    repo = tmp_path / "repo"
    repo.mkdir()
    save_file(kohya, str(repo / "pytorch_lora_weights.safetensors"))
    wl.write_hub_cache(repo, tmp_path / "hub", "someone/ada-lora")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = lora_location("someone/ada-lora", ModelConfig(offline=True))
    weights = import_lora(folder, parts.unet, parts.text_encoder)
    assert weights.metadata["format"] == "kohya/diffusers" and weights.text_encoder is not None
    with pytest.raises(
        WeightsNotFoundError, match=r"not in the local hub cache.*set appearance\.lora"
    ):
        lora_location("someone/elsewhere", ModelConfig(offline=True))
    config = load_config(
        None,
        preset="sd15",
        overrides=[
            "alignment.intra_frame=true",
            "appearance.lora=someone/ada-lora",
            "model.dtype=float32",
            "model.device=cpu",
        ],
    )
    line = next(x for x in check_models(config) if x.component == "appearance.lora")
    assert not line.ok and "another model (context 32)" in line.text  # tiny LoRA vs SD-1.5
