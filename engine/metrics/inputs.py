"""What the metrics score: frames, input keypoints, person masks and the prompt of one video.

Two sources:

* a render folder (see :mod:`engine.render`): ``frames/*.png`` (else ``video.mp4``); keypoints from
  the manifest's pose file resampled as the render did (:func:`engine.method.prepare_poses`),
  else decoded from the ``poses/*.png`` pose maps (unreliable below ~384 px), or from an explicit
  poses file; masks from ``masks/*.png`` (written when background alignment is on), else drawn
  from the keypoints exactly as the render draws them (:func:`engine.compose.person_mask` with
  the config's ``chain.mask_dilate`` / ``mask_feather``); prompt = the manifest's frame prompt;
* a plain mp4 plus a poses file (any :func:`engine.pose.load_poses` input), resampled to the
  video's fps and size; masks drawn from the keypoints with the default chain settings.

A person mask is True wherever the soft render mask is > 0 (any person weight): the complement is
exactly what the render composited from the plate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.compose import person_mask
from engine.config import ChainConfig, ConfigError, RenderConfig
from engine.pose import PoseSequence, decode_pose_map, load_poses, resample
from engine.video import load_png


class MetricsError(ValueError):
    """The input cannot be scored; the message names the input and the fix."""


@dataclass
class ScoreInputs:
    """One video to score.

    Attributes:
        frames: T frames, each (H, W, 3) uint8 RGB.
        keypoints: (T, 18, 3) float32 input keypoints in frame pixels, or None (no poses).
        masks: T bool (H, W) person masks (True = person), or None.
        prompt: the text the video was made from, or None (no text alignment).
        fps: frames per second, or None when unknown.
        config: the render's config (from its manifest), or None.
        source: provenance (``kind``, ``path``, where keypoints / masks / prompt came from).
    """

    frames: list[np.ndarray]
    keypoints: np.ndarray | None
    masks: list[np.ndarray] | None
    prompt: str | None
    fps: float | None = None
    config: RenderConfig | None = None
    source: dict[str, Any] = field(default_factory=dict)


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def read_video(path: Path) -> tuple[list[np.ndarray], float]:
    """All frames of a video as (H, W, 3) uint8 RGB, and its fps."""
    import imageio_ffmpeg  # here: engine imports this module where it is absent

    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(b, np.uint8).reshape(height, width, 3).copy() for b in reader]
    except (OSError, RuntimeError, StopIteration) as exc:
        raise MetricsError(f"cannot read video {path}: {exc}; give a playable mp4") from None
    if not frames:
        raise MetricsError(f"video {path} has no frames")
    return frames, float(meta["fps"])


def _manifest(folder: Path) -> tuple[dict[str, Any], RenderConfig | None]:
    path = folder / "manifest.json"
    if not path.is_file():
        return {}, None
    try:
        manifest = json.loads(path.read_text())
        return manifest, RenderConfig.model_validate(manifest["config"])
    except (ValueError, KeyError) as exc:
        raise MetricsError(
            f"{path}: not a render manifest ({exc}); re-render or delete it to score the frames only"
        ) from None


def _fit_keypoints(kp: np.ndarray, frames: int, where: str) -> np.ndarray:
    """The first ``frames`` poses; a missing frame or two at the end (fps rounding) repeats."""
    if len(kp) < frames - 1:
        raise MetricsError(
            f"{where} has {len(kp)} poses for {frames} frames; pass the poses the video was made "
            "from (--poses)"
        )
    if len(kp) < frames:
        kp = np.concatenate([kp, kp[-1:]], axis=0)
    return np.ascontiguousarray(kp[:frames], np.float32)


def _sequence_keypoints(
    seq: PoseSequence, fps: float | None, width: int, height: int
) -> np.ndarray:
    return resample(seq, fps=fps, width=width, height=height).keypoints


def _render_keypoints(
    folder: Path, config: RenderConfig | None, poses: Path | None, fps: float | None, size: tuple
) -> tuple[np.ndarray | None, str | None]:
    """Keypoints (F, 18, 3) in frame pixels and where they came from (see module docstring)."""
    width, height = size
    if poses is not None:
        return _sequence_keypoints(load_poses(poses), fps, width, height), str(poses)
    if config is not None and config.poses is not None and Path(config.poses).exists():
        from engine.method import prepare_poses

        try:
            return prepare_poses(config).keypoints, str(config.poses)
        except ConfigError as exc:
            raise MetricsError(f"{folder}: cannot reload the render's poses: {exc}") from None
    maps = _pngs(folder / "poses")
    if maps:
        return np.stack([decode_pose_map(load_png(p)) for p in maps]), "poses/ (decoded maps)"
    return None, None


def _draw_masks(kp: np.ndarray, width: int, height: int, chain: ChainConfig) -> list[np.ndarray]:
    return [
        person_mask(k, width, height, dilate=chain.mask_dilate, feather=chain.mask_feather) > 0
        for k in kp
    ]


def _render_masks(
    folder: Path, kp: np.ndarray | None, config: RenderConfig | None, frames: int, size: tuple
) -> tuple[list[np.ndarray] | None, str | None]:
    files = _pngs(folder / "masks")
    if len(files) >= frames:
        masks = []
        for path in files[:frames]:
            with Image.open(path) as img:
                masks.append(np.asarray(img.convert("L")) > 0)
        if masks[0].shape == (size[1], size[0]):
            return masks, "masks/"
    if kp is None:
        return None, None
    chain = config.chain if config is not None else ChainConfig()
    return _draw_masks(kp, size[0], size[1], chain), "drawn from the poses"


def load_render(
    folder: Path, *, prompt: str | None = None, poses: Path | None = None
) -> ScoreInputs:
    """A render folder's frames, keypoints, masks and prompt (see module docstring).

    Args:
        folder: a render output folder (``frames/`` or ``video.mp4``, ideally ``manifest.json``).
        prompt: overrides the manifest's frame prompt.
        poses: overrides the manifest's pose file (resampled to the frames' size and fps).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MetricsError(f"{folder} is not a folder; give a render folder (avatar render --out)")
    manifest, config = _manifest(folder)
    fps = manifest.get("poses", {}).get("fps")
    files = _pngs(folder / "frames")
    if files:
        frames = [load_png(p) for p in files]
    elif (folder / "video.mp4").is_file():
        frames, fps = read_video(folder / "video.mp4")
    else:
        raise MetricsError(
            f"{folder} has no frames/*.png and no video.mp4; give a render folder, or an mp4 "
            "with --poses"
        )
    height, width = frames[0].shape[:2]
    kp, pose_source = _render_keypoints(folder, config, poses, fps, (width, height))
    if kp is not None:
        kp = _fit_keypoints(kp, len(frames), pose_source or str(folder))
    masks, mask_source = _render_masks(folder, kp, config, len(frames), (width, height))
    prompt_source = "argument" if prompt else None
    if not prompt and manifest.get("prompt", {}).get("frame"):
        prompt, prompt_source = manifest["prompt"]["frame"], "manifest prompt.frame"
    elif not prompt and config is not None and config.prompt:
        prompt, prompt_source = config.prompt, "manifest config.prompt"
    source = {
        "kind": "render",
        "path": str(folder),
        "keypoints": pose_source,
        "masks": mask_source,
        "prompt": prompt_source,
    }
    return ScoreInputs(frames, kp, masks, prompt or None, fps, config, source)


def load_video(video: Path, poses: Path | None, prompt: str | None) -> ScoreInputs:
    """A plain mp4 plus its poses file (resampled to the video's fps and size) and prompt."""
    video = Path(video)
    if not video.is_file():
        raise MetricsError(f"{video}: no such video; check the path")
    frames, fps = read_video(video)
    height, width = frames[0].shape[:2]
    kp = masks = None
    if poses is not None:
        kp = _fit_keypoints(
            _sequence_keypoints(load_poses(poses), fps, width, height), len(frames), str(poses)
        )
        masks = _draw_masks(kp, width, height, ChainConfig())
    source = {
        "kind": "video",
        "path": str(video),
        "keypoints": str(poses) if poses is not None else None,
        "masks": "drawn from the poses" if poses is not None else None,
        "prompt": "argument" if prompt else None,
    }
    return ScoreInputs(frames, kp, masks, prompt or None, fps, None, source)
