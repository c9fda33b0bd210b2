"""Content-addressed adapter cache: a character is trained once per (model, prompt, config).

``<cache_root>/adapters/<key>/`` where ``key`` is the sha256 of everything that determines the
adapter: the base model name, the refined prompt (not its provenance), the appearance config,
the reference sampler settings, the negative prompt and :data:`RECIPE_VERSION`. A hit is read
back without touching the models; concurrent trainers of one key are serialised by a lock file
(POSIX) and, failing that, the first atomic rename wins and the others reuse its folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.appearance.adapter import is_complete, read_adapter, save_adapter
from engine.appearance.references import reference_prompts, synthesize_references
from engine.appearance.train import AdapterWeights, train_appearance_lora
from engine.chain import FrameChain
from engine.config import AppearanceConfig, SamplerConfig
from engine.refine import RefinedPrompt

log = logging.getLogger(__name__)

RECIPE_VERSION = "1"
"""Bump when reference synthesis or training changes in a way the key's inputs do not show."""


def adapter_key(
    model_name: str,
    refined: RefinedPrompt,
    config: AppearanceConfig,
    *,
    negative: str | None = None,
    sampler: SamplerConfig | None = None,
) -> str:
    """sha256 hex digest naming the adapter of this character on model ``model_name``.

    ``negative`` defaults to ``refined.negative`` and ``sampler`` to :class:`SamplerConfig`,
    exactly as :func:`get_or_train_adapter` resolves them.
    """
    payload = {
        "recipe": RECIPE_VERSION,
        "model": model_name,
        "refined": refined.model_dump(mode="json", exclude={"source"}),
        # lora / lora_scale import an adapter instead of training one: not part of a trained key
        "appearance": config.model_dump(mode="json", exclude={"lora", "lora_scale"}),
        "negative": refined.negative if negative is None else negative,
        "sampler": (sampler or SamplerConfig()).model_dump(mode="json"),
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def adapter_name(key: str) -> str:
    """The stable adapter name of cache key ``key`` on a UNet (``appearance_<12 hex>``)."""
    return f"appearance_{key[:12]}"


@dataclass
class Adapter:
    """A cached appearance adapter."""

    key: str
    """Content hash (see :func:`adapter_key`)."""
    name: str
    """Adapter name to load it under (:func:`adapter_name` of the key)."""
    path: Path
    """Its folder, ``<cache_root>/adapters/<key>``."""
    weights: AdapterWeights
    trained: bool
    """True if this call trained it, False on a cache hit."""


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone guards the folder
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def get_or_train_adapter(
    chain: FrameChain,
    refined: RefinedPrompt,
    config: AppearanceConfig,
    cache_root: Path,
    *,
    progress: bool = False,
    negative: str | None = None,
    sampler: SamplerConfig | None = None,
) -> Adapter:
    """The character's adapter from the cache, or synthesize references, train and store it.

    Args:
        chain: Resident frame chain (its models are left as they were).
        refined: The character's refined prompt; its identifier must be ``config.identifier``.
        config: The ``appearance`` section.
        cache_root: Root of the caches (``RenderConfig.cache_dir`` resolved by the caller).
        progress: Show tqdm bars for the references and the training.
        negative: Negative prompt of the reference renders (default ``refined.negative``).
        sampler: Sampler of the reference renders (default :class:`SamplerConfig`).
    """
    if refined.identifier != config.identifier:
        raise ValueError(
            f"the refined prompt names the character {refined.identifier!r} but "
            f"appearance.identifier is {config.identifier!r}: refine with "
            "identifier=config.appearance.identifier"
        )
    negative = refined.negative if negative is None else negative
    key = adapter_key(chain.parts.name, refined, config, negative=negative, sampler=sampler)
    folder = Path(cache_root) / "adapters" / key
    with _lock(folder.parent / f".{key}.lock"):
        if is_complete(folder):
            log.info("appearance adapter %s: cache hit", key[:12])
            return Adapter(key, adapter_name(key), folder, read_adapter(folder), trained=False)
        weights, images = _train(chain, refined, config, negative, sampler, progress)
        weights.metadata.update(
            key=key,
            name=adapter_name(key),
            refined=refined.model_dump(mode="json"),
            negative=negative,
            sampler=(sampler or SamplerConfig()).model_dump(mode="json"),
        )
        try:
            save_adapter(weights, folder, images=images)
        except FileExistsError:
            if not is_complete(folder):
                raise
            log.info("appearance adapter %s: stored concurrently, reusing it", key[:12])
    return Adapter(key, adapter_name(key), folder, weights, trained=True)


def _train(
    chain: FrameChain,
    refined: RefinedPrompt,
    config: AppearanceConfig,
    negative: str,
    sampler: SamplerConfig | None,
    progress: bool,
) -> tuple[AdapterWeights, list]:
    """References (+ class images with prior preservation), then the LoRA."""
    images = synthesize_references(
        chain, refined, config, negative=negative, sampler=sampler, progress=progress
    )
    class_images = class_prompts = None
    if config.prior_preservation:
        class_images = synthesize_references(
            chain,
            refined,
            config,
            negative=negative,
            sampler=sampler,
            prior=True,
            progress=progress,
        )
        class_prompts = reference_prompts(refined, config, prior=True)
    weights = train_appearance_lora(
        chain.parts,
        images,
        reference_prompts(refined, config),
        config,
        class_images=class_images,
        class_prompts=class_prompts,
        progress=progress,
    )
    return weights, images
