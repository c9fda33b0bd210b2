"""One character's frame chain inputs: turns (frame index, finished references) into FrameJobs.

Shared by the in-process render (:mod:`engine.render`) and the cluster Sampler actor, so both
denoise exactly the same jobs. Holds only per-render constants (prompt embeddings, plate latent);
the chain state proper is the two reference latents the caller passes in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from engine.batching import FrameJob
from engine.chain import Background, FrameChain, FrameSettings, Reference
from engine.compose import composite, latent_mask, load_mask, person_mask, soften_mask
from engine.config import ConfigError, RenderConfig
from engine.pose import render_pose_map


class CharacterChain:
    """Per-render conditioning of the frame chain.

    Args:
        chain: Resident components.
        config: The render's config (size, seed, sampler, alignment, chain sections).
        keypoints: (F, 18, 3) float32 poses at the render size.
        prompt, negative: Frame prompt and negative prompt.
        plate: (H, W, 3) uint8 background plate, or None for a free background.
        adapter: Appearance LoRA name loaded on the chain's UNet, or None.
    """

    def __init__(
        self,
        chain: FrameChain,
        config: RenderConfig,
        keypoints: np.ndarray,
        *,
        prompt: str,
        negative: str,
        plate: np.ndarray | None = None,
        adapter: str | None = None,
    ):
        self.chain = chain
        self.config = config
        self.keypoints = keypoints
        self.settings = FrameSettings.from_config(config)
        self.text = chain.encode_prompt(prompt, negative)
        self.plate = plate
        self.plate_latent = chain.encode_image(plate) if plate is not None else None
        self.adapter = adapter
        self.mask_files = _mask_files(config, len(keypoints)) if plate is not None else None
        self._memo: dict[tuple[str, int], np.ndarray] = {}

    def _cached(self, kind: str, index: int, make: Callable[[], np.ndarray]) -> np.ndarray:
        """A per-frame image, computed once: a frame's pose map and mask are needed by its job,
        its finish, its outputs and (pose map) as a reference of the next frame."""
        key = (kind, index)
        if key not in self._memo:
            if len(self._memo) >= 8:  # bounded: a chain needs the last few frames only
                del self._memo[next(iter(self._memo))]
            self._memo[key] = make()
        return self._memo[key]

    @property
    def frames(self) -> int:
        return len(self.keypoints)

    def pose_map(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 OpenPose map of frame ``index``."""
        c = self.config
        return self._cached(
            "pose", index, lambda: render_pose_map(self.keypoints[index], c.width, c.height)
        )

    def mask(self, index: int) -> np.ndarray | None:
        """Soft person mask (H, W) float32 in [0, 1] of frame ``index``; None without a plate."""
        if self.plate is None:
            return None
        return self._cached("mask", index, lambda: self._make_mask(index))

    def _make_mask(self, index: int) -> np.ndarray:
        c = self.config
        side = min(c.width, c.height)
        if self.mask_files is not None:
            return soften_mask(
                load_mask(self.mask_files[index], c.width, c.height),
                dilate_px=round(c.chain.mask_dilate * side),
                feather_px=round(c.chain.mask_feather * side),
            )
        return person_mask(
            self.keypoints[index],
            c.width,
            c.height,
            dilate=c.chain.mask_dilate,
            feather=c.chain.mask_feather,
        )

    def reference(self, index: int, latent: torch.Tensor) -> Reference:
        """A finished frame as a reference for later frames."""
        latent = latent.to(self.chain.device, self.chain.parts.dtype)
        return Reference(index, latent, self.chain.image_tensor(self.pose_map(index)))

    def job(
        self, index: int, previous: torch.Tensor | None, anchor: torch.Tensor | None
    ) -> FrameJob:
        """The FrameJob of frame ``index`` given the clean latents of frames t-1 and 0."""
        background = None
        mask = self.mask(index)
        if mask is not None and self.plate_latent is not None:
            lat = latent_mask(mask, self.chain.parts.vae_scale)
            background = Background(
                self.plate_latent, lat.to(self.chain.device, self.chain.parts.dtype)
            )
        return FrameJob(
            index=index,
            seed=self.config.seed,
            pose=self.chain.image_tensor(self.pose_map(index)),
            text=self.text,
            settings=self.settings,
            previous=self.reference(index - 1, previous) if previous is not None else None,
            anchor=self.reference(0, anchor) if anchor is not None else None,
            background=background,
            adapter=self.adapter,
        )

    def finish(self, index: int, latent: torch.Tensor) -> np.ndarray:
        """Decode frame ``index`` and composite it over the plate → (H, W, 3) uint8."""
        frame = self.chain.decode(latent)
        mask = self.mask(index)
        if self.plate is not None and mask is not None:
            frame = composite(frame, self.plate, mask)
        return frame


def _mask_files(config: RenderConfig, frames: int) -> list[Path] | None:
    """The supplied per-frame mask images (``config.masks``), listed and checked once."""
    if config.masks is None:
        return None
    files = sorted(p for p in Path(config.masks).iterdir() if p.suffix.lower() in (".png", ".jpg"))
    if len(files) < frames:
        raise ConfigError(f"masks: {config.masks} has {len(files)} images for {frames} frames")
    return files
