"""One resident model set shared by LoRA training, plates and sampling (engine/resident.py):
one load, the shared UNet given back without adapters, frames equal to separate model copies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.appearance import loaded_adapters
from engine.config import load_config
from engine.core.work import (
    FrameWork,
    SamplerState,
    SessionSpec,
    appearance_stage,
    background_stage,
    build_chain,
    refine_stage,
)
from engine.pose import synthetic_dance
from engine.resident import COMPONENTS, ResidentModels

FRAMES = 2


def full_method(tmp: Path, prompt: str, seed: int) -> Any:
    """The full method (LoRA + plate + latent chain) on the tiny preset, a few steps."""
    return load_config(
        None,
        overrides=[
            f"prompt={prompt}",
            f"seed={seed}",
            "sampler.steps=2",
            "alignment.intra_frame=true",
            "appearance.references=2",
            "appearance.steps=2",
            "alignment.background=true",
            "background.inpaint_steps=1",
            f"cache_dir={tmp / 'cache'}",
        ],
    )


def prepared(runner: Any, config: Any, keypoints: np.ndarray) -> SessionSpec:
    """Refine → LoRA → plate with ``runner`` (``adapter(cfg, refined)``, ``plate(...)``)."""
    refined = refine_stage(config)
    adapter = runner.adapter(config, refined)
    plate = runner.plate(config, refined, keypoints[0], adapter)
    return SessionSpec(
        config.model_dump(mode="json"),
        keypoints,
        refined["full"],
        config.negative_prompt,
        plate.plate,
        adapter,
    )


def chain(sampler: Any, spec: SessionSpec, between: Any = None) -> np.ndarray:
    """The render's frames (F, H, W, 3) uint8, frame by frame; ``between()`` runs after each."""
    frames, latents = [], []
    for t in range(FRAMES):
        previous, anchor = (latents[-1], latents[0]) if latents else (None, None)
        [out] = sampler.denoise([FrameWork("a", t, previous, anchor)], lambda _: spec)
        assert out.error is None, out.error
        frames.append(out.frame)
        latents.append(out.latent)
        if between is not None:
            between()
    return np.stack(frames)


class Separate:
    """Today's layout: the prepare stages on their own copy of the models."""

    def __init__(self, model: Any):
        self.chain = build_chain(model)
        self.models: dict[str, Any] = {}

    def adapter(self, config: Any, refined: dict) -> Any:
        return appearance_stage(self.chain, config, refined)

    def plate(self, config: Any, refined: dict, keypoints0: np.ndarray, adapter: Any) -> Any:
        return background_stage(self.chain, self.models, config, refined, keypoints0, adapter)


@pytest.fixture(scope="module")
def poses() -> np.ndarray:
    return synthetic_dance(frames=FRAMES, fps=8, width=64, height=64).keypoints


def test_shared_set_loads_once_gives_the_unet_back_and_matches_separate_models(
    tmp_path: Path, poses: np.ndarray, monkeypatch: pytest.MonkeyPatch
):
    import engine.models.registry as registry

    a = full_method(tmp_path / "sep", "a woman in a red dress dancing", 1)
    reference = chain(
        SamplerState(build_chain(a.model), 1, "none"), prepared(Separate(a.model), a, poses)
    )

    builds = []
    build = registry.build_components
    monkeypatch.setattr(registry, "build_components", lambda c: builds.append(1) or build(c))
    shared = ResidentModels(a.model, 1, "none")
    unet, text = shared.chain.parts.unet, shared.chain.parts.text_encoder
    a = full_method(tmp_path / "shared", "a woman in a red dress dancing", 1)
    spec = prepared(shared, a, poses)
    # training and the plate took their adapters off the shared models again
    assert loaded_adapters(unet) == [] and loaded_adapters(text) == []
    assert spec.adapter is not None and spec.adapter.record["trained"]

    other = full_method(tmp_path / "shared", "a robot dancing in a city", 2)

    def another_character() -> None:  # B's LoRA and plate between A's frames
        prepared(shared, other, poses)
        assert loaded_adapters(unet) == [spec.adapter.name]  # A's session keeps its adapter

    frames = chain(shared, spec, between=another_character)
    assert builds == [1] and shared.loads == 1  # one load: 3 LoRA stages, 3 plates, 2 frames
    assert shared.runs == {"training": 3, "background": 3, "sampling": 2}
    diff = np.abs(frames.astype(int) - reference.astype(int)).max()
    assert diff <= 1, f"shared-model frames differ from separate copies by {diff} grey levels"
    shared.close("a")
    assert loaded_adapters(unet) == []

    report = shared.report()
    assert set(report["components_bytes"]) == set(COMPONENTS)
    expected = sum(p.numel() * 4 for p in shared.chain.parts.unet.parameters())
    expected += sum(b.numel() * 4 for b in shared.chain.parts.unet.buffers())
    assert report["components_bytes"]["unet"] == expected  # float32, no LoRA left
    assert report["plate_models_bytes"] and report["adapters"] == []
    assert report["weights_bytes"] == sum(report["components_bytes"].values()) + sum(
        report["plate_models_bytes"].values()
    )


def test_a_stage_that_fails_mid_training_leaves_no_adapter_behind(tmp_path: Path):
    from engine.appearance import activate, load_adapter
    from engine.appearance.lora import active_adapter, add_lora, lora_config
    from engine.appearance.train import TEXT_TARGETS, TRAINING_ADAPTER, UNET_TARGETS

    config = full_method(tmp_path, "a woman", 1)
    shared = ResidentModels(config.model, 1, "none")
    parts = shared.chain.parts
    weights = shared.adapter(config, refine_stage(config)).weights
    load_adapter(parts.unet, weights, "session", text_encoder=parts.text_encoder)
    shared.sampler._adapters["a"] = "session"  # an open session's adapter, active
    activate(parts.unet, "session", text_encoder=parts.text_encoder)
    with pytest.raises(RuntimeError, match="step 1"), shared._borrowed("training"):
        add_lora(parts.unet, lora_config(2, 2.0, UNET_TARGETS), TRAINING_ADAPTER)
        add_lora(parts.text_encoder, lora_config(2, 2.0, TEXT_TARGETS), TRAINING_ADAPTER)
        activate(parts.unet, TRAINING_ADAPTER, text_encoder=parts.text_encoder)
        raise RuntimeError("out of memory at step 1")
    assert loaded_adapters(parts.unet) == ["session"]
    assert TRAINING_ADAPTER not in loaded_adapters(parts.text_encoder)
    assert active_adapter(parts.unet) == "session"  # the state before the stage, restored


def test_sd15_random_has_every_model_of_the_full_method_at_the_official_sizes():
    """Built on the meta device (nothing allocated): SD-1.5's UNet (859,520,964 parameters),
    the 9-channel inpainting UNet (+5 input channels × 320 × 3 × 3) and SAM ViT-H (641,090,608),
    and the per-GPU sums the shared-memory benchmark reports."""
    from benchmarks.shared_memory import weights

    report = weights("sd15-random", "float16")
    gb = report["modules_gb"]
    assert gb["unet"] == round(859_520_964 * 2 / 1e9, 3)
    assert gb["inpaint_unet"] == round((859_520_964 + 5 * 320 * 9) * 2 / 1e9, 3)
    assert gb["sam"] == round(641_090_608 * 4 / 1e9, 3)  # SAM stays float32
    base = sum(gb[name] for name in COMPONENTS)
    assert report["before_gb"] - report["after_gb"] == pytest.approx(2 * base, abs=0.02)


def test_gpu_presets_share_one_model_copy_per_gpu():
    from actors.devices import device_gpus

    for preset, shared in {"sd15": True, "sd15-random": True, "tiny": False}.items():
        assert load_config(None, preset=preset).cluster.shared_models is shared, preset
    sd15 = load_config(None, preset="sd15")
    assert device_gpus(sd15) == 1.0  # the Sampler's 0.5 + trainer's 0.25 + background's 0.25
    assert device_gpus(load_config(None, preset="sd15", overrides=["cluster.sampler_gpus=1"])) == 1
