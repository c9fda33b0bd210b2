"""SAM in the Hugging Face transformers layout (``facebook/sam-vit-huge`` and the like).

A folder (or hub id) with ``config.json`` (``model_type: sam``), ``model.safetensors`` and
``processor_config.json`` is loaded by transformers' ``SamModel`` / ``SamProcessor``, and
:class:`HFSamPredictor` gives it the interface of :class:`segment_anything.SamPredictor` that
:func:`engine.background.segment_person` uses (``set_image`` once, then ``predict`` with points,
labels and a box, three masks with their scores). Meta's ``.pth`` checkpoints stay on
segment-anything (:func:`engine.models.sam.load_sam`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.models.errors import WeightsNotFoundError

HF_SAM_TYPES = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
"""Vision-encoder width → segment-anything's name of the variant."""


def is_hf_sam(folder: Path) -> bool:
    """Whether ``folder`` holds a transformers SAM (its config.json says ``model_type: sam``)."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "sam"
    except (OSError, ValueError):
        return False


class HFSamPredictor:
    """transformers' SAM behind :class:`segment_anything.SamPredictor`'s interface."""

    def __init__(self, model: Any, processor: Any):
        self.model, self.processor = model, processor
        self._image: np.ndarray | None = None
        self._embeddings: torch.Tensor | None = None

    @torch.no_grad()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed ``image`` (np.ndarray): (H, W, 3) uint8 in [0, 255], RGB (or BGR, flipped)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be RGB or BGR, got {image_format!r}")
        self._image = image[..., ::-1].copy() if image_format == "BGR" else image
        inputs = self.processor(images=self._image, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        self._embeddings = self.model.get_image_embeddings(pixels)

    @torch.no_grad()
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for prompts in original-image pixels: point_coords (N, 2) float (x, y),
        point_labels (N,) int (1 = person, 0 = background), box (4,) float x0, y0, x1, y1.

        Returns:
            masks (K, H, W) bool, scores (K,) float32, low-resolution logits (K, 256, 256); K = 3
            with ``multimask_output``, else 1.
        """
        if self._image is None or self._embeddings is None:
            raise RuntimeError("call set_image() before predict()")
        if mask_input is not None or return_logits:
            raise ValueError("HFSamPredictor supports neither mask_input nor return_logits")
        kw: dict[str, Any] = {}
        if point_coords is not None:
            kw["input_points"] = [[np.asarray(point_coords, dtype=np.float64).tolist()]]
            kw["input_labels"] = [[np.asarray(point_labels).astype(int).tolist()]]
        if box is not None:
            kw["input_boxes"] = [[np.asarray(box, dtype=np.float64).tolist()]]
        inputs = self.processor(images=self._image, return_tensors="pt", **kw)
        prompts = {k: inputs[k].to(self.model.device) for k in kw}
        if "input_points" in prompts:
            prompts["input_points"] = prompts["input_points"].to(self.model.dtype)
        if "input_boxes" in prompts:
            prompts["input_boxes"] = prompts["input_boxes"].to(self.model.dtype)
        out = self.model(
            image_embeddings=self._embeddings, multimask_output=multimask_output, **prompts
        )
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )[0][0]
        scores = out.iou_scores[0, 0].float().cpu().numpy()
        return masks.numpy().astype(bool), scores, out.pred_masks[0, 0].float().cpu().numpy()


def load_hf_sam(folder: Path, sam_type: str, device: torch.device) -> HFSamPredictor:
    """The transformers SAM in ``folder`` (float32, eval) as a predictor.

    Raises:
        WeightsNotFoundError: it does not load, or its vision encoder is not ``sam_type``.
    """
    from transformers import SamModel, SamProcessor

    try:
        model: Any = SamModel.from_pretrained(str(folder), local_files_only=True)
        processor = SamProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise WeightsNotFoundError(
            f"model.sam_checkpoint={str(folder)!r}: not a loadable transformers SAM "
            f"({(str(e).splitlines() or [''])[0][:300]}); name its folder (config.json, "
            "model.safetensors, processor_config.json) or Meta's sam_vit_*.pth"
        ) from None
    width = int(model.config.vision_config.hidden_size)
    found = HF_SAM_TYPES.get(width)
    if found is not None and found != sam_type:
        raise WeightsNotFoundError(
            f"model.sam_checkpoint={str(folder)!r} is a SAM {found} but model.sam_type="
            f"{sam_type}; set model.sam_type={found}"
        )
    return HFSamPredictor(model.to(device).eval().requires_grad_(False), processor)
