"""A render folder's files: persisted frames and latents, the resume fingerprint, the encoded
video, contact sheet and manifest. The folder is a view of the storage backend
(:class:`~engine.storage.Storage`: a local folder or a bucket prefix); every write is atomic.

    OUT/video.mp4            H.264 yuv420p at the render fps
    OUT/frames/000000.png …  the frames
    OUT/poses/000000.png …   the pose maps the ControlNet saw
    OUT/latents/000000.safetensors …  each finished frame's clean latent (resume state)
    OUT/masks/000000.png …   person masks (when the background is held to a plate)
    OUT/inputs.json          hashes of everything that determines the frames (resume guard)
    OUT/refined_prompt.json  the refined prompt (reused on resume, never re-queried)
    OUT/adapter/             the appearance LoRA the frames were drawn with (reused on resume)
    OUT/plate/               the background plate and its intermediates (reused on resume)
    OUT/contact_sheet.png    frames with the pose drawn over them
    OUT/manifest.json        spec, resolved config, seeds, versions, timings, outputs
"""

from __future__ import annotations

import hashlib
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import engine
from engine.chain import frame_seed
from engine.config import RenderConfig
from engine.core.encode import (
    decode_png,
    encode_frame,
    frame_keys,
    latent_from_bytes,
    png_bytes,
    write_frame,
)
from engine.core.faults import InputsChangedError
from engine.core.store import RenderStore
from engine.pose import PoseSequence, overlay_pose
from engine.storage import Storage
from engine.video import VideoWriter, contact_sheet

SUBFOLDERS = ("frames", "poses", "latents", "masks")


def remove_render(store: RenderStore, render_id: str) -> None:
    """Remove a render for good: every artefact in the storage backend, then its index row and
    events.

    The artefacts go first, so a crash in between leaves a row of a final render (never resumed)
    rather than orphan artefacts a new render of the same id would find. The caller makes sure
    nothing works on the render (:meth:`EngineCore.delete`).
    """
    store.unlock(render_id)
    store.storage.delete(render_id)
    store.delete(render_id)


def frames_persisted(out: Storage, total: int) -> int:
    """How many leading frames of the render in ``out`` are complete (their latent is written
    last, so it marks a frame as done)."""
    latents = set(out.keys("latents"))
    done = 0
    while done < total and frame_keys(done)["latent"] in latents:
        done += 1
    return done


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        for child in sorted(path.iterdir()):
            if child.is_file() and not child.name.startswith("."):
                h.update(child.name.encode())
                h.update(_file_digest(child).encode())
        return h.hexdigest()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_hashes(config: RenderConfig, poses: PoseSequence, model_name: str) -> dict[str, str]:
    """sha256 of each input that determines the frames: the config (without output, limits,
    cluster, storage and metrics settings; the refine section included), the model, the
    resampled poses, and the contents of a supplied plate and mask folder."""
    relevant = config.model_dump(
        mode="json", exclude={"output", "limits", "cluster", "storage", "metrics", "cache_dir"}
    )
    for key in ("poses", "plate", "masks"):
        relevant.pop(key, None)
    hashes = {
        "config": _sha(json.dumps(relevant, sort_keys=True).encode()),
        "model": _sha(model_name.encode()),
        "poses": _sha(np.ascontiguousarray(poses.keypoints).tobytes()),
    }
    if config.plate is not None and config.alignment.background:
        hashes["plate_file"] = _file_digest(Path(config.plate))
    if config.masks is not None and config.alignment.background:
        hashes["masks"] = _file_digest(Path(config.masks))
    return hashes


def fingerprint(hashes: dict[str, str]) -> str:
    """One hash of :func:`input_hashes` (stored in the index)."""
    return _sha(json.dumps(hashes, sort_keys=True).encode())


def check_inputs(out: Storage, hashes: dict[str, str], persisted: int) -> None:
    """Refuse to continue a render whose inputs changed; record them on a fresh start.

    Raises:
        InputsChangedError: naming every input that differs from the persisted frames' inputs.
    """
    if persisted and out.exists("inputs.json"):
        before = json.loads(out.get("inputs.json"))
        changed = sorted(k for k in set(before) | set(hashes) if before.get(k) != hashes.get(k))
        if changed:
            raise InputsChangedError(
                f"{out.uri} holds {persisted} frames made with other inputs ({', '.join(changed)} "
                "changed since the render started); restore them or render into a new folder"
            )
        return
    put_json(out, "inputs.json", hashes)


def put_json(out: Storage, key: str, value: Any) -> None:
    """``value`` as indented JSON under ``key`` (atomic)."""
    out.put(key, json.dumps(value, indent=2).encode())


def open_folder(out: Storage) -> None:
    """Create a local render folder's subfolders (an object store needs none)."""
    folder = out.local_path()
    if folder is not None:
        for sub in SUBFOLDERS:
            (folder / sub).mkdir(parents=True, exist_ok=True)


def save_frame(
    out: Storage,
    index: int,
    frame: np.ndarray,
    latent: torch.Tensor | np.ndarray,
    pose_map: np.ndarray,
    mask: np.ndarray | None,
) -> dict[str, tuple[str, int]]:
    """Persist a finished frame; its latent is written last, so it marks the frame as done.
    Returns {key: (sha256, size)}."""
    return write_frame(out, encode_frame(index, frame, latent, pose_map, mask))


def load_latent(out: Storage, index: int) -> np.ndarray:
    """The persisted (1, 4, h, w) float32 clean latent of frame ``index``."""
    return latent_from_bytes(out.get(frame_keys(index)["latent"]))


def load_frame(out: Storage, index: int) -> np.ndarray:
    """The persisted (H, W, 3) uint8 frame ``index``."""
    return decode_png(out.get(frame_keys(index)["frame"]))


def encode_video(out: Storage, poses: PoseSequence, config: RenderConfig) -> str:
    """video.mp4 from the persisted frames (streamed: memory does not grow with the length);
    on an object store it is encoded into a local temporary file, then written with one PUT."""
    folder = out.local_path()
    with tempfile.TemporaryDirectory(prefix="avatar-video-") as tmp:
        path = folder / "video.mp4" if folder is not None else Path(tmp) / "video.mp4"
        with VideoWriter(
            path, fps=poses.fps, width=config.width, height=config.height, crf=config.output.crf
        ) as video:
            for index in range(len(poses.keypoints)):
                video.write(load_frame(out, index))
        if folder is None:
            out.put("video.mp4", path.read_bytes())
    return "video.mp4"


def write_contact_sheet(out: Storage, poses: PoseSequence, max_frames: int) -> None:
    total = len(poses.keypoints)
    picks = np.unique(np.linspace(0, total - 1, min(total, max_frames)).round().astype(int))
    images = [overlay_pose(load_frame(out, i), poses.keypoints[i], 0.6) for i in picks]
    out.put("contact_sheet.png", png_bytes(contact_sheet(images, [str(i) for i in picks])))


def versions() -> dict[str, str]:
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
    out: Storage,
    config: RenderConfig,
    poses: PoseSequence,
    *,
    model: dict[str, str],
    key: str,
    start: int,
    timings: dict[str, float],
    prompt: tuple[str, str],
    stages: dict[str, Any],
    peak_rss_mb: float,
    seconds_per_frame: float | None,
) -> str:
    """Write manifest.json; ``prompt`` is (frame prompt, negative), ``stages`` the stage records."""
    frames = len(poses.keypoints)
    manifest: dict[str, Any] = {
        "config": config.model_dump(mode="json"),
        "model": model,
        "poses": {
            "source": poses.source,
            "frames": frames,
            "fps": poses.fps,
            "width": poses.width,
            "height": poses.height,
            **({"info": poses.info} if getattr(poses, "info", None) else {}),
        },
        "prompt": {"frame": prompt[0], "negative": prompt[1]},
        "stages": stages,
        "seeds": [frame_seed(config.seed, i) for i in range(frames)],
        "fingerprint": key,
        "resumed_from": start,
        "versions": versions(),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "seconds_per_frame": None if seconds_per_frame is None else round(seconds_per_frame, 4),
        "peak_rss_mb": peak_rss_mb,
        "outputs": {
            "video": "video.mp4",
            "frames": [f"frames/{i:06d}.png" for i in range(frames)],
            "poses": "poses/",
            "latents": "latents/",
            "masks": "masks/" if config.alignment.background else None,
            "refined_prompt": "refined_prompt.json",
            "adapter": "adapter/" if out.keys("adapter") else None,
            "plate": "plate/" if out.keys("plate") else None,
            "contact_sheet": "contact_sheet.png" if config.output.contact_sheet else None,
        },
    }
    put_json(out, "manifest.json", manifest)  # last: a render with a manifest is complete
    return "manifest.json"
