"""Thin Ray actors over engine/: each builds its models once (after Ray assigned its GPU) and
serves many characters. Inputs and outputs are plain data (JSON-able dicts, numpy arrays,
AdapterWeights) that travel through the object store; no shared filesystem is assumed.

- :class:`Refiner` (CPU): prompt refinement.
- :class:`AppearanceTrainer`: reference synthesis + LoRA training → adapter weights.
- :class:`BackgroundWorker`: scene at pose 0 + SAM + inpainting → background plate.
- :class:`Sampler`: the frame chain; denoises batches of frames of many characters.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import ray
import torch

from engine.batching import REF_SLOTS, BatchDenoiser
from engine.chain import FrameChain
from engine.config import ModelConfig, RenderConfig
from engine.models.registry import build_components
from engine.refine import RefinedPrompt
from engine.session import CharacterChain

log = logging.getLogger(__name__)


def _chain(model: dict[str, Any]) -> FrameChain:
    config = ModelConfig.model_validate(model)
    return FrameChain(build_components(config), config.attention)


def _load(chain: FrameChain, name: str | None, weights: Any) -> None:
    """Make adapter ``name`` loadable on the chain's UNet (no-op if already there or None)."""
    if name is None:
        return
    from engine.appearance import load_adapter, loaded_adapters

    if name not in loaded_adapters(chain.parts.unet):
        load_adapter(chain.parts.unet, weights, name)


@ray.remote
class Refiner:
    """Prompt refinement (template offline, or an OpenAI-compatible server)."""

    def refine(self, config: dict[str, Any]) -> dict[str, Any]:
        from engine.method import refine_prompt

        return refine_prompt(RenderConfig.model_validate(config)).model_dump(mode="json")


@ray.remote
class AppearanceTrainer:
    """Synthesizes a character's references and trains its appearance LoRA (cached locally)."""

    def __init__(self, model: dict[str, Any]):
        self.chain = _chain(model)

    def adapter(self, config: dict[str, Any], refined: dict[str, Any]) -> tuple[str, Any]:
        """→ (adapter name, AdapterWeights) for the character of ``config``."""
        from engine.appearance import get_or_train_adapter
        from engine.method import cache_root

        cfg = RenderConfig.model_validate(config)
        adapter = get_or_train_adapter(
            self.chain,
            RefinedPrompt.model_validate(refined),
            cfg.appearance,
            cache_root(cfg),
            sampler=cfg.sampler,
        )
        return adapter.name, adapter.weights


@ray.remote
class BackgroundWorker:
    """Makes a character's background plate (SAM + inpainting models built on first use)."""

    def __init__(self, model: dict[str, Any]):
        self.chain = _chain(model)
        self.models: Any = None

    def plate(
        self,
        config: dict[str, Any],
        refined: dict[str, Any],
        keypoints0: np.ndarray,
        adapter: tuple[str, Any] | None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """→ ((H, W, 3) uint8 plate, plate record). The scene uses the character's LoRA."""
        from engine.appearance import activate
        from engine.background import build_plate_models, make_plate, plate_record

        cfg = RenderConfig.model_validate(config)
        if self.models is None:
            self.models = build_plate_models(cfg, self.chain.parts)
        name = adapter[0] if adapter else None
        if adapter is not None:
            _load(self.chain, *adapter)
            activate(self.chain.parts.unet, name)
        try:
            pipe, predictor = self.models
            result = make_plate(
                self.chain,
                pipe,
                predictor,
                keypoints0,
                RefinedPrompt.model_validate(refined),
                cfg,
                seed=cfg.seed,
            )
        finally:
            if adapter is not None:
                activate(self.chain.parts.unet, None)
        return result.plate, plate_record(result)


@ray.remote
class Sampler:
    """The frame chain's models; denoises ready frames of many characters in one batch.

    Holds per character only its constants (prompt embeddings, plate latent, LoRA) between
    :meth:`open` and :meth:`close`; the chain state (two reference latents) comes with each
    request, so a restarted Sampler resumes any chain from what the driver persisted.
    """

    def __init__(self, model: dict[str, Any], max_batch: int, deterministic: bool = True):
        self.chain = _chain(model)
        self.max_batch = max_batch
        self.deterministic = deterministic
        self.sessions: dict[str, CharacterChain] = {}

    def open(
        self,
        render_id: str,
        config: dict[str, Any],
        keypoints: np.ndarray,
        prompt: str,
        negative: str,
        plate: np.ndarray | None,
        adapter: tuple[str, Any] | None,
    ) -> None:
        name = adapter[0] if adapter else None
        if adapter is not None:
            _load(self.chain, *adapter)
        self.sessions[render_id] = CharacterChain(
            self.chain,
            RenderConfig.model_validate(config),
            keypoints,
            prompt=prompt,
            negative=negative,
            plate=plate,
            adapter=name,
        )

    def close(self, render_id: str) -> None:
        self.sessions.pop(render_id, None)

    def denoise(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Denoise one batch. Each request: render_id, index, previous, anchor (float32 latents
        or None). Each result: render_id, index, and latent/frame/pose_map/mask, or error (this
        render alone failed: e.g. non-finite output)."""
        jobs = [
            self.sessions[r["render_id"]].job(
                r["index"], _tensor(r["previous"]), _tensor(r["anchor"])
            )
            for r in requests
        ]
        rows = 2 + (REF_SLOTS if "kv" in jobs[0].settings.inter_frame else 0)
        denoiser = BatchDenoiser(
            self.chain, pad_rows=self.max_batch * rows if self.deterministic else None
        )
        latents = denoiser.denoise(jobs)
        results = []
        for request, latent in zip(requests, latents, strict=True):
            session = self.sessions[request["render_id"]]
            index = request["index"]
            base = {"render_id": request["render_id"], "index": index}
            if not torch.isfinite(latent).all():
                results.append(
                    {**base, "error": f"frame {index}: the model produced non-finite values"}
                )
                continue
            results.append(
                {
                    **base,
                    "latent": latent.float().cpu().numpy(),
                    "frame": session.finish(index, latent),
                    "pose_map": session.pose_map(index),
                    "mask": session.mask(index),
                }
            )
        return results

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(np.array(array))  # a writable copy
