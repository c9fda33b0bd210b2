"""One render end to end in one process: poses + prompt → frames, video, manifest.

Output folder layout (every write atomic):

    OUT/video.mp4            H.264 yuv420p at the render fps
    OUT/frames/000000.png …  the frames
    OUT/poses/000000.png …   the pose maps the ControlNet saw
    OUT/latents/000000.safetensors …  each finished frame's clean latent (resume state)
    OUT/masks/000000.png …   person masks (when the background is held to a plate)
    OUT/contact_sheet.png    frames with the pose drawn over them
    OUT/manifest.json        spec, resolved config, seeds, versions, timings, outputs
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import engine
from engine.chain import FrameChain, frame_seed
from engine.config import ConfigError, RenderConfig
from engine.method import prepare, release
from engine.models.registry import build_components
from engine.pose import PoseSequence, load_poses, overlay_pose, resample, validate
from engine.session import CharacterChain
from engine.video import VideoWriter, contact_sheet, load_png, save_png

log = logging.getLogger(__name__)


@dataclass
class RenderResult:
    """Where a finished render's outputs are."""

    out_dir: Path
    video: Path
    manifest: Path
    frames: int
    resumed_from: int
    timings: dict[str, float] = field(default_factory=dict)


class _Timings(dict[str, float]):
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


def prepare_poses(config: RenderConfig) -> PoseSequence:
    """Load, resample to the render's fps and size, and validate the spec's pose sequence."""
    assert config.poses is not None  # require_spec() ran
    seq = load_poses(config.poses, max_frames=config.limits.max_frames)
    seq = resample(seq, fps=config.fps or seq.fps, width=config.width, height=config.height)
    validate(seq, max_frames=config.limits.max_frames)
    return seq


def fingerprint(config: RenderConfig, poses: PoseSequence, model_name: str) -> str:
    """Hash of everything that determines the frames (not output settings): resume guard."""
    relevant = config.model_dump(
        mode="json", exclude={"output", "refine", "limits", "cluster", "metrics"}
    )
    payload = json.dumps([relevant, model_name], sort_keys=True).encode()
    return hashlib.sha256(payload + poses.keypoints.tobytes()).hexdigest()


def render(
    config: RenderConfig,
    out_dir: Path,
    *,
    chain: FrameChain | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RenderResult:
    """Render ``config`` into ``out_dir``; with ``resume`` continue after the last finished frame.

    A resumed render produces frames bit-identical to an uninterrupted one (same device).
    """
    # 1. Check inputs.
    config.require_spec()
    timings = _Timings()
    out = Path(out_dir)
    with timings.stage("poses"):
        poses = prepare_poses(config)
    # 2. Resident models.
    with timings.stage("models"):
        chain = chain or FrameChain(build_components(config.model), config.model.attention)
    # 3. Output folder and resume point.
    key = fingerprint(config, poses, chain.parts.name)
    start = open_output(out, key, resume, len(poses.keypoints))
    # 4. The paper's stages before the chain: refine → appearance LoRA → background plate.
    prep = prepare(chain, config, poses, out, stage=timings.stage, progress=progress)
    try:
        with timings.stage("conditioning"):
            session = CharacterChain(
                chain,
                config,
                poses.keypoints,
                prompt=prep.prompt,
                negative=prep.negative,
                plate=prep.plate,
                adapter=prep.adapter_name,
            )
        # 5. The frame chain, streamed to disk and to the encoder.
        with (
            timings.stage("chain"),
            VideoWriter(
                out / "video.mp4",
                fps=poses.fps,
                width=config.width,
                height=config.height,
                crf=config.output.crf,
            ) as video,
        ):
            for index in range(start):  # a resumed render re-feeds the finished frames
                video.write(load_png(out / "frames" / f"{index:06d}.png"))
            frames = _chain_frames(session, out, start)
            bar = tqdm(
                frames,
                total=len(poses.keypoints) - start,
                disable=not progress,
                desc="frames",
                unit="frame",
            )
            for _, frame in bar:
                video.write(frame)
    finally:
        release(chain, prep)
    # 6. Contact sheet and manifest.
    with timings.stage("outputs"):
        if config.output.contact_sheet:
            write_contact_sheet(out, poses, config.output.contact_sheet_frames)
    manifest = write_manifest(
        out,
        config,
        poses,
        model_info(chain),
        key,
        start,
        timings,
        (prep.prompt, prep.negative),
        prep.record,
    )
    if config.metrics:  # score the finished render: metrics.json + metrics.png
        from engine.metrics.report import score_render

        with timings.stage("metrics"):
            score_render(out)
    return RenderResult(
        out, out / "video.mp4", manifest, len(poses.keypoints), start, dict(timings)
    )


def open_output(out: Path, key: str, resume: bool, total: int) -> int:
    """Create the folders; return the first frame to render (0 unless resuming)."""
    for sub in ("frames", "poses", "latents", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    state = out / "latents" / "fingerprint.txt"
    done = 0
    while done < total and (out / "latents" / f"{done:06d}.safetensors").is_file():
        done += 1
    if done and not resume:
        raise ConfigError(
            f"{out} already holds {done} rendered frames; pass --resume to continue that render "
            "or choose an empty --out folder"
        )
    if done and state.is_file() and state.read_text() != key:
        raise ConfigError(
            f"{out} holds frames of a different spec or config; resume only with the same spec, "
            "preset and overrides, or choose an empty --out folder"
        )
    state.write_text(key)
    return done


def _chain_frames(
    session: CharacterChain, out: Path, start: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Render frames ``start..F-1``, persisting each (frame, pose map, mask, latent); yields them."""
    anchor = load_latent(out, 0) if start > 0 else None
    previous = load_latent(out, start - 1) if start > 0 else None
    for index in range(start, session.frames):
        job = session.job(index, previous, anchor)
        latent = session.chain.denoise(
            index=job.index,
            seed=job.seed,
            pose=job.pose,
            text=job.text,
            settings=job.settings,
            previous=job.previous,
            anchor=job.anchor,
            background=job.background,
            adapter=job.adapter,
        )
        frame = session.finish(index, latent)
        save_frame(out, index, frame, latent, session.pose_map(index), session.mask(index))
        previous = latent
        if index == 0:
            anchor = latent
        yield index, frame


def save_frame(
    out: Path,
    index: int,
    frame: np.ndarray,
    latent: torch.Tensor,
    pose_map: np.ndarray,
    mask: np.ndarray | None,
) -> None:
    """Persist a finished frame; its latent is written last, so it marks the frame as done."""
    save_png(pose_map, out / "poses" / f"{index:06d}.png")
    if mask is not None:
        save_png(np.rint(mask * 255).astype(np.uint8), out / "masks" / f"{index:06d}.png")
    save_png(frame, out / "frames" / f"{index:06d}.png")
    _save_latent(latent, out / "latents" / f"{index:06d}.safetensors")


def load_latent(out: Path, index: int) -> torch.Tensor:
    """The persisted (1, 4, h, w) float32 clean latent of frame ``index``."""
    return load_file(out / "latents" / f"{index:06d}.safetensors")["latent"]


def _save_latent(latent: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"latent": latent.detach().float().cpu().contiguous()}, str(tmp))
    os.replace(tmp, path)


def write_contact_sheet(out: Path, poses: PoseSequence, max_frames: int) -> None:
    total = len(poses.keypoints)
    picks = np.unique(np.linspace(0, total - 1, min(total, max_frames)).round().astype(int))
    images = [
        overlay_pose(load_png(out / "frames" / f"{i:06d}.png"), poses.keypoints[i], 0.6)
        for i in picks
    ]
    save_png(contact_sheet(images, [str(i) for i in picks]), out / "contact_sheet.png")


def model_info(chain: FrameChain) -> dict[str, str]:
    """Provenance of the resident models for the manifest."""
    return {"name": chain.parts.name, "device": str(chain.device), "dtype": str(chain.parts.dtype)}


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "dancing_avatar": engine.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def write_manifest(
    out: Path,
    config: RenderConfig,
    poses: PoseSequence,
    model: dict[str, str],
    key: str,
    start: int,
    timings: dict[str, float],
    prompt: tuple[str, str],
    stages: dict[str, Any],
) -> Path:
    """Write manifest.json; ``prompt`` is (frame prompt, negative), ``stages`` the stage records."""
    frames = len(poses.keypoints)
    chain_time = timings.get("chain", 0.0)
    manifest: dict[str, Any] = {
        "config": config.model_dump(mode="json"),
        "model": model,
        "poses": {
            "source": poses.source,
            "frames": frames,
            "fps": poses.fps,
            "width": poses.width,
            "height": poses.height,
        },
        "prompt": {"frame": prompt[0], "negative": prompt[1]},
        "stages": stages,
        "seeds": [frame_seed(config.seed, i) for i in range(frames)],
        "fingerprint": key,
        "resumed_from": start,
        "versions": _versions(),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "seconds_per_frame": round(chain_time / max(1, frames - start), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "outputs": {
            "video": "video.mp4",
            "frames": [f"frames/{i:06d}.png" for i in range(frames)],
            "poses": "poses/",
            "latents": "latents/",
            "masks": "masks/" if config.alignment.background else None,
            "refined_prompt": "refined_prompt.json",
            "plate": "plate/" if (out / "plate").is_dir() else None,
            "contact_sheet": "contact_sheet.png" if config.output.contact_sheet else None,
        },
    }
    path = out / "manifest.json"
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)
    return path
