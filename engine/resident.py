"""One resident model set per process, shared by sampling, LoRA training and plate work.

Today's Ray layout gives the Sampler, the AppearanceTrainer and the BackgroundWorker a copy of
the UNet + ControlNet + VAE + text encoder each; :class:`ResidentModels` holds one copy and runs
all three kinds of work on it, one at a time (a Ray actor serves one call at a time), like
vLLM's one worker per device. The stages only borrow the models: LoRA training removes its
temporary adapter itself (``train_appearance_lora``), and :meth:`ResidentModels._borrowed`
removes the adapter a plate loaded unless an open Sampler session uses it and restores the
active adapter state, so the frames a batch denoises do not depend on what ran before it.

No Ray here (``actors/devices.py`` wraps it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from engine.chain import FrameChain
from engine.config import ModelConfig, RenderConfig
from engine.core.work import (
    AdapterPayload,
    FrameOutcome,
    FrameWork,
    SamplerState,
    SessionSpec,
    appearance_stage,
    background_stage,
    build_chain,
    peak_rss_mb,
)
from engine.storage import Storage

COMPONENTS = ("unet", "controlnet", "vae", "text_encoder")
"""The base model's components every stage shares."""


class ResidentModels:
    """The base model loaded once, and the Sampler's sessions, LoRA training and plates on it.

    Args:
        model: The ``model`` section (built with :func:`~engine.core.work.build_chain`).
        max_batch: Most frames of one denoise batch (``cluster.max_batch``).
        padding: The batch padding policy (:func:`~engine.core.work.padding_policy`).
        chain: Already built models to share instead of building them.
    """

    def __init__(
        self,
        model: ModelConfig | dict[str, Any],
        max_batch: int,
        padding: str = "bucket",
        chain: FrameChain | None = None,
    ):
        self.chain = chain if chain is not None else build_chain(model)
        self.loads = 1 if chain is None else 0
        """How many times this set built the base model (1: once per process)."""
        self.sampler = SamplerState(self.chain, max_batch, padding)
        self.plate_models: dict[str, Any] = {}
        """mask source → (inpainting pipeline sharing the VAE/text encoder, SAM predictor)."""
        self.runs = {"training": 0, "background": 0, "sampling": 0}

    # -- the three kinds of work ------------------------------------------------------------------

    def adapter(
        self, config: RenderConfig, refined: dict[str, Any], shared: Storage | None = None
    ) -> AdapterPayload:
        """The character's appearance LoRA (trained on the shared UNet, then taken off it)."""
        with self._borrowed("training"):
            return appearance_stage(self.chain, config, refined, shared)

    def plate(
        self,
        config: RenderConfig,
        refined: dict[str, Any],
        keypoints0: np.ndarray,
        adapter: AdapterPayload | None,
    ) -> Any:
        """The character's background plate (:class:`~engine.background.PlateResult`)."""
        with self._borrowed("background"):
            return background_stage(
                self.chain, self.plate_models, config, refined, keypoints0, adapter
            )

    def denoise(
        self, work: list[FrameWork], spec_of: Callable[[str], SessionSpec]
    ) -> list[FrameOutcome]:
        """One batch of frames of many renders (:meth:`SamplerState.denoise`)."""
        self.runs["sampling"] += 1
        return self.sampler.denoise(work, spec_of)

    def close(self, render_id: str) -> None:
        """Free a render's Sampler session (and its adapter when no other session uses it)."""
        self.sampler.close(render_id)

    @contextmanager
    def _borrowed(self, stage: str) -> Iterator[None]:
        """Run a prepare stage on the shared models, then give them back as the Sampler's
        sessions need them, whether the stage succeeded or raised: adapters it loaded that no
        open session uses (a plate's LoRA, a training adapter a failed step left) are removed
        and the UNet's / text encoders' active adapters restored."""
        from engine.appearance import loaded_adapters, remove_adapter, text_encoder_kwargs
        from engine.appearance.lora import restore, snapshot

        parts = self.chain.parts
        modules = [parts.unet, *parts.text_encoders()]
        before = set(loaded_adapters(parts.unet))
        states = [snapshot(m) for m in modules]
        self.runs[stage] += 1
        try:
            yield
        finally:
            in_use = self.sampler.adapters_in_use() | before
            loaded = {name for m in modules for name in loaded_adapters(m)}
            for name in loaded - in_use:
                remove_adapter(parts.unet, name, **text_encoder_kwargs(parts))
            for module, state in zip(modules, states, strict=True):
                restore(module, state)

    # -- what is resident -------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Memory per resident component (bytes of parameters + buffers; modules shared with
        the base model are counted once), adapters loaded, open sessions, work done."""
        from engine.appearance import loaded_adapters

        parts = self.chain.parts
        seen: set[int] = set()
        components = {name: module_bytes(getattr(parts, name), seen) for name in COMPONENTS}
        plates = {}
        for source, (pipe, predictor) in sorted(self.plate_models.items()):
            plates[f"inpaint_unet[{source}]"] = module_bytes(pipe.unet, seen)
            if predictor is not None and isinstance(
                getattr(predictor, "model", None), torch.nn.Module
            ):
                plates[f"sam[{source}]"] = module_bytes(predictor.model, seen)
        adapters = loaded_adapters(parts.unet)
        lora = sum(_lora_bytes(parts.unet, name) for name in adapters)
        return {
            "model": parts.name,
            "loads": self.loads,
            "components_bytes": components,
            "plate_models_bytes": plates,
            "adapters": adapters,
            "adapters_bytes": lora,
            "sessions": len(self.sampler.sessions),
            "sessions_bytes": sum(self.sampler.memory().values()),
            "weights_bytes": sum(components.values()) + sum(plates.values()) + lora,
            "runs": dict(self.runs),
            "peak_rss_mb": peak_rss_mb(),
        }


def module_bytes(module: torch.nn.Module, seen: set[int] | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers not in ``seen`` (tensor ids; updated),
    LoRA layers excluded (they are counted per adapter)."""
    seen = set() if seen is None else seen
    total = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if id(tensor) in seen or "lora_" in name:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def _lora_bytes(module: torch.nn.Module, adapter: str) -> int:
    return sum(
        p.numel() * p.element_size()
        for n, p in module.named_parameters()
        if "lora_" in n and f".{adapter}." in f"{n}."
    )
