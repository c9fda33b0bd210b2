"""Background alignment: SAM prompts, mask selection and trust, the plate end to end on tiny."""

from __future__ import annotations

import json
import logging
import time

import cv2
import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from engine.background import (
    IOU_TIE,
    PERSON_NEGATIVE,
    SamMaskError,
    make_plate,
    mask_iou,
    sam_prompts,
    save_plate_result,
    segment_person,
    select_mask,
)
from engine.compose import pose_body_mask
from engine.config import BackgroundConfig, ModelConfig, RenderConfig, SamplerConfig
from engine.models.inpaint import build_inpaint_unet, make_inpaint_pipeline
from engine.models.registry import WeightsNotFoundError
from engine.models.sam import SAM_CHECKPOINT_URLS, build_sam, build_tiny_sam, load_sam
from engine.pose import synthetic_dance
from engine.refine import RefineRequest, TemplateRefiner

SIZE = 64


def t_pose(size: int = 128) -> np.ndarray:
    """A frontal T-pose (18, 3) float32 centred in a size x size frame, all joints confident."""
    s = size / 128.0
    xy = {
        "nose": (64, 30), "neck": (64, 42), "right_shoulder": (52, 42), "right_elbow": (38, 42),
        "right_wrist": (24, 42), "left_shoulder": (76, 42), "left_elbow": (90, 42),
        "left_wrist": (104, 42), "right_hip": (57, 74), "right_knee": (56, 94),
        "right_ankle": (55, 114), "left_hip": (71, 74), "left_knee": (72, 94),
        "left_ankle": (73, 114), "right_eye": (61, 27), "left_eye": (67, 27),
        "right_ear": (58, 29), "left_ear": (70, 29),
    }  # fmt: skip
    from engine.pose.skeleton import JOINT_NAMES

    kp = np.ones((18, 3), np.float32)
    kp[:, :2] = np.array([xy[name] for name in JOINT_NAMES], np.float32) * s
    return kp


class FakePredictor:
    """Test double of SamPredictor: records its calls, returns fixed masks and scores."""

    def __init__(self, masks: np.ndarray, scores: np.ndarray):
        self.masks, self.scores = masks, scores
        self.image: np.ndarray | None = None
        self.kwargs: dict = {}

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        self.image = image

    def predict(self, **kwargs):
        self.kwargs = kwargs
        return self.masks, self.scores, np.zeros((len(self.masks), 256, 256), np.float32)


@pytest.fixture(scope="module")
def refined():
    return TemplateRefiner().refine(
        RefineRequest(coarse="a woman in a red dress dancing on a beach")
    )


@pytest.fixture(scope="module")
def inpaint_pipe(tiny_components):
    return make_inpaint_pipeline(ModelConfig(preset="tiny", device="cpu"), tiny_components)


@pytest.fixture(scope="module")
def dance0() -> np.ndarray:
    return synthetic_dance(1, 8.0, SIZE, SIZE).keypoints[0]


def plate_config(**background) -> RenderConfig:
    return RenderConfig(
        width=SIZE,
        height=SIZE,
        model=ModelConfig(preset="tiny", device="cpu"),
        sampler=SamplerConfig(steps=2),
        background=BackgroundConfig(inpaint_steps=2, **background),
    )


# -- plate end to end -------------------------------------------------------------------------


def test_plate_end_to_end_tiny_sam(tiny_chain, inpaint_pipe, dance0, refined, tmp_path):
    predictor = SamPredictor(build_tiny_sam(0))
    config = plate_config(mask_source="sam", fallback_to_pose=True)
    result = make_plate(
        tiny_chain, inpaint_pipe, predictor, dance0, refined, config, seed=3, adapter=None
    )
    for image in (result.scene, result.plate, result.inpainted):
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert result.mask.shape == (SIZE, SIZE) and result.mask.dtype == np.float32
    assert result.mask.min() >= 0.0 and result.mask.max() == 1.0
    assert result.sam_mask is not None and result.sam_mask.dtype == bool
    assert result.iou is not None and result.mask_source_used in ("sam", "pose_fallback")
    assert result.sam_index in (0, 1, 2)
    chosen = result.sam_mask if result.mask_source_used == "sam" else result.pose_mask
    assert (result.mask[chosen] == 1.0).all()  # the dilated mask covers the chosen one
    reach = round(0.04 * SIZE) + max(1, round(0.01 * SIZE))  # mask_dilate + plate feather
    far = cv2.distanceTransform((~chosen).astype(np.uint8), cv2.DIST_L2, 5) > reach + 1
    assert (result.mask[far] == 0.0).all()
    outside = result.mask == 0.0
    assert outside.mean() > 0.2
    assert np.array_equal(result.plate[outside], result.scene[outside])
    inside = result.mask == 1.0
    assert np.array_equal(result.plate[inside], result.inpainted[inside])
    assert result.negative_prompt.startswith(PERSON_NEGATIVE)
    assert result.prompt == refined.background_prompt

    files = save_plate_result(result, tmp_path / "plate")
    names = {p.name for p in (tmp_path / "plate").iterdir()}
    expected = {"plate.png", "scene.png", "inpainted.png", "plate_mask.png", "pose_mask.png"}
    assert expected | {"sam_mask.png", "plate.json"} == names  # no temporary files left
    record = json.loads(files["json"].read_text())
    assert record["seed"] == 3 and record["mask_source_used"] == result.mask_source_used
    assert record["iou"] == pytest.approx(result.iou)
    assert record["prompts"]["background"] == refined.background_prompt


def test_scene_is_frame_zero_and_plate_deterministic(tiny_chain, inpaint_pipe, dance0, refined):
    config = plate_config(mask_source="pose")
    a = make_plate(tiny_chain, inpaint_pipe, None, dance0, refined, config, seed=5, adapter=None)
    b = make_plate(tiny_chain, inpaint_pipe, None, dance0, refined, config, seed=5, adapter=None)
    assert np.array_equal(a.plate, b.plate) and np.array_equal(a.scene, b.scene)
    assert a.sam_mask is None and a.iou is None and a.mask_source_used == "pose"
    assert np.array_equal(a.pose_mask, pose_body_mask(dance0, SIZE, SIZE).astype(bool))


@pytest.fixture(scope="module")
def lora_chain():
    """A private tiny chain with two random appearance LoRAs ("a", "b") loaded."""
    from test_batching import make_lora_chain

    return make_lora_chain()


@pytest.mark.parametrize("adapter", [None, "a"], ids=["base", "lora"])
def test_scene_equals_frame_zero_of_the_chain(lora_chain, dance0, refined, adapter):
    """The scene is frame 0 as the frame chain draws it: same prompt, negative, seed, pose and
    LoRA (passed by name, applied per row). Same batch shape on the same machine → bitwise."""
    from engine.batching import BatchDenoiser
    from engine.session import CharacterChain

    pipe = make_inpaint_pipeline(ModelConfig(preset="tiny", device="cpu"), lora_chain.parts)
    config = plate_config(mask_source="pose").model_copy(update={"seed": 9})
    result = make_plate(lora_chain, pipe, None, dance0, refined, config, seed=9, adapter=adapter)
    session = CharacterChain(
        lora_chain,
        config,
        dance0[None],
        prompt=refined.frame_prompt,
        negative=config.negative_prompt,
        adapter=adapter,
    )
    frame0 = lora_chain.decode(BatchDenoiser(lora_chain).denoise([session.job(0, None, None)])[0])
    assert np.array_equal(result.scene, frame0)
    assert result.adapter == adapter and result.scene_negative == config.negative_prompt
    if adapter is not None:  # the LoRA really acts on the scene
        base = make_plate(lora_chain, pipe, None, dance0, refined, config, seed=9, adapter=None)
        assert np.abs(base.scene.astype(int) - result.scene.astype(int)).mean() > 1.0


def test_generated_scene_equals_frame_zero_of_a_render(tiny_chain, tmp_path):
    """End to end: plate/scene.png of a render with the plate and the appearance LoRA equals
    frame 0 of the same render with the background stage off (bitwise: same shapes, machine)."""
    from conftest import tiny_config

    from engine.pose import save_poses_json, synthetic_dance
    from engine.render import render
    from engine.video import load_png

    poses = tmp_path / "poses.json"
    save_poses_json(synthetic_dance(frames=2, fps=8, width=64, height=64), poses)
    lora = [
        "alignment.intra_frame=true",
        "appearance.references=1",
        "appearance.steps=2",
        "appearance.learning_rate=0.05",
        "appearance.seed=4",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    common = [*lora, "sampler.steps=2", "seed=7"]
    off = render(tiny_config(poses, *common), tmp_path / "off", chain=tiny_chain, progress=False)
    plate = [
        "alignment.background=true",
        "background.mask_source=pose",
        "background.inpaint_steps=1",
    ]
    on = render(
        tiny_config(poses, *common, *plate), tmp_path / "on", chain=tiny_chain, progress=False
    )
    scene = load_png(on.out_dir / "plate" / "scene.png")
    assert np.array_equal(scene, load_png(off.out_dir / "frames" / "000000.png"))
    base = render(
        tiny_config(poses, "sampler.steps=2", "seed=7"), tmp_path / "base", chain=tiny_chain,
        progress=False,
    )  # fmt: skip
    assert not np.array_equal(scene, load_png(base.out_dir / "frames" / "000000.png"))


def test_pose_source_writes_no_sam_mask(tiny_chain, inpaint_pipe, dance0, refined, tmp_path):
    out = tmp_path / "plate"
    out.mkdir()
    (out / "sam_mask.png").write_bytes(b"stale")
    result = make_plate(
        tiny_chain,
        inpaint_pipe,
        None,
        dance0,
        refined,
        plate_config(mask_source="pose"),
        seed=0,
        adapter=None,
    )
    save_plate_result(result, out)
    assert not (out / "sam_mask.png").exists()
    assert json.loads((out / "plate.json").read_text())["mask_source_used"] == "pose"


def test_sam_source_without_predictor_is_an_error(tiny_chain, inpaint_pipe, dance0, refined):
    with pytest.raises(ValueError, match="mask_source=pose"):
        make_plate(
            tiny_chain, inpaint_pipe, None, dance0, refined, plate_config(), seed=0, adapter=None
        )


# -- SAM prompts and pose masks ---------------------------------------------------------------


def test_sam_prompts_from_hand_made_keypoints():
    kp = t_pose(128)
    kp[4, :2] = (-6.0, 40.0)  # right wrist left of the image: clamped
    kp[17] = (0.0, 0.0, 0.0)  # left ear missing: ignored
    margin = 0.08
    prompt = sam_prompts(kp, 128, 128, margin=margin)
    pos = prompt.points[prompt.labels == 1]
    neg = prompt.points[prompt.labels == 0]
    assert prompt.points.dtype == np.float32 and prompt.labels.dtype == np.int32
    assert len(pos) == 17 and len(neg) >= 4
    expected = kp[kp[:, 2] > 0, :2].copy()
    expected[:, 0] = np.clip(expected[:, 0], 0, 127)
    assert np.allclose(pos, expected)
    for points in (pos, neg):
        assert (points >= 0).all() and (points <= 127).all()
    body = pose_body_mask(kp, 128, 128)
    distance = cv2.distanceTransform((1 - body).astype(np.uint8), cv2.DIST_L2, 5)
    rows, cols = neg[:, 1].astype(int), neg[:, 0].astype(int)
    assert (body[rows, cols] == 0).all() and (distance[rows, cols] > margin * 128).all()
    x0, y0, x1, y1 = prompt.box
    assert 0 <= x0 < x1 <= 127 and 0 <= y0 < y1 <= 127
    assert (pos[:, 0] >= x0).all() and (pos[:, 0] <= x1).all()
    assert (pos[:, 1] >= y0).all() and (pos[:, 1] <= y1).all()
    assert x0 == 0.0  # the clamped wrist pushes the padded box against the left edge


def test_sam_prompts_reject_bad_keypoints():
    with pytest.raises(ValueError, match=r"\(18, 3\)"):
        sam_prompts(np.zeros((17, 3)), 64, 64)
    with pytest.raises(ValueError, match="no joint"):
        sam_prompts(np.zeros((18, 3)), 64, 64)


def test_pose_body_mask_t_pose_geometry():
    kp = t_pose(128)
    mask = pose_body_mask(kp, 128, 128)
    from engine.pose.skeleton import LIMBS

    for a, b in LIMBS:  # every limb's midpoint is covered
        x, y = np.rint((kp[a, :2] + kp[b, :2]) / 2).astype(int)
        assert mask[y, x] == 1, (a, b)
    torso_centre = np.rint(kp[[2, 5, 8, 11], :2].mean(axis=0)).astype(int)
    assert mask[torso_centre[1], torso_centre[0]] == 1
    for x, y in ((2, 2), (125, 2), (2, 125), (125, 125), (20, 100), (108, 100)):
        assert mask[y, x] == 0, (x, y)


# -- multimask selection and trust --------------------------------------------------------------


def _three_masks(body: np.ndarray) -> np.ndarray:
    """A wrong object (corner blob), the body itself, and the body plus two pixels."""
    wrong = np.zeros(body.shape, bool)
    wrong[:10, :10] = True
    near = body.astype(bool).copy()
    near[-1, -2:] = True
    return np.stack([wrong, body.astype(bool), near])


def test_select_rule_on_fake_predictor():
    kp = t_pose(64)
    body = pose_body_mask(kp, 64, 64)
    masks = _three_masks(body)
    ious = [mask_iou(m, body) for m in masks]
    assert ious[1] == 1.0 and ious[0] == 0.0
    image = np.full((64, 64, 3), 7, np.uint8)

    # Clear IoU winner (mask 1) beats SAM's confident wrong mask 0.
    fake = FakePredictor(masks[:2], np.array([0.99, 0.4]))
    seg = segment_person(fake, image, kp)
    assert seg.chosen == 1 and seg.score == pytest.approx(0.4)
    assert fake.image is image and fake.kwargs["multimask_output"] is True
    prompt = sam_prompts(kp, 64, 64)
    assert np.array_equal(fake.kwargs["point_coords"], prompt.points)
    assert np.array_equal(fake.kwargs["point_labels"], prompt.labels)
    assert np.array_equal(fake.kwargs["box"], prompt.box)

    # Near-tie on IoU (within IOU_TIE): SAM's score decides.
    assert 0 < ious[1] - ious[2] <= IOU_TIE
    index, _ = select_mask(masks, np.array([0.99, 0.5, 0.8]), body)
    assert index == 2
    index, got = select_mask(masks, np.array([0.99, 0.8, 0.5]), body)
    assert index == 1 and np.allclose(got, ious)


def test_sam_trust_check_accepts_falls_back_or_raises(
    tiny_chain, inpaint_pipe, dance0, refined, caplog
):
    wrong = np.zeros((3, SIZE, SIZE), bool)
    wrong[:, :6, :6] = True  # a corner blob: IoU 0 with the body
    fake = FakePredictor(wrong, np.array([0.9, 0.8, 0.7]))
    with caplog.at_level(logging.WARNING, logger="engine.background"):
        result = make_plate(
            tiny_chain, inpaint_pipe, fake, dance0, refined, plate_config(), seed=0, adapter=None
        )
    assert result.mask_source_used == "pose_fallback" and result.iou == 0.0
    assert any("sam_min_iou" in r.getMessage() for r in caplog.records)
    assert (result.mask[result.pose_mask] == 1.0).all()
    assert fake.image is not None and np.array_equal(fake.image, result.scene)

    body = np.repeat(result.pose_mask[None], 3, axis=0)
    good = FakePredictor(body, np.array([0.1, 0.2, 0.3]))
    trusted = make_plate(
        tiny_chain, inpaint_pipe, good, dance0, refined, plate_config(), seed=0, adapter=None
    )
    assert trusted.mask_source_used == "sam" and trusted.iou == 1.0 and trusted.sam_index == 2

    with pytest.raises(SamMaskError, match="fallback_to_pose"):
        make_plate(
            tiny_chain, inpaint_pipe, fake, dance0, refined,
            plate_config(fallback_to_pose=False), seed=0, adapter=None)  # fmt: skip


# -- models -----------------------------------------------------------------------------------


def test_tiny_sam_through_real_predictor():
    sam = build_sam(ModelConfig(preset="tiny", device="cpu", seed=1))
    assert isinstance(sam, Sam) and sam.image_encoder.img_size == 256
    again = build_tiny_sam(1)
    assert all(
        torch.equal(a, b)
        for a, b in zip(sam.state_dict().values(), again.state_dict().values(), strict=True)
    )
    predictor = SamPredictor(sam)
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    seg = segment_person(predictor, image, synthetic_dance(1, 8.0, SIZE, SIZE).keypoints[0])
    assert seg.mask.shape == (SIZE, SIZE) and seg.mask.dtype == bool
    assert seg.chosen in (0, 1, 2) and np.isfinite(seg.score)


def test_load_sam_missing_checkpoint_names_file(tmp_path):
    missing = tmp_path / "sam_vit_b_01ec64.pth"
    with pytest.raises(WeightsNotFoundError) as err:
        load_sam("vit_b", missing)
    assert str(missing) in str(err.value) and SAM_CHECKPOINT_URLS["vit_b"] in str(err.value)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsNotFoundError, match="not a loadable vit_b"):
        load_sam("vit_b", broken)
    with pytest.raises(WeightsNotFoundError, match=r"model\.sam_checkpoint"):
        build_sam(ModelConfig(preset="sd15", device="cpu"))


def test_missing_inpaint_weights_fail_fast(tiny_components, tmp_path):
    config = ModelConfig(preset="sd15", device="cpu", inpaint=str(tmp_path / "no-inpaint"))
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match=r"model\.inpaint") as err:
        build_inpaint_unet(config, tiny_components)
    assert "no-inpaint" in str(err.value) and time.perf_counter() - start < 5.0


def test_inpaint_pipeline_shares_components(inpaint_pipe, tiny_components):
    assert inpaint_pipe.vae is tiny_components.vae
    assert inpaint_pipe.text_encoder is tiny_components.text_encoder
    assert inpaint_pipe.tokenizer is tiny_components.tokenizer
    assert inpaint_pipe.unet is not tiny_components.unet
    assert inpaint_pipe.unet.config.in_channels == 9
    hidden = tiny_components.text_encoder.config.hidden_size
    assert inpaint_pipe.unet.config.cross_attention_dim == hidden
    assert inpaint_pipe.safety_checker is None
    assert inpaint_pipe.scheduler is not tiny_components.scheduler
