"""One character's frame chain inputs: turns (frame index, finished references) into FrameJobs.

Shared by the in-process render (:mod:`engine.render`) and the cluster Sampler actor, so both
denoise exactly the same jobs. Holds only per-render constants (prompt embeddings, plate latent);
the chain state proper is the two reference latents the caller passes in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.batching import FrameJob
from engine.chain import Background, FrameChain, FrameSettings, Reference
from engine.compose import composite, latent_mask, load_mask, person_mask, soften_mask
from engine.config import ConfigError, RenderConfig
from engine.pose import PoseSequence, load_poses, render_pose_map
from engine.pose.video import natural_key

MASK_EXTS = (".png", ".jpg", ".jpeg")
"""Image types read from a ``masks:`` folder."""


@dataclass(frozen=True)
class SuppliedMasks:
    """The supplied person masks (``masks:``) lined up with the render's frames."""

    files: tuple[Path, ...]
    """One mask image per *render* frame (after fps resampling), in frame order."""
    source_size: tuple[int, int]
    """(width, height) of the pose frame the masks were drawn on (the poses' source frame)."""
    packed: np.ndarray | None = None
    """The masks read already, at the render size: (F, ceil(H*W/8)) uint8, ``np.packbits`` of
    each (H, W) {0, 1} mask (a worker then reads no file; :meth:`load` unpacks one)."""

    @property
    def count(self) -> int:
        return len(self.packed) if self.packed is not None else len(self.files)

    def load(self, index: int, width: int, height: int) -> np.ndarray:
        """Mask of render frame ``index`` as (height, width) uint8 {0, 1}."""
        if self.packed is not None:
            bits = np.unpackbits(self.packed[index], count=width * height)
            return bits.reshape(height, width)
        return load_mask(self.files[index], width, height, source_size=self.source_size)

    def read(self, width: int, height: int) -> SuppliedMasks:
        """These masks with every file read now (one packed array; no paths travel on)."""
        packed = np.stack(
            [np.packbits(self.load(i, width, height).reshape(-1)) for i in range(self.count)]
        )
        return SuppliedMasks((), self.source_size, packed)


class CharacterChain:
    """Per-render conditioning of the frame chain.

    Args:
        chain: Resident components.
        config: The render's config (size, seed, sampler, alignment, chain sections).
        keypoints: (F, 18, 3) float32 poses at the render size.
        prompt, negative: Frame prompt and negative prompt.
        plate: (H, W, 3) uint8 background plate, or None for a free background.
        adapter: Appearance LoRA name loaded on the chain's UNet, or None.
        masks: The supplied masks lined up with ``keypoints`` (:func:`supplied_masks`); None
            with ``config.masks`` set and a plate: read here from the pose source
            (``config.poses``, loaded once more for its fps, frame count and size).
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
        masks: SuppliedMasks | None = None,
    ):
        self.chain = chain
        self.config = config
        self.keypoints = keypoints
        self.settings = FrameSettings.from_config(config)
        self.text = chain.encode_prompt(prompt, negative)
        self.plate = plate
        self.plate_latent = chain.encode_image(plate) if plate is not None else None
        self.adapter = adapter
        self.masks = masks
        if masks is None and plate is not None and config.masks is not None:
            if config.poses is None:
                raise ConfigError("masks: need the spec's poses to line them up; add poses:")
            source = load_poses(config.poses, max_frames=config.limits.max_frames)
            self.masks = supplied_masks(config, source)
        if self.masks is not None and self.masks.count != len(keypoints):
            raise ConfigError(
                f"masks: {config.masks} gives {self.masks.count} masks after resampling to "
                f"the render's fps for {len(keypoints)} frames; give one mask per pose frame"
            )
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
        if self.masks is not None:
            binary = self.masks.load(index, c.width, c.height)
            return soften_mask(
                binary,
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

    def finish(
        self, index: int, latent: torch.Tensor, frame: np.ndarray | None = None
    ) -> np.ndarray:
        """Decode frame ``index`` (unless ``frame``, its decoded pixels, is given: a batch is
        decoded in one VAE call, :func:`engine.batching.decode_frames`) and composite it over
        the plate → (H, W, 3) uint8."""
        if frame is None:
            frame = self.chain.decode(latent)
        mask = self.mask(index)
        if self.plate is not None and mask is not None:
            frame = composite(frame, self.plate, mask)
        return frame


def source_frame_index(frames: int, fps_in: float, fps_out: float) -> np.ndarray:
    """For each frame of a sequence resampled from ``fps_in`` to ``fps_out``, its source frame.

    Mirrors :func:`engine.pose.resample`: output frame ``i`` sits at source position
    ``p = i * fps_in / fps_out`` (clamped to the last frame), ``max(1, round(F * fps_out /
    fps_in))`` frames; a joint not interpolated takes frame ``floor(p)`` when ``p - floor(p) <
    0.5``, else the next one. Masks take that same nearest frame.

    Returns:
        (F_out,) int64 indices into the source frames.
    """
    if fps_out == fps_in:
        return np.arange(frames, dtype=np.int64)
    n_out = max(1, round(frames * fps_out / fps_in))
    pos = np.minimum(np.arange(n_out, dtype=np.float64) * (fps_in / fps_out), frames - 1)
    i0 = np.floor(pos).astype(np.int64)
    return np.where(pos - i0 < 0.5, i0, np.minimum(i0 + 1, frames - 1))


def list_masks(folder: Path) -> list[Path]:
    """The mask images of ``folder`` in natural order (``mask_2`` before ``mask_10``)."""
    if not folder.is_dir():
        raise ConfigError(f"masks: {folder} is not a folder; give a folder of per-frame masks")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MASK_EXTS]
    return sorted(files, key=lambda p: natural_key(p.name))


def supplied_masks(config: RenderConfig, source: PoseSequence) -> SuppliedMasks:
    """Line the masks of ``config.masks`` up with the render's frames.

    One mask per frame of the pose *source* (``source``: the sequence as loaded, before
    resampling), in natural file order; resampled to the render's fps with the poses' own rule
    (:func:`source_frame_index`); letterboxed later like the poses (:func:`load_mask`).

    Raises:
        ConfigError: no folder, or a mask count other than the source's frame count.
    """
    assert config.masks is not None
    folder = Path(config.masks)
    files = list_masks(folder)
    if len(files) != source.num_frames:
        first = f" ({files[0].name} … {files[-1].name})" if files else ""
        raise ConfigError(
            f"masks: {folder} has {len(files)} mask images{first} for the {source.num_frames} "
            f"frames of the poses {source.source}: give one mask per pose frame (before fps "
            "resampling), named so they sort in frame order"
        )
    index = source_frame_index(source.num_frames, source.fps, config.fps or source.fps)
    return SuppliedMasks(tuple(files[i] for i in index), (source.width, source.height))
