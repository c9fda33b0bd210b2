"""Intra-frame alignment: canonical poses, reference synthesis, LoRA training, adapter cache.

Runs on the tiny random-weight preset at 64x64 in a few seconds. The module builds its own
components (adapters are added to and removed from its UNet) and runs torch single-threaded,
which on the shared 2-core CI machines is several times faster for these tiny models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.appearance import (
    ADAPTER_FILE,
    META_FILE,
    VIEWS,
    AdapterWeights,
    activate,
    active_adapter,
    adapter_key,
    adapter_name,
    canonical_poses,
    class_prompt,
    get_or_train_adapter,
    load_adapter,
    loaded_adapters,
    mirror,
    read_adapter,
    reference_prompts,
    reference_settings,
    reference_views,
    remove_adapter,
    save_adapter,
    synthesize_references,
    train_appearance_lora,
)
from engine.batching import denoise_frame
from engine.chain import FrameChain
from engine.config import AppearanceConfig, ConfigError, ModelConfig, RefineConfig, SamplerConfig
from engine.models.registry import DiffusionComponents, build_components
from engine.pose.skeleton import JOINT_NAMES
from engine.refine import RefinedPrompt, refine

J = {name: i for i, name in enumerate(JOINT_NAMES)}
SAMPLER = SamplerConfig(steps=4)
# On the random tiny UNet the per-step loss is dominated by the random timestep; a batch of 4 and
# lr 1e-2 make the trend clear: seeds 0-4 all drop 10-20 % from the first to the last 5 steps.
TRAIN = AppearanceConfig(references=4, steps=40, learning_rate=1e-2, batch_size=4, seed=0)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parts() -> DiffusionComponents:
    return build_components(ModelConfig(preset="tiny", device="cpu"))


@pytest.fixture(scope="module")
def chain(parts: DiffusionComponents) -> FrameChain:
    return FrameChain(parts)


@pytest.fixture(scope="module")
def refined() -> RefinedPrompt:
    return refine(
        "a woman in a red dress dancing on a beach", config=RefineConfig(), cache_dir=None
    )


@pytest.fixture(scope="module")
def references(chain: FrameChain, refined: RefinedPrompt) -> list[np.ndarray]:
    return synthesize_references(chain, refined, TRAIN, negative=refined.negative, sampler=SAMPLER)


def unet_out(parts: DiffusionComponents) -> torch.Tensor:
    """(2, 4, 8, 8) UNet prediction on a fixed input (both attention kinds, two rows)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn((2, 4, 8, 8), generator=g)
    text = torch.randn((2, 77, 32), generator=g)
    with torch.no_grad():
        return parts.unet(x, torch.tensor([500, 20]), encoder_hidden_states=text).sample


@pytest.fixture(scope="module")
def trained(
    parts: DiffusionComponents, refined: RefinedPrompt, references: list[np.ndarray]
) -> tuple[AdapterWeights, torch.Tensor, list[str]]:
    """(weights, UNet output before training, UNet state-dict keys before training)."""
    before, keys = unet_out(parts), list(parts.unet.state_dict())
    weights = train_appearance_lora(parts, references, reference_prompts(refined, TRAIN), TRAIN)
    return weights, before, keys


# -- canonical poses and references ------------------------------------------------------------


@pytest.mark.parametrize("side", [64, 512])
def test_canonical_poses(side: int) -> None:
    poses = canonical_poses(side)
    assert list(poses) == list(VIEWS)
    for kp in poses.values():
        assert kp.shape == (18, 3) and kp.dtype == np.float32
        present = kp[:, 2] > 0
        assert np.all((kp[present, :2] >= 0) & (kp[present, :2] <= side - 1))
        assert np.all(kp[~present] == 0)  # missing joints: x = y = confidence = 0
    assert poses["front"][:, 2].all()
    assert poses["three_quarter"][J["left_ear"], 2] == 0  # far ear hidden
    assert poses["three_quarter"][J["nose"], 0] > poses["front"][J["nose"], 0]  # turned
    upper, face = poses["upper_body"], poses["face"]
    assert upper[[J["nose"], J["right_hip"], J["left_wrist"]], 2].all()
    assert not upper[[J["right_ankle"], J["left_knee"]], 2].any()
    assert face[[J["nose"], J["right_eye"], J["left_ear"], J["neck"]], 2].all()
    assert not face[[J["right_hip"], J["left_ankle"]], 2].any()
    ear_span = face[J["left_ear"], 0] - face[J["right_ear"], 0]
    assert ear_span > 0.25 * side  # a close-up
    front = poses["front"]
    assert np.allclose(mirror(mirror(front, side), side), front, atol=1e-4)
    assert mirror(front, side)[J["left_wrist"], 0] == pytest.approx(
        side - 1 - front[J["right_wrist"], 0]
    )


def test_reference_plan(refined: RefinedPrompt) -> None:
    assert reference_views(6) == [
        ("front", False), ("three_quarter", False), ("upper_body", False), ("face", False),
        ("front", True), ("three_quarter", True),
    ]  # fmt: skip
    full_body, face = refined.appearance_prompts()
    assert reference_prompts(refined, TRAIN) == [full_body, full_body, full_body, face]
    classes = reference_prompts(refined, TRAIN, prior=True)
    assert all(" sks " not in f" {p} " and p.startswith("a photo of person") for p in classes)
    assert class_prompt("sks, a sks person", "sks") == ", a person"


def test_references(references: list[np.ndarray]) -> None:
    assert len(references) == TRAIN.references
    for image in references:
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert len({image.tobytes() for image in references}) == len(references)


# -- training -----------------------------------------------------------------------------------


def test_training_loss_decreases_and_leaves_unet_untouched(
    parts: DiffusionComponents, trained: tuple[AdapterWeights, torch.Tensor, list[str]]
) -> None:
    weights, before, keys = trained
    losses = np.array(weights.losses)
    assert len(losses) == TRAIN.steps and np.isfinite(losses).all()
    first, last = losses[:5].mean(), losses[-5:].mean()
    assert last < 0.95 * first, f"loss did not decrease: first 5 {first:.4f}, last 5 {last:.4f}"
    attentions = sum(1 for n, _ in parts.unet.named_modules() if n.endswith((".attn1", ".attn2")))
    assert len(weights.unet) == attentions * 4 * 2  # q/k/v/out, A and B each
    assert weights.unet[next(iter(weights.unet))].dtype == torch.float32
    assert any(v.abs().sum() > 0 for k, v in weights.unet.items() if "lora_B" in k)
    assert list(parts.unet.state_dict()) == keys and loaded_adapters(parts.unet) == []
    assert torch.equal(unet_out(parts), before)
    assert not any(p.requires_grad for p in parts.unet.parameters())


def test_training_is_deterministic(
    parts: DiffusionComponents,
    refined: RefinedPrompt,
    references: list[np.ndarray],
    trained: tuple[AdapterWeights, torch.Tensor, list[str]],
) -> None:
    again = train_appearance_lora(parts, references, reference_prompts(refined, TRAIN), TRAIN)
    assert again.digest() == trained[0].digest()
    assert again.losses == trained[0].losses


# -- the adapter artifact and the frame chain ---------------------------------------------------


def test_saved_adapter_reloads_changes_output_and_disables_exactly(
    tmp_path: Path,
    parts: DiffusionComponents,
    chain: FrameChain,
    references: list[np.ndarray],
    trained: tuple[AdapterWeights, torch.Tensor, list[str]],
) -> None:
    weights, base, keys = trained
    folder = save_adapter(weights, tmp_path / "character", images=references)
    assert (folder / ADAPTER_FILE).is_file() and (folder / "references" / "003.png").is_file()
    with pytest.raises(FileExistsError, match="delete it"):
        save_adapter(weights, folder)
    loaded = read_adapter(folder)
    assert loaded.digest() == weights.digest() and loaded.losses == weights.losses
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    meta = json.loads((tampered / META_FILE).read_text())
    (tampered / META_FILE).write_text(json.dumps({**meta, "digest": "0" * 64}))
    with pytest.raises(ValueError, match="corrupt; delete the folder"):
        read_adapter(tampered)
    pose = chain.image_tensor(np.zeros((64, 64, 3), np.uint8))
    text = chain.encode_prompt("a photo of sks person", "")
    settings = reference_settings(SamplerConfig(steps=2))
    frame_base = denoise_frame(chain, index=0, seed=1, pose=pose, text=text, settings=settings)

    assert load_adapter(parts.unet, folder, "character") == "character"
    assert active_adapter(parts.unet) == "character"
    with_lora = unet_out(parts)
    assert not torch.allclose(with_lora, base, atol=1e-4)
    frame_lora = denoise_frame(
        chain, index=0, seed=1, pose=pose, text=text, settings=settings, adapter="character"
    )
    assert not torch.equal(frame_lora, frame_base)  # through the frame chain's processors
    activate(parts.unet, None)
    assert active_adapter(parts.unet) is None
    assert torch.equal(unet_out(parts), base)
    assert torch.equal(
        denoise_frame(chain, index=0, seed=1, pose=pose, text=text, settings=settings), frame_base
    )
    activate(parts.unet, "character")
    assert torch.equal(unet_out(parts), with_lora)
    remove_adapter(parts.unet, "character")
    assert list(parts.unet.state_dict()) == keys and torch.equal(unet_out(parts), base)


def test_two_adapters_coexist_and_switch(
    parts: DiffusionComponents,
    chain: FrameChain,
    refined: RefinedPrompt,
    references: list[np.ndarray],
    trained: tuple[AdapterWeights, torch.Tensor, list[str]],
) -> None:
    first, base, keys = trained
    other = AppearanceConfig(references=4, steps=5, learning_rate=1e-2, seed=1)
    second = train_appearance_lora(parts, references, reference_prompts(refined, other), other)
    assert second.digest() != first.digest()
    load_adapter(parts.unet, first, "a")
    load_adapter(parts.unet, second, "b")
    try:
        assert loaded_adapters(parts.unet) == ["a", "b"] and active_adapter(parts.unet) == "b"
        out_b = unet_out(parts)
        activate(parts.unet, "a")
        out_a = unet_out(parts)
        assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
        # Synthesizing references runs the base model and leaves "a" active.
        again = synthesize_references(
            chain, refined, TRAIN, negative=refined.negative, sampler=SAMPLER
        )
        assert all(np.array_equal(x, y) for x, y in zip(again, references, strict=True))
        assert active_adapter(parts.unet) == "a"
        # Training another adapter leaves both loaded and "a" active.
        train_appearance_lora(parts, references[:1], reference_prompts(refined, other)[:1], other)
        assert loaded_adapters(parts.unet) == ["a", "b"] and torch.equal(unet_out(parts), out_a)
        activate(parts.unet, "b")
        assert torch.equal(unet_out(parts), out_b)
        activate(parts.unet, None)
        assert torch.equal(unet_out(parts), base)
        with pytest.raises(ValueError, match="already loaded"):
            load_adapter(parts.unet, first, "a")
        with pytest.raises(ValueError, match=r"'nope' is not loaded .*\['a', 'b'\]"):
            activate(parts.unet, "nope")
    finally:
        remove_adapter(parts.unet, "a")
        remove_adapter(parts.unet, "b")
    assert list(parts.unet.state_dict()) == keys and torch.equal(unet_out(parts), base)


# -- the cache ----------------------------------------------------------------------------------


def test_cache_reuses_identical_inputs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chain: FrameChain,
    refined: RefinedPrompt,
) -> None:
    config = AppearanceConfig(references=2, steps=4, learning_rate=1e-2)
    adapter = get_or_train_adapter(chain, refined, config, tmp_path, sampler=SAMPLER)
    key = adapter_key(chain.parts.name, refined, config, sampler=SAMPLER)
    assert adapter.trained and adapter.key == key and adapter.name == adapter_name(key)
    assert adapter.path == tmp_path / "adapters" / key
    meta = json.loads((adapter.path / META_FILE).read_text())
    assert meta["base_model"] == chain.parts.name and meta["rank"] == config.rank
    assert meta["alpha"] == config.alpha
    assert meta["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert meta["refined"]["full"] == refined.full
    assert meta["config"] == config.model_dump(mode="json")
    assert meta["seed"] == 0 and len(meta["losses"]) == 4 and meta["created"]
    stored = [p.name for p in (tmp_path / "adapters").iterdir() if not p.name.startswith(".")]
    assert stored == [key]

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache was not used")

    monkeypatch.setattr("engine.appearance.cache.train_appearance_lora", must_not_run)
    monkeypatch.setattr("engine.appearance.cache.synthesize_references", must_not_run)
    hit = get_or_train_adapter(chain, refined, config, tmp_path, sampler=SAMPLER)
    assert not hit.trained and hit.key == key and hit.weights.digest() == adapter.weights.digest()
    assert adapter_key(chain.parts.name, refined, config.model_copy(update={"rank": 2})) != key
    assert adapter_key("another-model", refined, config, sampler=SAMPLER) != key
    assert adapter_key(chain.parts.name, refined, config) != key  # other reference sampler
    with pytest.raises(AssertionError, match="cache was not used"):
        get_or_train_adapter(chain, refined, config.model_copy(update={"seed": 1}), tmp_path)


def test_prior_preservation_and_text_encoder_lora(
    tmp_path: Path, parts: DiffusionComponents, chain: FrameChain, refined: RefinedPrompt
) -> None:
    config = AppearanceConfig(
        references=2, steps=3, learning_rate=1e-2, prior_preservation=True, train_text_encoder=True
    )
    te_keys = list(parts.text_encoder.state_dict())
    base_text = chain.encode_prompt("a photo of sks person", "")
    adapter = get_or_train_adapter(chain, refined, config, tmp_path, sampler=SAMPLER)
    weights = adapter.weights
    assert weights.text_encoder and len(weights.losses) == 3
    assert list(parts.text_encoder.state_dict()) == te_keys
    with pytest.raises(ValueError, match=r"text_encoder=components\.text_encoder"):
        load_adapter(parts.unet, adapter.path, adapter.name)
    assert loaded_adapters(parts.unet) == []
    te = parts.text_encoder
    load_adapter(parts.unet, adapter.path, adapter.name, text_encoder=te)
    try:
        assert not torch.allclose(chain.encode_prompt("a photo of sks person", ""), base_text)
        activate(parts.unet, None, text_encoder=te)
        assert torch.equal(chain.encode_prompt("a photo of sks person", ""), base_text)
    finally:
        remove_adapter(parts.unet, adapter.name, text_encoder=te)
    assert list(te.state_dict()) == te_keys


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("appearance.rank=0", "appearance.rank"),
        ("appearance.references=0", "appearance.references"),
        ("appearance.steps=0", "appearance.steps"),
        ("appearance.resolution=60", "appearance.resolution"),
        ("appearance.learning_rate=0", "appearance.learning_rate"),
        ("appearance.ranks=4", "appearance.ranks"),
    ],
)
def test_bad_configs_fail_clearly(override: str, key: str) -> None:
    from engine.config import load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_bad_inputs_fail_clearly(
    parts: DiffusionComponents, chain: FrameChain, refined: RefinedPrompt, tmp_path: Path
) -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="one prompt per image"):
        train_appearance_lora(parts, [image, image], ["a photo of sks person"], TRAIN)
    with pytest.raises(ValueError, match=r"appearance\.resolution=64"):
        train_appearance_lora(parts, [np.zeros((32, 32, 3), np.uint8)], ["p"], TRAIN)
    prior = TRAIN.model_copy(update={"prior_preservation": True})
    with pytest.raises(ValueError, match="prior_preservation=false"):
        train_appearance_lora(parts, [image], ["p"], prior)
    other = TRAIN.model_copy(update={"identifier": "zwx"})
    with pytest.raises(ValueError, match=r"appearance\.identifier is 'zwx'"):
        get_or_train_adapter(chain, refined, other, tmp_path)
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        read_adapter(tmp_path)
    assert loaded_adapters(parts.unet) == []
