"""Background alignment: one clean background plate per character (Dancing Avatar, Sec. 3.3).

The character is generated in its scene at pose frame 0 exactly as frame 0 of the render would be
drawn with the background stage off: the frame prompt, the render's negative prompt
(``config.negative_prompt``, the one every frame uses), the pose-0 map, the render seed and the
character's appearance LoRA, passed by name and applied per row. The person is segmented, by SAM
prompted from the pose (positive points on the joints, negative points well away from the body,
a box around the skeleton) or from the pose alone, and inpainted out with the background prompt;
the result is composited so the plate equals the scene everywhere away from the person. The frame
chain then holds every frame's background to that plate.

Typical use::

    pipe, predictor = build_plate_models(config, chain.parts)
    result = make_plate(
        chain, pipe, predictor, poses.keypoints[0], refined, config, seed=config.seed, adapter=adapter_name
    )
    save_plate_result(result, out / "plate")  # plate.png, scene.png, masks, plate.json
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import cv2
import numpy as np
import torch
from PIL import Image

from engine.batching import denoise_frame
from engine.chain import FrameChain, FrameSettings
from engine.compose import composite, pose_body_mask, soften_mask
from engine.config import BackgroundConfig, RenderConfig
from engine.files import atomic_json
from engine.models.registry import DiffusionComponents
from engine.pose import render_pose_map
from engine.refine import RefinedPrompt
from engine.video import save_png

if TYPE_CHECKING:
    from diffusers import StableDiffusionInpaintPipeline
    from segment_anything import SamPredictor

log = logging.getLogger(__name__)

PERSON_NEGATIVE = (
    "person, people, human, man, woman, body, face, hands, silhouette, shadow of a person"
)
"""Prepended to the negative prompt of the inpainting pass: nothing person-like in the plate."""
PLATE_FEATHER = 0.01
"""Feather width of the plate mask (fraction of the shorter side, at least 1 px)."""
IOU_TIE = 0.02
"""Multimask selection: masks whose pose IoU is within this of the best count as tied."""
MIN_CONFIDENCE = 0.05
"""Joints with a confidence at or below this are ignored by the SAM prompts."""


class SamMaskError(RuntimeError):
    """The SAM mask disagrees with the pose and no fallback is allowed; the message says why."""


class Predictor(Protocol):
    """What :func:`segment_person` needs of a :class:`segment_anything.SamPredictor`."""

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None: ...

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[Any, Any, Any]: ...


@dataclass(frozen=True)
class SamPrompt:
    """SAM prompts in original-image pixels."""

    points: np.ndarray
    """(N, 2) float32 (x, y): the positive points first, then the negative ones."""
    labels: np.ndarray
    """(N,) int32: 1 = person (positive), 0 = background (negative)."""
    box: np.ndarray
    """(4,) float32 (x0, y0, x1, y1), inside [0, width-1] x [0, height-1]."""


class SamSegmentation(NamedTuple):
    """The multimask output :func:`segment_person` chose."""

    mask: np.ndarray
    """(H, W) bool, True = person."""
    score: float
    """SAM's predicted IoU of the chosen mask."""
    chosen: int
    """Which of SAM's three multimask outputs (0, 1, 2) was chosen."""


@dataclass
class PlateResult:
    """A background plate and every intermediate image it was made from."""

    scene: np.ndarray
    """(H, W, 3) uint8: the character in its scene at pose frame 0."""
    plate: np.ndarray
    """(H, W, 3) uint8: the scene with the person inpainted out; equals ``scene`` where
    ``mask`` is 0."""
    inpainted: np.ndarray
    """(H, W, 3) uint8: the raw inpainting output (before compositing)."""
    mask: np.ndarray
    """(H, W) float32 in [0, 1]: the chosen person mask, dilated then feathered outwards."""
    pose_mask: np.ndarray
    """(H, W) bool: the pose body mask (limb capsules, head disc, torso polygon)."""
    sam_mask: np.ndarray | None
    """(H, W) bool: the chosen SAM mask, None when ``mask_source`` is pose."""
    iou: float | None
    """IoU of ``sam_mask`` with ``pose_mask`` (None without SAM)."""
    sam_score: float | None
    sam_index: int | None
    mask_source_used: str
    """``sam``, ``pose`` (requested) or ``pose_fallback`` (SAM mask not trusted)."""
    scene_prompt: str
    scene_negative: str
    """The scene's negative prompt (``config.negative_prompt``, as every frame)."""
    adapter: str | None
    """The appearance LoRA the scene was drawn with, or None."""
    prompt: str
    """The inpainting prompt (the refined background prompt)."""
    negative_prompt: str
    seed: int
    steps: int
    guidance: float


# ---------------------------------------------------------------------------------------------
# Masks and SAM prompts


def _check_keypoints(keypoints: np.ndarray) -> np.ndarray:
    kp = np.asarray(keypoints, dtype=np.float32)
    if kp.shape != (18, 3):
        raise ValueError(
            f"keypoints must be one COCO-18 frame of shape (18, 3) (x_px, y_px, confidence), "
            f"got shape {kp.shape}; pass poses.keypoints[0]"
        )
    if not (kp[:, 2] > MIN_CONFIDENCE).any():
        raise ValueError(
            f"keypoints have no joint with confidence > {MIN_CONFIDENCE}: pose frame 0 shows no "
            "person; trim the pose sequence so it starts on a visible person"
        )
    return kp


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (H, W) masks (nonzero = inside); 0.0 if both are empty."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    union = int(np.count_nonzero(a | b))
    return float(np.count_nonzero(a & b)) / union if union else 0.0


def _clamp_xy(xy: np.ndarray, width: int, height: int) -> np.ndarray:
    out = np.asarray(xy, np.float32).copy()
    out[..., 0] = np.clip(out[..., 0], 0.0, width - 1.0)
    out[..., 1] = np.clip(out[..., 1], 0.0, height - 1.0)
    return out


def _negative_candidates(
    centre: np.ndarray, half: np.ndarray, width: int, height: int, reach: float
) -> np.ndarray:
    """Corners and edge midpoints (inset 2 % of the shorter side) plus 12 points on an ellipse
    ``reach`` px outside the keypoint hull; (M, 2) float32, only those inside the image."""
    inset = max(1.0, 0.02 * min(width, height))
    xs, ys = (inset, width / 2.0, width - 1.0 - inset), (inset, height / 2.0, height - 1.0 - inset)
    border = [(x, y) for x in xs for y in ys if (x, y) != (xs[1], ys[1])]
    angles = np.linspace(0.0, 2.0 * np.pi, 12, endpoint=False)
    ring = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * (half + reach)
    points = np.concatenate([np.asarray(border, np.float32), ring.astype(np.float32)])
    inside = ((points >= 0) & (points <= np.array([width - 1, height - 1]))).all(axis=1)
    return points[inside]


def _spread(points: np.ndarray, min_distance: float) -> np.ndarray:
    """``points`` (M, 2) without those closer than ``min_distance`` to an earlier kept one."""
    kept: list[np.ndarray] = []
    for p in points:
        if all(np.hypot(*(p - q)) >= min_distance for q in kept):
            kept.append(p)
    return np.asarray(kept, np.float32).reshape(-1, 2)


def sam_prompts(
    keypoints: np.ndarray,
    width: int,
    height: int,
    *,
    margin: float = 0.08,
    box_pad: float = 0.15,
) -> SamPrompt:
    """SAM point and box prompts of the person in one pose frame.

    Args:
        keypoints: (18, 3) float (x_px, y_px, confidence); joints with confidence <= 0.05 are
            ignored.
        width, height: image size in pixels.
        margin: how far negative points stay from the body, as a fraction of the shorter side:
            each lies more than ``margin`` outside the pose body mask (i.e. outside the body mask
            dilated by ``margin``) and inside the image.
        box_pad: the box is the confident joints' bounding box grown on every side by this
            fraction of its longer side (head top, hands and feet lie beyond the joints), then
            clamped to the image.

    Returns:
        Positive points on the confident joints (clamped inside the image), negative points from
        the image corners/edge midpoints and a ring around the skeleton (possibly none, when the
        body fills the frame), and the box.
    """
    kp = _check_keypoints(keypoints)
    positives = _clamp_xy(kp[kp[:, 2] > MIN_CONFIDENCE, :2], width, height)
    lo, hi = positives.min(axis=0), positives.max(axis=0)
    pad = box_pad * float(max(hi[0] - lo[0], hi[1] - lo[1], 1.0))
    box = np.concatenate([_clamp_xy(lo - pad, width, height), _clamp_xy(hi + pad, width, height)])

    margin_px = margin * min(width, height)
    body = pose_body_mask(kp, width, height)
    distance = cv2.distanceTransform((1 - body).astype(np.uint8), cv2.DIST_L2, 5)
    candidates = _negative_candidates((lo + hi) / 2, (hi - lo) / 2 + pad, width, height, margin_px)
    rows, cols = np.rint(candidates[:, 1]).astype(int), np.rint(candidates[:, 0]).astype(int)
    negatives = _spread(candidates[distance[rows, cols] > margin_px], 0.05 * min(width, height))

    points = np.concatenate([positives, negatives]).astype(np.float32)
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))]).astype(np.int32)
    return SamPrompt(points=points, labels=labels, box=box.astype(np.float32))


def select_mask(
    masks: np.ndarray, scores: np.ndarray, reference: np.ndarray
) -> tuple[int, np.ndarray]:
    """Choose one of SAM's multimask outputs.

    Rule: the mask with the highest IoU with ``reference`` (the pose body mask) wins; masks whose
    IoU is within :data:`IOU_TIE` (0.02) of the best are tied, and among them SAM's predicted IoU
    score decides (then the lowest index). The pose says *which* object is the person; SAM's own
    confidence picks among near-equal candidates (e.g. person with or without a held object).

    Args:
        masks: (K, H, W) bool. scores: (K,) float, SAM's predicted IoUs. reference: (H, W).

    Returns:
        (chosen index, (K,) float64 IoUs of every mask with ``reference``).
    """
    ious = np.array([mask_iou(m, reference) for m in masks], dtype=np.float64)
    tied = np.flatnonzero(ious >= ious.max() - IOU_TIE)
    best = tied[np.argmax(np.asarray(scores, dtype=np.float64)[tied])]
    return int(best), ious


def segment_person(
    predictor: Predictor,
    image: np.ndarray,
    keypoints: np.ndarray,
    *,
    prompt: SamPrompt | None = None,
) -> SamSegmentation:
    """Segment the person of ``image`` with SAM prompted by the pose.

    Calls ``predictor.set_image(image)`` then ``predictor.predict(points, labels, box,
    multimask_output=True)`` and chooses among the three masks with :func:`select_mask` (best IoU
    with the pose body mask, SAM's score breaking near-ties).

    Args:
        predictor: a :class:`segment_anything.SamPredictor` (or anything with its interface).
        image (np.ndarray): (H, W, 3) uint8 RGB in [0, 255].
        keypoints: (18, 3) float (x_px, y_px, confidence) of the person in ``image``.
        prompt: prompts to use instead of :func:`sam_prompts` ``(keypoints, W, H)``.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(
            f"image must be an (H, W, 3) uint8 RGB array, got "
            f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', type(image).__name__)}"
        )
    height, width = image.shape[:2]
    if prompt is None:
        prompt = sam_prompts(keypoints, width, height)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(
        point_coords=prompt.points,
        point_labels=prompt.labels,
        box=prompt.box,
        multimask_output=True,
    )
    masks, scores = np.asarray(masks).astype(bool), np.asarray(scores, dtype=np.float64)
    if masks.ndim != 3 or masks.shape[1:] != (height, width) or len(scores) != len(masks):
        raise RuntimeError(
            f"SAM returned masks {masks.shape} and scores {scores.shape}; expected (K, {height}, "
            f"{width}) and (K,): is the predictor a segment_anything.SamPredictor?"
        )
    chosen, _ = select_mask(
        masks, scores, pose_body_mask(_check_keypoints(keypoints), width, height)
    )
    return SamSegmentation(mask=masks[chosen], score=float(scores[chosen]), chosen=chosen)


def trusted_mask(
    sam_mask: np.ndarray, pose_mask: np.ndarray, iou: float, config: BackgroundConfig
) -> tuple[np.ndarray, str]:
    """The SAM mask if its pose IoU reaches ``config.sam_min_iou``, else the pose mask.

    Returns:
        ((H, W) bool mask, "sam" or "pose_fallback"). A fallback logs a warning.

    Raises:
        SamMaskError: the IoU is too low and ``config.fallback_to_pose`` is false.
    """
    if iou >= config.sam_min_iou:
        return sam_mask.astype(bool), "sam"
    message = (
        f"the SAM person mask agrees poorly with the pose (IoU {iou:.3f} < "
        f"background.sam_min_iou={config.sam_min_iou})"
    )
    if not config.fallback_to_pose:
        raise SamMaskError(
            f"{message}; set background.fallback_to_pose=true to use the pose mask instead, "
            "lower background.sam_min_iou, or set background.mask_source=pose"
        )
    log.warning("%s: using the pose body mask for the background plate", message)
    return pose_mask.astype(bool), "pose_fallback"


# ---------------------------------------------------------------------------------------------
# The plate


def plate_mask(person: np.ndarray, dilate: float) -> np.ndarray:
    """The inpainting mask of the plate: ``person`` dilated by ``dilate`` x the shorter side,
    then feathered outwards over :data:`PLATE_FEATHER` of it (at least 1 px).

    Args:
        person: (H, W) bool or {0, 1}, the chosen person mask.
        dilate: ``background.mask_dilate``.

    Returns:
        (H, W) float32 in [0, 1]: 1 on the dilated mask, exactly 0 beyond the feather ramp.
    """
    side = min(person.shape[:2])
    return soften_mask(
        (np.asarray(person) > 0).astype(np.uint8),
        dilate_px=round(dilate * side),
        feather_px=max(1, round(PLATE_FEATHER * side)),
    )


def render_scene(
    chain: FrameChain,
    keypoints: np.ndarray,
    refined: RefinedPrompt,
    config: RenderConfig,
    seed: int,
    *,
    adapter: str | None,
) -> np.ndarray:
    """The character in its scene at this pose: frame 0 of a free-background render.

    Denoises frame index 0 with seed ``seed``, the frame prompt (``refined.frame_prompt``), the
    render's negative prompt (``config.negative_prompt``) and the pose map, with the sampler
    settings of ``config`` and the appearance LoRA ``adapter`` (loaded on the chain's UNet;
    None = base model), exactly as the frame chain denoises frame 0.

    Returns:
        (H, W, 3) uint8 RGB at config.width x config.height.
    """
    pose_map = render_pose_map(keypoints, config.width, config.height)
    latent = denoise_frame(
        chain,
        index=0,
        seed=seed,
        pose=chain.image_tensor(pose_map),
        text=scene_text(chain, refined.frame_prompt, config.negative_prompt, adapter),
        settings=FrameSettings.from_config(config),
        adapter=adapter,
    )
    return chain.decode(latent)


def scene_text(chain: FrameChain, prompt: str, negative: str, adapter: str | None) -> torch.Tensor:
    """(2, 77, D) [negative, prompt] embeddings as the frames get them (SDXL: (2, 78, D)): with
    ``adapter``'s text LoRA on each text encoder that has one (``appearance.train_text_encoder``,
    an imported LoRA's ``lora_te1_`` / ``lora_te2_``), else the base encoder. The text encoders'
    adapter states are restored after."""
    from engine.appearance.lora import prompt_adapter

    with prompt_adapter(chain.parts.text_encoders(), adapter):
        return chain.encode_prompt(prompt, negative)


def inpaint(
    pipe: StableDiffusionInpaintPipeline,
    image: np.ndarray,
    mask: np.ndarray,
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    guidance: float,
    seed: int,
) -> np.ndarray:
    """Inpaint ``mask > 0`` of ``image`` with a StableDiffusionInpaintPipeline.

    Args:
        image (np.ndarray): (H, W, 3) uint8 RGB in [0, 255]; H, W multiples of 8.
        mask (np.ndarray): (H, W), nonzero = repaint.
        seed: seeds a CPU generator (same noise on every device).

    Returns:
        (H, W, 3) uint8 RGB: the pipeline's whole output image (not composited).
    """
    height, width = image.shape[:2]
    out = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt,
        image=Image.fromarray(image),
        mask_image=Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)),
        height=height,
        width=width,
        strength=1.0,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]
    if out.shape != (height, width, 3):
        raise RuntimeError(
            f"the inpainting pipeline returned {out.shape}, expected ({height}, {width}, 3)"
        )
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def make_plate(
    chain: FrameChain,
    inpaint_pipe: StableDiffusionInpaintPipeline,
    sam_predictor: Predictor | None,
    keypoints0: np.ndarray,
    refined: RefinedPrompt,
    config: RenderConfig,
    *,
    seed: int,
    adapter: str | None,
) -> PlateResult:
    """One clean background plate for a character (see the module docstring).

    Args:
        chain: the frame chain (its UNet has the character's LoRA loaded, if it has one).
        inpaint_pipe: a StableDiffusionInpaintPipeline (:mod:`engine.models.inpaint`).
        sam_predictor: a SamPredictor; may be None when ``background.mask_source`` is pose.
        keypoints0: (18, 3) float keypoints of pose frame 0 at config.width x config.height.
        refined: the character's refined prompts (frame, background, negative).
        config: the render config (size, sampler, background section).
        seed: seeds the scene (as frame 0 of a render seeded ``seed``) and the inpainting noise.
        adapter: name of the character's appearance LoRA on the chain's UNet (None = base model);
            the scene is drawn with it, as the frames are.

    Raises:
        ValueError: bad keypoints, or mask_source sam without a predictor.
        SamMaskError: untrusted SAM mask with ``background.fallback_to_pose`` false.
    """
    bg = config.background
    kp = _check_keypoints(keypoints0)
    if bg.mask_source == "sam" and sam_predictor is None:
        raise ValueError(
            "background.mask_source=sam needs a SAM predictor: build one with "
            "engine.models.sam.build_sam_predictor(config.model), or set background.mask_source=pose"
        )
    width, height = config.width, config.height
    scene = render_scene(chain, kp, refined, config, seed, adapter=adapter)
    pose_mask = pose_body_mask(kp, width, height).astype(bool)
    sam: SamSegmentation | None = None
    iou: float | None = None
    chosen, source = pose_mask, "pose"
    if bg.mask_source == "sam" and sam_predictor is not None:
        sam = segment_person(sam_predictor, scene, kp)
        iou = mask_iou(sam.mask, pose_mask)
        chosen, source = trusted_mask(sam.mask, pose_mask, iou, bg)
    mask = plate_mask(chosen, bg.mask_dilate)
    negative = ", ".join(p for p in (PERSON_NEGATIVE, refined.negative.strip()) if p)
    prompt = refined.background_prompt
    steps, guidance = bg.inpaint_steps, bg.inpaint_guidance
    inpainted = inpaint(
        inpaint_pipe, scene, mask, prompt=prompt, negative_prompt=negative,
        steps=steps, guidance=guidance, seed=seed,
    )  # fmt: skip
    return PlateResult(
        scene=scene, plate=composite(inpainted, scene, mask), inpainted=inpainted, mask=mask,
        pose_mask=pose_mask, sam_mask=None if sam is None else sam.mask, iou=iou,
        sam_score=None if sam is None else sam.score, sam_index=None if sam is None else sam.chosen,
        mask_source_used=source, scene_prompt=refined.frame_prompt,
        scene_negative=config.negative_prompt, adapter=adapter, prompt=prompt,
        negative_prompt=negative, seed=seed, steps=steps, guidance=guidance,
    )  # fmt: skip


def build_plate_models(
    config: RenderConfig, parts: DiffusionComponents
) -> tuple[StableDiffusionInpaintPipeline, SamPredictor | None]:
    """(inpainting pipeline sharing ``parts``' VAE/text encoder, SamPredictor or None).

    The predictor is built only when ``background.mask_source`` is sam.
    """
    from engine.models.inpaint import make_inpaint_pipeline
    from engine.models.sam import build_sam_predictor

    pipe = make_inpaint_pipeline(config.model, parts)
    predictor = (
        build_sam_predictor(config.model) if config.background.mask_source == "sam" else None
    )
    return pipe, predictor


def plate_record(result: PlateResult) -> dict[str, Any]:
    """The JSON-serialisable description of a plate (what plate.json holds)."""
    height, width = result.scene.shape[:2]
    return {
        "iou": result.iou,
        "mask_source_used": result.mask_source_used,
        "sam_score": result.sam_score,
        "sam_index": result.sam_index,
        "mask_area": float((result.mask > 0).mean()),
        "prompts": {
            "scene": result.scene_prompt,
            "scene_negative": result.scene_negative,
            "background": result.prompt,
            "negative": result.negative_prompt,
        },
        "seed": result.seed,
        "adapter": result.adapter,
        "inpaint_steps": result.steps,
        "inpaint_guidance": result.guidance,
        "width": width,
        "height": height,
    }


def save_plate_result(result: PlateResult, out_dir: Path) -> dict[str, Path]:
    """Write the plate and its intermediates into ``out_dir``, every file atomically.

    Files: plate.png, scene.png, inpainted.png, plate_mask.png (feathered mask, 255 = person),
    pose_mask.png, sam_mask.png (only with a SAM mask; a stale one is removed) and plate.json.
    Returns {name: path} of the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, np.ndarray | None] = {
        "plate": result.plate,
        "scene": result.scene,
        "inpainted": result.inpainted,
        "plate_mask": np.rint(result.mask * 255.0).astype(np.uint8),
        "pose_mask": result.pose_mask.astype(np.uint8) * 255,
        "sam_mask": None if result.sam_mask is None else result.sam_mask.astype(np.uint8) * 255,
    }
    written: dict[str, Path] = {}
    for name, image in images.items():
        path = out / f"{name}.png"
        if image is None:
            path.unlink(missing_ok=True)
            continue
        save_png(image, path)
        written[name] = path
    written["json"] = atomic_json(out / "plate.json", plate_record(result))
    return written
