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
The denoising loop itself is :class:`engine.batching.BatchDenoiser` (one frame, or frames of many
characters in one batch); this module holds the resident components and the conditioning.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.configuration_utils import FrozenDict

from engine.attention import (
    Backend,
    CrossFrameContext,
    install_attention_backend,
    install_cross_frame_attention,
)
from engine.config import RenderConfig
from engine.models.components import DiffusionComponents, encode_ids, tokenize


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
    scheduler: str = "ddim"
    """``ddim`` or ``dpmpp_2m`` (``sampler.scheduler``)."""
    deep_cache: int = 0
    """``sampler.deep_cache``: a whole-UNet step every N steps (0 or 1 = every step)."""

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
            scheduler=config.sampler.scheduler,
            deep_cache=config.sampler.deep_cache,
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

    def __init__(self, components: DiffusionComponents, attention: Backend = "sdpa"):
        self.parts = components
        self.context = CrossFrameContext()
        install_cross_frame_attention(components.unet, self.context, attention)
        install_attention_backend(components.controlnet, attention)
        config = fix_legacy_scheduler_config(components.scheduler)
        self.scheduler = DDIMScheduler.from_config(config)
        """DDIM: stateless per step, shared by every frame; also the noiser of every schedule
        (``add_noise`` from the same ᾱ_t as every solver here)."""
        self._solvers: dict[tuple[str, int], Any] = {}
        self._solver_config = config

    def solver(self, kind: str, steps: int) -> Any:
        """The scheduler stepping one frame of ``steps`` steps: the shared DDIM for ``ddim``;
        for ``dpmpp_2m`` a fresh DPM-Solver++ 2M (a multistep solver keeps the previous model
        outputs and its step index: one instance per frame), timesteps set."""
        if kind == "ddim":
            return self.scheduler
        if kind != "dpmpp_2m":
            raise ValueError(f"sampler.scheduler={kind!r}: use ddim or dpmpp_2m")
        template = self._solvers.get((kind, steps))
        if template is None:
            template = DPMSolverMultistepScheduler.from_config(
                self._solver_config, algorithm_type="dpmsolver++", solver_order=2
            )
            template.set_timesteps(steps, device=self.device)
            self._solvers[(kind, steps)] = template
        return copy.deepcopy(template)

    @property
    def device(self) -> torch.device:
        return self.parts.device

    # -- conditioning ------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative: str) -> torch.Tensor:
        """(2, 77, D) text embeddings: row 0 the negative (unconditional), row 1 the prompt
        (SDXL: (2, 78, D), the pooled embedding packed as the last row, engine/models/components)."""
        ids = tokenize(self.parts, [negative, prompt])
        return encode_ids(self.parts, ids).to(self.parts.dtype)

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
        return self.decode_batch([latent])[0]

    @torch.no_grad()
    def decode_batch(
        self, latents: list[torch.Tensor], rows: int | None = None
    ) -> list[np.ndarray]:
        """(1, 4, h, w) VAE-scaled latents of one size → (H, W, 3) uint8 RGB each, in one VAE
        call padded with zero latents to ``rows`` (None = no padding).

        A frame's pixels do not depend on the other rows' content, but a VAE batch of another
        size may round differently (convolution blockings per shape): measured on tiny/small,
        frames decoded 4-8 at a time vs alone differ by at most 1 grey level on < 0.01 % of the
        pixels. Padding to a fixed row count (the batch padding policy) keeps them bitwise.
        """
        x = torch.cat(latents) / self.parts.vae.config.scaling_factor
        if rows is not None and rows > len(latents):
            x = torch.cat([x, x.new_zeros((rows - len(latents), *x.shape[1:]))])
        images = ((self.parts.vae.decode(x).sample.float().clamp(-1, 1) + 1.0) * 127.5).round()
        images = images[: len(latents)].permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
        return list(images)

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


def fix_legacy_scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A scheduler config with the fixes diffusers' SD pipelines apply to old SD-1.x checkpoints.

    ``steps_offset`` != 1 becomes 1 and ``clip_sample: true`` becomes false, each with the
    FutureWarning ``StableDiffusionPipeline.__init__`` gives (same text, same order), so a
    hand-written loop over such a checkpoint samples the timesteps and x0 that diffusers'
    pipelines do.

    Args:
        scheduler: a diffusers scheduler; it is not modified (the fixes go to a shallow copy).

    Returns:
        The fixed config as a new dict.
    """
    sched = copy.copy(scheduler)
    if getattr(sched.config, "steps_offset", 1) != 1:
        warnings.warn(
            f"The configuration file of this scheduler: {sched} is outdated. `steps_offset`"
            f" should be set to 1 instead of {sched.config.steps_offset}. Please make sure "
            "to update the config accordingly as leaving `steps_offset` might led to incorrect "
            "results in future versions. If you have downloaded this checkpoint from the Hugging "
            "Face Hub, it would be very nice if you could open a Pull request for the "
            "`scheduler/scheduler_config.json` file",
            FutureWarning,
            stacklevel=2,
        )
        sched._internal_dict = FrozenDict({**sched.config, "steps_offset": 1})
    if getattr(sched.config, "clip_sample", False) is True:
        warnings.warn(
            f"The configuration file of this scheduler: {sched} has not set the configuration "
            "`clip_sample`. `clip_sample` should be set to False in the configuration file. Please "
            "make sure to update the config accordingly as not setting `clip_sample` in the config "
            "might lead to incorrect results in future versions. If you have downloaded this "
            "checkpoint from the Hugging Face Hub, it would be very nice if you could open a Pull "
            "request for the `scheduler/scheduler_config.json` file",
            FutureWarning,
            stacklevel=2,
        )
        sched._internal_dict = FrozenDict({**sched.config, "clip_sample": False})
    return dict(sched.config)


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
