"""The autoregressive frame chain: one ControlNet-guided denoise per frame (inter-frame alignment).

Frame t is denoised from its own seeded noise, conditioned on its pose map and the prompt, with
classifier-free guidance, and guided by the finished frame t-1 and anchor frame 0:

- ``kv``: the self-attention of frame t also attends to the keys/values of frames t-1 and 0. Those
  frames' clean latents are re-noised to the current timestep with their own initial noise and run
  in the same batch (with their own pose maps), so the only state a chain carries between frames
  is two latents: memory stays constant however long the chain is, and a resumed chain needs only
  the persisted latents of frames 0 and t-1.
- ``latent``: frame t starts from frame t-1's latent noised to ``chain.latent_strength`` of the
  schedule (img2img) instead of pure noise.
- ``none``: independent frames (the ablation).

Per-frame seeds derive from (render seed, frame index), so any frame can be recomputed alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler

from engine.attention import CrossFrameContext, install_cross_frame_attention
from engine.config import RenderConfig
from engine.models.registry import DiffusionComponents


def frame_seed(seed: int, index: int) -> int:
    """The seed of frame ``index`` of a render seeded ``seed`` (stable across runs and machines)."""
    digest = hashlib.sha256(f"dancing-avatar:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class FrameSettings:
    """Sampling settings shared by every frame of one render."""

    steps: int
    guidance: float
    controlnet_scale: float
    eta: float
    inter_frame: str
    kv_previous: bool
    kv_anchor: bool
    kv_include_self: bool
    latent_strength: float
    blend_until: float

    @classmethod
    def from_config(cls, config: RenderConfig) -> FrameSettings:
        return cls(
            steps=config.sampler.steps,
            guidance=config.sampler.guidance,
            controlnet_scale=config.sampler.controlnet_scale,
            eta=config.sampler.eta,
            inter_frame=config.alignment.inter_frame,
            kv_previous=config.chain.kv_previous,
            kv_anchor=config.chain.kv_anchor,
            kv_include_self=config.chain.kv_include_self,
            latent_strength=config.chain.latent_strength,
            blend_until=config.chain.blend_until,
        )


@dataclass
class Reference:
    """A finished frame that later frames are guided by."""

    index: int
    latent: torch.Tensor
    """(1, 4, h, w) clean latent (VAE-scaled), on the chain's device."""
    pose: torch.Tensor
    """(1, 3, H, W) pose map in [0, 1], on the chain's device."""


@dataclass
class Background:
    """The plate the background is held to, and this frame's person mask at latent size."""

    latent: torch.Tensor
    """(1, 4, h, w) VAE-scaled latent of the plate."""
    mask: torch.Tensor
    """(1, 1, h, w) float in [0, 1], 1 = person (denoised freely), 0 = plate."""


class FrameChain:
    """Denoises frames with resident components; holds no per-render state between calls."""

    def __init__(self, components: DiffusionComponents, attention: str = "sdpa"):
        self.parts = components
        self.context = CrossFrameContext()
        install_cross_frame_attention(components.unet, self.context, attention)  # type: ignore[arg-type]
        self.scheduler = DDIMScheduler.from_config(components.scheduler.config)

    @property
    def device(self) -> torch.device:
        return self.parts.device

    # -- conditioning ------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative: str) -> torch.Tensor:
        """(2, 77, D) text embeddings: row 0 the negative (unconditional), row 1 the prompt."""
        tok = self.parts.tokenizer
        ids = tok(
            [negative, prompt],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.parts.text_encoder(ids)[0].to(self.parts.dtype)

    def image_tensor(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB → (1, 3, H, W) float in [0, 1] on the chain's device and dtype."""
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        return t.to(self.device, self.parts.dtype) / 255.0

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB → (1, 4, H/8, W/8) VAE-scaled latent (posterior mode: deterministic)."""
        x = self.image_tensor(image) * 2.0 - 1.0
        posterior = self.parts.vae.encode(x).latent_dist
        return posterior.mode() * self.parts.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """(1, 4, h, w) VAE-scaled latent → (H, W, 3) uint8 RGB."""
        image = self.parts.vae.decode(latent / self.parts.vae.config.scaling_factor).sample
        image = ((image[0].float().clamp(-1, 1) + 1.0) * 127.5).round()
        return image.permute(1, 2, 0).to(torch.uint8).cpu().numpy()

    def initial_noise(self, seed: int, index: int, height: int, width: int) -> torch.Tensor:
        """(1, 4, h, w) standard normal noise of frame ``index`` (CPU generator: reproducible)."""
        f = self.parts.vae_scale
        generator = torch.Generator().manual_seed(frame_seed(seed, index))
        noise = torch.randn((1, 4, height // f, width // f), generator=generator)
        return noise.to(self.device, self.parts.dtype)

    # -- one frame ---------------------------------------------------------------------------

    def references(
        self, settings: FrameSettings, previous: Reference | None, anchor: Reference | None
    ) -> list[Reference]:
        """The frames whose keys/values frame t attends to under ``kv`` (none for frame 0)."""
        if "kv" not in settings.inter_frame:
            return []
        refs = [anchor] if settings.kv_anchor and anchor is not None else []
        duplicate = bool(refs) and previous is not None and previous.index == refs[0].index
        if settings.kv_previous and previous is not None and not duplicate:
            refs.append(previous)
        return refs

    @torch.no_grad()
    def denoise(
        self,
        *,
        index: int,
        seed: int,
        pose: torch.Tensor,
        text: torch.Tensor,
        settings: FrameSettings,
        previous: Reference | None = None,
        anchor: Reference | None = None,
        background: Background | None = None,
    ) -> torch.Tensor:
        """Denoise frame ``index`` → its (1, 4, h, w) clean latent.

        Args:
            pose: (1, 3, H, W) pose map in [0, 1]. text: (2, 77, D) from :meth:`encode_prompt`.
            previous, anchor: finished frames t-1 and 0 (None for frame 0).
            background: plate latent + latent person mask, or None for a free background.
        """
        # 1. Noise and timesteps (the latent mechanism starts later in the schedule).
        _, _, height, width = pose.shape
        noise = self.initial_noise(seed, index, height, width)
        generator = torch.Generator().manual_seed(frame_seed(seed, index) ^ 0x5EED)
        sched = self.scheduler
        sched.set_timesteps(settings.steps, device=self.device)
        timesteps = sched.timesteps
        start = 0
        latents = noise * sched.init_noise_sigma
        if "latent" in settings.inter_frame and previous is not None:
            start = min(
                settings.steps - round(settings.steps * settings.latent_strength),
                settings.steps - 1,
            )
            latents = sched.add_noise(previous.latent, noise, timesteps[start : start + 1])

        # 2. Batch rows: [uncond, cond] of this frame, then one cond row per reference frame.
        refs = self.references(settings, previous, anchor)
        ref_noise = [self.initial_noise(seed, r.index, height, width) for r in refs]
        n_cur = 2 if settings.guidance > 1.0 else 1
        text_rows = torch.cat([text[2 - n_cur :]] + [text[1:2]] * len(refs))
        pose_rows = torch.cat([pose] * n_cur + [r.pose for r in refs])
        self.context.ref_index = _reference_index(n_cur, len(refs), self.device)
        self.context.include_self = settings.kv_include_self
        blend_steps = round(settings.blend_until * (settings.steps - start))

        # 3. Denoise.
        try:
            for i, t in enumerate(timesteps[start:]):
                ref_latents = [
                    sched.add_noise(r.latent, n, t[None])
                    for r, n in zip(refs, ref_noise, strict=True)
                ]
                batch = sched.scale_model_input(torch.cat([latents] * n_cur + ref_latents), t)
                down, mid = self.parts.controlnet(
                    batch,
                    t,
                    encoder_hidden_states=text_rows,
                    controlnet_cond=pose_rows,
                    conditioning_scale=settings.controlnet_scale,
                    return_dict=False,
                )
                eps = self.parts.unet(
                    batch,
                    t,
                    encoder_hidden_states=text_rows,
                    down_block_additional_residuals=down,
                    mid_block_additional_residual=mid,
                    return_dict=False,
                )[0][:n_cur]
                if n_cur == 2:
                    eps = eps[:1] + settings.guidance * (eps[1:] - eps[:1])
                latents = sched.step(
                    eps, t, latents, eta=settings.eta, generator=generator
                ).prev_sample
                if background is not None and i < blend_steps:
                    nxt = timesteps[start + i + 1 :][:1]
                    latents = blend_background(latents, background, noise, sched, nxt)
        finally:
            self.context.ref_index = None
        return latents


def _reference_index(n_cur: int, n_refs: int, device: torch.device) -> torch.Tensor | None:
    """(B, R) rows each row attends to: current-frame rows → the reference rows; reference rows
    → themselves (plain self-attention). None when there are no references."""
    if n_refs == 0:
        return None
    rows = n_cur + n_refs
    index = torch.arange(rows, device=device)[:, None].expand(rows, n_refs).clone()
    index[:n_cur] = torch.arange(n_cur, rows, device=device)
    return index


def blend_background(
    latents: torch.Tensor,
    background: Background,
    noise: torch.Tensor,
    scheduler: DDIMScheduler,
    next_timestep: torch.Tensor,
) -> torch.Tensor:
    """Blended latent diffusion: keep ``latents`` inside the person mask and the plate latent,
    noised to the next timestep (clean after the last step), outside it."""
    if len(next_timestep):
        plate = scheduler.add_noise(background.latent, noise, next_timestep)
    else:
        plate = background.latent
    m = background.mask
    return m * latents + (1.0 - m) * plate
