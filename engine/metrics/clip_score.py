"""CLIP-based metrics: text alignment and frame-to-frame consistency (cosine similarity × 100).

* ``text_alignment(images, prompt)``: ``100 · cos(E_img(f), E_txt(prompt))`` per frame.
* ``consistency(images)``: ``100 · cos(E_img(f_t), E_img(f_{t+1}))`` per adjacent pair.

Both are raw cosines × 100 in -100..100: no ``max(·, 0)`` clipping and no 2.5 weight as in
CLIPScore (Hessel et al. 2021). Preprocessing follows ``CLIPImageProcessor`` (done in torch,
batched): resize the shorter side to the model's ``image_size`` with antialiased bicubic
interpolation (long side ``int(size · long / short)``), round/clip to 0..255 as PIL's uint8 output
would, centre crop ``image_size``², scale to 0..1 and normalise with the CLIP mean/std. Torch's
antialiased bicubic is not PIL's: pixels differ from ``CLIPImageProcessor`` by ~0.15 grey
levels on average (up to ~4 at sharp edges), so scores may differ slightly from a PIL pipeline.

Body/background variants: :func:`body_image` crops the frame to the person's bounding box;
:func:`background_image` replaces person pixels by the mean colour of the background pixels
(``fill="mean"``) or mid grey 128 (``fill="grey"``), so the person's shape remains visible as a
flat silhouette but its appearance does not count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, PreTrainedTokenizerBase

from engine.metrics.niqe import bbox_from_mask

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Images = Sequence[np.ndarray] | np.ndarray
Fill = Literal["mean", "grey"] | tuple[int, int, int]


def _as_rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        raise TypeError(f"CLIP metrics expect uint8 RGB images in 0..255, got dtype {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    return img


def preprocess(images: Images, image_size: int) -> torch.Tensor:
    """CLIP preprocessing of uint8 RGB images (any sizes) → float32 (N, 3, S, S), normalised."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    out = []
    for img in images:
        x = torch.from_numpy(np.ascontiguousarray(_as_rgb(img))).permute(2, 0, 1)[None].float()
        h, w = x.shape[-2:]
        short, long = min(h, w), max(h, w)
        new_long = int(image_size * long / short)
        size = (image_size, new_long) if h <= w else (new_long, image_size)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, 255).round()
        top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        out.append(x[..., top : top + image_size, left : left + image_size])
    if not out:
        raise ValueError("no images given")
    return (torch.cat(out) / 255.0 - mean) / std


def _pooled(out: torch.Tensor | object) -> torch.Tensor:
    """Projected features from ``get_*_features`` (a tensor, or an output with pooler_output)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


class ClipScorer:
    """A CLIP model + tokenizer computing normalised embeddings and cosine×100 scores."""

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        vision = model.config.vision_config
        self.image_size: int = vision.image_size  # type: ignore[union-attr,assignment]

    @torch.no_grad()
    def image_embeddings(self, images: Images) -> torch.Tensor:
        """L2-normalised image embeddings, float32 (N, D) on CPU, of N uint8 RGB (H, W, 3)."""
        dtype = next(self.model.parameters()).dtype
        chunks = []
        for i in range(0, len(images), self.batch_size):
            pixels = preprocess(images[i : i + self.batch_size], self.image_size)
            feats = self.model.get_image_features(pixel_values=pixels.to(self.device, dtype))
            chunks.append(F.normalize(_pooled(feats).float(), dim=-1).cpu())
        if not chunks:
            raise ValueError("no images given")
        return torch.cat(chunks)

    @torch.no_grad()
    def text_embeddings(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, float32 (M, D) on CPU (truncated to 77 tokens)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        )
        feats = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return F.normalize(_pooled(feats).float(), dim=-1).cpu()

    def text_alignment(self, images: Images, prompt: str) -> torch.Tensor:
        """Per-image ``100 · cos(image, prompt)``: float32 (N,), in -100..100."""
        return 100.0 * (self.image_embeddings(images) @ self.text_embeddings(prompt)[0])

    def consistency(self, images: Images) -> torch.Tensor:
        """Per adjacent pair ``100 · cos(f_t, f_{t+1})``: float32 (N-1,), in -100..100."""
        if len(images) < 2:
            raise ValueError(f"consistency needs at least 2 frames, got {len(images)}")
        emb = self.image_embeddings(images)
        return 100.0 * (emb[:-1] * emb[1:]).sum(dim=-1)


def masked_image(img: np.ndarray, mask: np.ndarray, fill: Fill = "mean") -> np.ndarray:
    """Copy of ``img`` (uint8 (H, W, 3)) with the True pixels of ``mask`` replaced by ``fill``.

    ``fill``: ``"mean"`` = mean colour of the unmasked pixels (grey 128 if all are masked),
    ``"grey"`` = (128, 128, 128), or an explicit RGB triple.
    """
    img = _as_rgb(img)
    m = np.asarray(mask, bool)
    if m.shape != img.shape[:2]:
        raise ValueError(f"mask shape {m.shape} must equal image shape {img.shape[:2]}")
    if isinstance(fill, str) and fill not in ("mean", "grey"):
        raise ValueError(f"fill must be 'mean', 'grey' or an RGB triple, got {fill!r}")
    if fill == "grey" or (fill == "mean" and m.all()):
        colour = np.array([128, 128, 128], np.uint8)
    elif fill == "mean":
        colour = np.round(img[~m].reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    else:
        colour = np.asarray(fill, np.uint8).reshape(3)
    out = img.copy()
    out[m] = colour
    return out


def background_image(img: np.ndarray, person_mask: np.ndarray, fill: Fill = "mean") -> np.ndarray:
    """Background variant: person pixels (True in ``person_mask``) filled; see :func:`masked_image`.

    Returns a uint8 (H, W, 3) copy.
    """
    return masked_image(img, person_mask, fill)


def body_image(img: np.ndarray, person_mask: np.ndarray, pad: int = 8) -> np.ndarray:
    """Body variant: ``img`` cropped to the person's bounding box grown by ``pad`` (clamped).

    Raises ValueError for an empty mask. The crop may be small; CLIP resizes it anyway.
    """
    img = _as_rgb(img)
    y0, x0, y1, x1 = bbox_from_mask(person_mask, pad)
    return np.ascontiguousarray(img[y0:y1, x0:x1])


def tiny_clip(seed: int = 0) -> ClipScorer:
    """A random-weight tiny CLIP (32-px images, 32-d embeddings) with the offline tokenizer.

    For tests and offline plumbing only: its scores carry no meaning. Deterministic in ``seed``;
    the global torch RNG state is left untouched.
    """
    from engine.models.tokenizer import build_offline_tokenizer

    tokenizer = build_offline_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        image_size=32,
        patch_size=4,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return ClipScorer(model, tokenizer)


def load_clip(
    name_or_path: str = "openai/clip-vit-large-patch14",
    device: str | torch.device = "cpu",
    *,
    local_files_only: bool = False,
    dtype: torch.dtype | None = None,
) -> ClipScorer:
    """A pretrained CLIP (hub id or local directory) as a :class:`ClipScorer`.

    Raises:
        RuntimeError: the model or tokenizer cannot be loaded (names the model and the cause).
    """
    try:
        model = CLIPModel.from_pretrained(
            name_or_path, local_files_only=local_files_only, dtype=dtype
        )
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        where = "the local cache" if local_files_only else "the local cache or the Hugging Face hub"
        raise RuntimeError(
            f"could not load CLIP model {name_or_path!r} from {where} ({exc}); download it first "
            f"(e.g. `hf download {name_or_path}`) or pass a local directory with config.json, "
            "the weights and the tokenizer files"
        ) from exc
    return ClipScorer(model, tokenizer, device=device)
