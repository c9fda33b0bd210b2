"""Thin Ray actors over :mod:`engine.core.work`: each builds its models once, in ``__init__``
(after Ray assigned its GPU), and serves many characters. Inputs and outputs are plain data that
travel through the object store; no shared filesystem is assumed.

- :class:`Refiner` (CPU): prompt refinement.
- :class:`AppearanceTrainer`: reference synthesis + LoRA training → :class:`AdapterPayload`.
- :class:`BackgroundWorker`: scene at pose 0 (with the LoRA) + SAM + inpainting → PlateResult.
- :class:`Sampler`: the frame chain; denoises batches of frames of many characters.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import ray

from engine.config import RenderConfig
from engine.core.work import (
    AdapterPayload,
    FrameOutcome,
    FrameWork,
    SamplerState,
    appearance_stage,
    background_stage,
    build_chain,
    peak_rss_mb,
    refine_stage,
)
from engine.storage import Storage


class _Worker:
    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote
class Refiner(_Worker):
    """Prompt refinement (template offline, or an OpenAI-compatible server)."""

    def refine(self, config: dict[str, Any]) -> dict[str, Any]:
        return refine_stage(RenderConfig.model_validate(config))


@ray.remote
class AppearanceTrainer(_Worker):
    """Synthesizes a character's references and trains its appearance LoRA (cached)."""

    def __init__(self, model: dict[str, Any]):
        self.chain = build_chain(model)

    def adapter(
        self, config: dict[str, Any], refined: dict[str, Any], shared: Storage | None = None
    ) -> AdapterPayload:
        cfg = RenderConfig.model_validate(config)
        return appearance_stage(self.chain, cfg, refined, shared)


@ray.remote
class BackgroundWorker(_Worker):
    """Makes background plates (SAM / inpainting models built per mask source on first use)."""

    def __init__(self, model: dict[str, Any]):
        self.chain = build_chain(model)
        self.models: dict[str, Any] = {}

    def plate(
        self,
        config: dict[str, Any],
        refined: dict[str, Any],
        keypoints0: np.ndarray,
        adapter: AdapterPayload | None,
    ) -> Any:
        cfg = RenderConfig.model_validate(config)
        return background_stage(self.chain, self.models, cfg, refined, keypoints0, adapter)


@ray.remote
class Sampler(_Worker):
    """The frame chain's models; denoises ready frames of many characters in one batch.

    Sessions (per-render constants) open lazily from the session specs passed with each batch
    (object refs, fetched once), so a restarted Sampler resumes any chain with nothing re-sent.
    """

    def __init__(self, model: dict[str, Any], max_batch: int, padding: str = "bucket"):
        self.state = SamplerState(build_chain(model), max_batch, padding)

    def denoise(
        self, work: list[FrameWork], specs: dict[str, list[Any]]
    ) -> tuple[list[FrameOutcome], float, dict[str, int]]:
        """→ (outcomes, peak RSS in MB, bytes held per open render). ``specs`` maps each render
        id to ``[ObjectRef of its SessionSpec]`` (wrapped so Ray does not resolve it eagerly)."""
        outcomes = self.state.denoise(work, lambda rid: ray.get(specs[rid][0], timeout=600))
        self.state.deliver(outcomes)  # PNG + latent encoded here; written here when shared
        return outcomes, peak_rss_mb(), self.state.memory()

    def close(self, render_id: str) -> None:
        self.state.close(render_id)

    def sessions(self) -> list[str]:
        return sorted(self.state.sessions)

    def adapters(self) -> list[str]:
        from engine.appearance import loaded_adapters

        return sorted(loaded_adapters(self.state.chain.parts.unet))
