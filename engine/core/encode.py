"""A finished frame as the objects a render folder holds, encoded where the frame was made.

A Sampler (or the core's writers, for the in-process executor) turns a
:class:`~engine.core.work.FrameOutcome` into PNG and safetensors bytes; whoever can reach the
storage backend writes them, latent last, and the core records only their digests and sizes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from engine.storage import Storage


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) or (H, W) uint8 → PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any PIL image) bytes → (H, W, 3) uint8 RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).copy()


def latent_bytes(latent: np.ndarray | torch.Tensor) -> bytes:
    """A (1, 4, h, w) clean latent → safetensors bytes (float32, key ``latent``)."""
    tensor = torch.from_numpy(np.array(latent)) if isinstance(latent, np.ndarray) else latent
    return save_tensors({"latent": tensor.detach().float().cpu().contiguous()})


def latent_from_bytes(data: bytes) -> np.ndarray:
    """safetensors bytes → the (1, 4, h, w) float32 latent."""
    return load_tensors(data)["latent"].numpy()


def frame_keys(index: int) -> dict[str, str]:
    """The keys of frame ``index``'s objects, in write order (the latent marks it done)."""
    name = f"{index:06d}"
    return {
        "pose": f"poses/{name}.png",
        "mask": f"masks/{name}.png",
        "frame": f"frames/{name}.png",
        "latent": f"latents/{name}.safetensors",
    }


@dataclass
class EncodedFrame:
    """Frame ``index``'s objects as bytes (key → bytes, in write order)."""

    index: int
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.files.values())


def encode_frame(
    index: int,
    frame: np.ndarray,
    latent: np.ndarray | torch.Tensor,
    pose_map: np.ndarray,
    mask: np.ndarray | None,
) -> EncodedFrame:
    """Encode a finished frame: (H, W, 3) uint8 frame and pose map, (H, W) float32 mask in
    [0, 1] or None, (1, 4, h, w) latent."""
    keys = frame_keys(index)
    files = {keys["pose"]: png_bytes(pose_map)}
    if mask is not None:
        files[keys["mask"]] = png_bytes(np.rint(mask * 255).astype(np.uint8))
    files[keys["frame"]] = png_bytes(frame)
    files[keys["latent"]] = latent_bytes(latent)
    return EncodedFrame(index, files)


def write_frame(out: Storage, encoded: EncodedFrame) -> dict[str, tuple[str, int]]:
    """Write an encoded frame into a render's storage view, latent last → {key: (sha256, size)}."""
    return {key: (out.put(key, data), len(data)) for key, data in encoded.files.items()}
