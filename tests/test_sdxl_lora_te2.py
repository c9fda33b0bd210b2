"""appearance.lora on SDXL with a LoRA of both text encoders (kohya ``lora_te1_`` + ``lora_te2_``):
imported, carried through the adapter file, and active for the prompt's embedding on the
Sampler's path (both encoders' hidden states and the pooled row), with the frame equal to
diffusers' SDXL ControlNet pipeline on peft's own injection of the same tensors; and the whole
render with it (≈13 s for the module on 2 cores)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import save_file
from sdxl_layouts import kohya_xl_lora, tiny_xl_parts
from test_batching import settings
from test_sdxl import NEGATIVE, PROMPT, SIZE, TOL, diffusers_latents, pose_maps

from engine.appearance import loaded_adapters, read_adapter, save_adapter
from engine.appearance.imported import import_lora
from engine.batching import BatchDenoiser, FrameJob, denoise_frame
from engine.chain import FrameChain
from engine.config import load_config
from engine.core.work import AdapterPayload, SamplerState, SessionSpec
from engine.models.components import DiffusionComponents, encode_ids, tokenize

EMBED_TOL = 1e-4
"""Max abs difference of prompt embeddings vs peft's injection (fp32, CPU; B scaled, padded)."""


@pytest.fixture(scope="module")
def chain() -> FrameChain:
    return FrameChain(tiny_xl_parts(seed=0))


@pytest.fixture(scope="module")
def lora(chain) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """UNet + te1 attention at rank 4, te2 attention + MLP at rank 2 (padded to 4 on import)."""
    parts = chain.parts
    return kohya_xl_lora(parts.unet, parts.text_encoder, text_encoder_2=parts.text_encoder_2)


def _reference(module: torch.nn.Module, lora, names, prefix: str) -> torch.nn.Module:
    """A copy of ``module`` with the kohya tensors under ``prefix`` injected by peft itself."""
    keys = [k for k in names if k.startswith(prefix)]
    rank = lora[f"{keys[0]}.lora_down.weight"].shape[0]
    state = {}
    for k in keys:
        state[f"{names[k]}.lora_A.weight"] = lora[f"{k}.lora_down.weight"]
        state[f"{names[k]}.lora_B.weight"] = lora[f"{k}.lora_up.weight"]
        assert float(lora[f"{k}.alpha"]) == rank / 2
    config = LoraConfig(r=rank, lora_alpha=rank / 2, target_modules=sorted(names[k] for k in keys))
    ref = copy.deepcopy(module)
    inject_adapter_in_model(config, ref, adapter_name="ref")
    set_peft_model_state_dict(ref, state, adapter_name="ref")
    return ref


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _embedding(parts: DiffusionComponents) -> torch.Tensor:
    """(2, 78, 32 + 64) [negative, prompt] as encode_prompt builds it."""
    return encode_ids(parts, tokenize(parts, [NEGATIVE, PROMPT]))


def _session(chain: FrameChain, adapter: AdapterPayload | None) -> SessionSpec:
    config = load_config(
        None,
        preset="sdxl-tiny",
        overrides=[f"width={SIZE}", f"height={SIZE}", "model.device=cpu", "sampler.steps=3"],
    )
    from engine.pose.synth import synthetic_dance

    keypoints = synthetic_dance(frames=1, fps=8, width=SIZE, height=SIZE).keypoints
    return SessionSpec(
        config.model_dump(mode="json"), keypoints, PROMPT, NEGATIVE, None, adapter=adapter
    )


@torch.no_grad()
def test_te2_lora_drives_the_embedding_and_the_frame(chain, lora, tmp_path):
    """kohya lora_unet + lora_te1 + lora_te2 → the Sampler session's prompt embedding equals
    peft's injection into both encoders within 1e-4 (the te2 part changes it: dropped, the test
    fails), the frame equals diffusers' SDXL ControlNet pipeline on the peft-injected models
    within the SDXL tests' tolerance, the adapter survives save/read, and after the session both
    text encoders (and the UNet) are bit-identical to before."""
    tensors, names = lora
    parts = chain.parts
    assert parts.text_encoder_2 is not None
    path = tmp_path / "xl_te2.safetensors"
    save_file(tensors, str(path))
    before = [_state(m) for m in (parts.unet, *parts.text_encoders())]
    ref = {  # copies of the base models, before anything is loaded on them
        "unet": _reference(parts.unet, tensors, names, "lora_unet_"),
        "text_encoder": _reference(parts.text_encoder, tensors, names, "lora_te1_"),
        "text_encoder_2": _reference(parts.text_encoder_2, tensors, names, "lora_te2_"),
    }
    base_text = _embedding(parts)
    # te1's LoRA alone, on the base second encoder (before anything is loaded on it)
    te1_only = _embedding(
        DiffusionComponents(**{**parts.__dict__, "text_encoder": ref["text_encoder"]})
    )

    weights = import_lora(path, parts.unet, parts.text_encoder, text_encoder_2=parts.text_encoder_2)
    assert weights.text_encoder is not None and weights.text_encoder_2 is not None
    assert weights.rank == 4 and any("mlp.fc1" in m for m in weights.text_2_target_modules)
    again = read_adapter(save_adapter(weights, tmp_path / "adapter"))
    assert again.digest() == weights.digest() and again.text_encoder_2 is not None
    assert again.text_2_target_modules == weights.text_2_target_modules

    sampler = SamplerState(chain, max_batch=2, padding="none")
    payload = AdapterPayload("xl_te2", again, again.digest(), {})
    session = sampler.open("char", _session(chain, payload))

    ref_parts = DiffusionComponents(**{**parts.__dict__, **ref})
    want = _embedding(ref_parts)
    assert (session.text - want).abs().max() < EMBED_TOL
    width = parts.text_encoder.config.hidden_size
    # te2's LoRA moves its hidden states (columns after te1's; measured 0.046) and the pooled row
    # (0.17); the session's embedding is within 8e-7 of the reference, the frame within 6.2e-6
    assert (want[:, :77, width:] - te1_only[:, :77, width:]).abs().max() > 1e-2
    assert (want[:, 77] - te1_only[:, 77]).abs().max() > 1e-2
    assert (want[:, :77, :width] - base_text[:, :77, :width]).abs().max() > 1e-2  # te1's too

    pose = pose_maps(1)[0]
    got = denoise_frame(
        chain,
        index=0,
        seed=7,
        pose=chain.image_tensor(pose),
        text=session.text,
        settings=settings("none", steps=3),
        adapter="xl_te2",
    )
    expected = diffusers_latents(chain, ref_parts, pose)
    err = (got - expected).abs().max().item()
    assert err < TOL, f"max abs latent error {err:.2e} vs diffusers' pipeline with peft's LoRA"

    sampler.close("char")
    modules = (parts.unet, *parts.text_encoders())
    assert all(loaded_adapters(m) == [] for m in modules)
    for module, state in zip(modules, before, strict=True):
        after = module.state_dict()
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(_embedding(parts), base_text)


@torch.no_grad()
def test_te2_lora_row_in_a_mixed_batch_equals_each_row_alone(chain, lora, tmp_path):
    """A te2-LoRA character's row and a plain character's row in one batch = each alone; the
    plain session's prompt is encoded by the base encoders while the LoRA is loaded."""
    tensors, _ = lora
    parts = chain.parts
    path = tmp_path / "xl_te2.safetensors"
    save_file(tensors, str(path))
    weights = import_lora(path, parts.unet, parts.text_encoder, text_encoder_2=parts.text_encoder_2)
    sampler = SamplerState(chain, max_batch=2, padding="none")
    base_text = _embedding(parts)
    char = sampler.open("char", _session(chain, AdapterPayload("mix", weights, "d", {})))
    plain = sampler.open("plain", _session(chain, None))
    try:
        assert torch.equal(plain.text, base_text)
        assert (char.text - base_text).abs().max() > 1e-2
        poses = [chain.image_tensor(p) for p in pose_maps(2)]
        jobs = [
            FrameJob(0, 11, poses[0], char.text, settings("none", steps=2), adapter="mix"),
            FrameJob(1, 22, poses[1], plain.text, settings("none", steps=2, guidance=3.0)),
        ]
        together = BatchDenoiser(chain).denoise(jobs)
        alone = [BatchDenoiser(chain).denoise([job])[0] for job in jobs]
        for a, b in zip(together, alone, strict=True):
            assert (a - b).abs().max().item() < TOL
    finally:
        sampler.close("char")
        sampler.close("plain")
    assert all(loaded_adapters(m) == [] for m in (parts.unet, *parts.text_encoders()))


@torch.no_grad()
def test_te2_lora_in_diffusers_and_peft_layouts_imports_the_same(chain, lora, tmp_path):
    """The imported adapter written as diffusers keys (``text_encoder_2.<peft key>``, the
    adapter file itself) and as a peft folder with ``text_encoder_2/`` reads back to the same
    tensors; without a second text encoder (an SD-1.x model) its te2 part is refused."""
    from peft import get_peft_model_state_dict

    from engine.appearance import ADAPTER_FILE
    from engine.models.errors import WeightsNotFoundError

    tensors, _ = lora
    parts = chain.parts
    path = tmp_path / "xl_te2.safetensors"
    save_file(tensors, str(path))
    weights = import_lora(path, parts.unet, parts.text_encoder, text_encoder_2=parts.text_encoder_2)
    saved = save_adapter(weights, tmp_path / "adapter") / ADAPTER_FILE
    from_diffusers = import_lora(
        saved, parts.unet, parts.text_encoder, text_encoder_2=parts.text_encoder_2
    )
    peft_dir = tmp_path / "peft"
    for sub, module, state, targets in (
        ("unet", parts.unet, weights.unet, weights.target_modules),
        ("text_encoder", parts.text_encoder, weights.text_encoder, weights.text_target_modules),
        (
            "text_encoder_2",
            parts.text_encoder_2,
            weights.text_encoder_2,
            weights.text_2_target_modules,
        ),
    ):
        model = copy.deepcopy(module)
        config = LoraConfig(r=weights.rank, lora_alpha=weights.alpha, target_modules=list(targets))
        inject_adapter_in_model(config, model, adapter_name="default")
        set_peft_model_state_dict(model, state, adapter_name="default")
        (peft_dir / sub).mkdir(parents=True)
        config.save_pretrained(str(peft_dir / sub))
        save_file(
            get_peft_model_state_dict(model), str(peft_dir / sub / "adapter_model.safetensors")
        )
    from_peft = import_lora(
        peft_dir, parts.unet, parts.text_encoder, text_encoder_2=parts.text_encoder_2
    )
    assert weights.text_encoder_2 is not None
    for other in (from_diffusers, from_peft):
        assert other.text_encoder_2 is not None
        assert other.text_encoder_2.keys() == weights.text_encoder_2.keys()
        for key, value in weights.text_encoder_2.items():
            assert torch.allclose(other.text_encoder_2[key], value, atol=1e-7)
    for source in (path, peft_dir):
        with pytest.raises(WeightsNotFoundError, match="adapts text_encoder_2"):
            import_lora(source, parts.unet, parts.text_encoder)
    # an adapter folder written before the second encoder's part existed (no te2 keys) still reads
    import dataclasses
    import json

    from engine.appearance import META_FILE

    older = save_adapter(
        dataclasses.replace(weights, text_encoder_2=None, text_2_target_modules=()),
        tmp_path / "older",
    )
    meta = json.loads((older / META_FILE).read_text())
    for key in ("text_encoder_2", "text_2_target_modules"):
        del meta[key]
    (older / META_FILE).write_text(json.dumps(meta))
    read = read_adapter(older)
    assert read.text_encoder_2 is None and read.digest() == meta["digest"]
    assert all(loaded_adapters(m) == [] for m in (parts.unet, *parts.text_encoders()))


def test_render_with_a_te2_lora_from_the_sdxl_layouts(lora, tmp_path):
    """The whole in-process render (preset sdxl on the folder layouts, plate and kv chain) with
    ``appearance.lora`` = the kohya te1 + te2 file: `avatar models check` names both encoders'
    parts, the persisted adapter carries the second encoder's part, and a resumed render reloads it and writes the same last frame."""
    from sdxl_layouts import write_xl_layouts

    from engine.pose import save_poses_json
    from engine.pose.synth import synthetic_dance
    from engine.render import render
    from engine.video import load_png

    layouts = write_xl_layouts(tmp_path / "layouts")
    path = tmp_path / "character.safetensors"
    save_file(lora[0], str(path))
    poses = synthetic_dance(frames=2, fps=8, width=SIZE, height=SIZE)
    overrides = [
        f"poses={save_poses_json(poses, tmp_path / 'p.json')}",
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
        f"appearance.lora={path}",
        "background.mask_source=pose",
        "background.inpaint_steps=2",
        "output.contact_sheet=false",
    ]
    config = load_config(None, preset="sdxl", overrides=overrides)
    from engine.models.check import check_models

    lines = {line.component: str(line) for line in check_models(config)}
    assert "UNet + both text encoders" in lines["appearance.lora"], lines["appearance.lora"]
    out = tmp_path / "out"
    result = render(config, out, progress=False)
    adapter = read_adapter(out / "adapter")
    assert adapter.text_encoder_2 is not None and adapter.metadata["format"] == "kohya/diffusers"
    last = result.frames - 1
    before = load_png(out / "frames" / f"{last:06d}.png")
    (out / "latents" / f"{last:06d}.safetensors").unlink()
    again = render(config, out, resume=True, progress=False)
    assert again.resumed_from == last
    assert (load_png(out / "frames" / f"{last:06d}.png") == before).all()
