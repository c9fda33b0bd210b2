"""Reference images of a character, synthesized with the base model on the canonical poses.

Reference ``i`` is the ControlNet-guided denoise of canonical view ``i mod 4`` (front,
three-quarter, upper body, face; odd cycles mirrored) with the full-body prompt (body views) or
the face close-up prompt (face view) of :meth:`RefinedPrompt.appearance_prompts`, seeded with
``frame_seed(appearance.seed, i)``. Any loaded LoRA is disabled while they are rendered, so the
references always come from the base model. Prior-preservation class images are the same
renders with the identifier removed from the prompts and other seeds. The K renders run as one
batch (:data:`REFERENCE_BATCH` at a time).
"""

from __future__ import annotations

import re

import numpy as np
from tqdm import tqdm

from engine.appearance.lora import base_model
from engine.appearance.poses import reference_pose, reference_views
from engine.batching import BatchDenoiser, FrameJob
from engine.chain import FrameChain, FrameSettings
from engine.config import AppearanceConfig, SamplerConfig
from engine.pose import render_pose_map
from engine.refine import RefinedPrompt

REFERENCE_BATCH = 8
"""References denoised (and decoded) together in one batch: the K renders share every UNet pass
(2 rows each with guidance). Batched vs one at a time they agree within the batching tolerance
(engine/batching.py); tests/test_sampling.py states it."""
PRIOR_INDEX_OFFSET = 1 << 20
"""Class image ``i`` is seeded as frame ``PRIOR_INDEX_OFFSET + i`` (disjoint from references)."""


def class_prompt(prompt: str, identifier: str) -> str:
    """``prompt`` without the identifier token ("a photo of sks person, …" → "a photo of person,
    …"): the DreamBooth class prompt of prior preservation."""
    stripped = re.sub(rf"(?<!\S){re.escape(identifier)}(?![^\s,.;:!?])", " ", prompt)
    return re.sub(r"\s+", " ", stripped).strip()


def reference_prompts(
    refined: RefinedPrompt, config: AppearanceConfig, *, prior: bool = False
) -> list[str]:
    """The prompt of each of the K references (``prior``: the identifier-free class prompts)."""
    full_body, face = refined.appearance_prompts()
    prompts = [
        face if view == "face" else full_body for view, _ in reference_views(config.references)
    ]
    return [class_prompt(p, refined.identifier) for p in prompts] if prior else prompts


def reference_settings(sampler: SamplerConfig | None = None) -> FrameSettings:
    """Frame settings of the reference renders: the sampler's, independent frames (``none``)."""
    s = sampler or SamplerConfig()
    return FrameSettings(
        steps=s.steps,
        guidance=s.guidance,
        controlnet_scale=s.controlnet_scale,
        eta=s.eta,
        inter_frame="none",
        kv_previous=False,
        kv_anchor=False,
        kv_include_self=True,
        latent_strength=1.0,
        blend_until=0.0,
        scheduler=s.scheduler,
    )


def reference_pose_maps(config: AppearanceConfig) -> list[np.ndarray]:
    """The K pose maps, (R, R, 3) uint8 RGB with R = ``config.resolution``."""
    side = config.resolution
    return [
        render_pose_map(reference_pose(view, mirrored, side), side, side)
        for view, mirrored in reference_views(config.references)
    ]


def synthesize_references(
    chain: FrameChain,
    refined: RefinedPrompt,
    config: AppearanceConfig,
    *,
    negative: str,
    sampler: SamplerConfig | None = None,
    prior: bool = False,
    progress: bool = False,
) -> list[np.ndarray]:
    """Render the K reference images of the character with the base model (LoRA off).

    Args:
        chain: The resident frame chain (its UNet's adapters are disabled meanwhile, then
            restored).
        refined: The character's refined prompt (identifier, clothes, face).
        config: ``references`` (K), ``resolution`` (R), ``seed``.
        negative: Negative prompt of classifier-free guidance.
        sampler: Steps, guidance, ControlNet scale and eta (default :class:`SamplerConfig`).
        prior: Render prior-preservation class images instead (identifier-free prompts, seeds
            offset by :data:`PRIOR_INDEX_OFFSET`).
        progress: Show a tqdm bar.

    Returns:
        K images, (R, R, 3) uint8 RGB.
    """
    settings = reference_settings(sampler)
    prompts = reference_prompts(refined, config, prior=prior)
    offset = PRIOR_INDEX_OFFSET if prior else 0
    images: list[np.ndarray] = []
    desc = "class images" if prior else "references"
    with base_model(chain.parts.unet, *chain.parts.text_encoders()):
        texts = {text: chain.encode_prompt(text, negative) for text in dict.fromkeys(prompts)}
        jobs = [
            FrameJob(offset + i, config.seed, chain.image_tensor(pose_map), texts[prompt], settings)
            for i, (prompt, pose_map) in enumerate(
                zip(prompts, reference_pose_maps(config), strict=True)
            )
        ]
        denoiser = BatchDenoiser(chain)
        chunks = range(0, len(jobs), REFERENCE_BATCH)
        for start in tqdm(chunks, disable=not progress, desc=desc):
            latents = denoiser.denoise(jobs[start : start + REFERENCE_BATCH])
            images += chain.decode_batch(latents)
    return images
