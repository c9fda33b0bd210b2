"""Prompt refinement: a coarse prompt becomes fine-grained clothes, face and background prompts.

This is the paper's ChatGPT step (Dancing Avatar, arXiv 2308.07749). Two backends share one
interface, ``refine(request) -> RefinedPrompt``:

* ``template`` (default): offline and deterministic, curated tables in
  :mod:`engine.refine.tables`.
* ``openai``: any OpenAI-compatible chat server (OpenAI, vLLM, …), with retries, JSON validation
  and, if ``fallback_to_template`` is set, a fallback to the template backend.

Typical use::

    prompt = refine("a woman in a red dress dancing on a beach", config=cfg.refine,
                    cache_dir=storage / "cache" / "refine")
    prompt.frame_prompt, prompt.appearance_prompts(), prompt.background_prompt
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from engine.config import RefineConfig
from engine.refine.cache import PROMPT_VERSION, RefineCache, cache_key
from engine.refine.openai_backend import SYSTEM_PROMPT, OpenAIRefiner
from engine.refine.schema import AppearancePrompts, RefinedPrompt, RefineError, RefineRequest
from engine.refine.template import TemplateRefiner, compose_full

__all__ = [
    "PROMPT_VERSION",
    "SYSTEM_PROMPT",
    "AppearancePrompts",
    "OpenAIRefiner",
    "RefineCache",
    "RefineError",
    "RefineRequest",
    "RefinedPrompt",
    "Refiner",
    "TemplateRefiner",
    "cache_key",
    "compose_full",
    "make_refiner",
    "refine",
]


class Refiner(Protocol):
    """What every backend provides."""

    name: str

    def refine(self, request: RefineRequest) -> RefinedPrompt:
        """Refine ``request`` into fine-grained prompts."""
        ...


def make_refiner(config: RefineConfig) -> Refiner:
    """The refiner of ``config.backend`` (``template`` or ``openai``)."""
    if config.backend == "template":
        return TemplateRefiner()
    if config.backend == "openai":
        return OpenAIRefiner(config)
    raise RefineError(f"unknown refine.backend {config.backend!r}; use 'template' or 'openai'")


def refine(
    coarse: str,
    *,
    clothes: str | None = None,
    face: str | None = None,
    background: str | None = None,
    config: RefineConfig,
    cache_dir: Path | None,
    identifier: str = "sks",
) -> RefinedPrompt:
    """Refine a coarse prompt (and optional coarse parts) with the backend of ``config``.

    Args:
        coarse: The coarse prompt, e.g. "a woman in a red dress dancing on a beach".
        clothes: Optional coarse clothes description; wins over the coarse prompt.
        face: Optional coarse face/hair description; wins over the coarse prompt.
        background: Optional coarse scene description; wins over the coarse prompt.
        config: The ``refine`` section of the render config.
        cache_dir: Folder of the on-disk cache, or None for no caching. A hit never calls the
            backend; template-fallback results are not cached.
        identifier: The character's rare token for the appearance LoRA.

    Raises:
        pydantic.ValidationError: An input is invalid (empty prompt, bad identifier).
        RefineError: The backend failed and ``config.fallback_to_template`` is false.
    """
    request = RefineRequest(
        coarse=coarse, clothes=clothes, face=face, background=background, identifier=identifier
    )
    cache = RefineCache(cache_dir) if cache_dir is not None else None
    key = cache_key(request, config.backend, config.model)
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    result = make_refiner(config).refine(request)
    if cache is not None and result.source == config.backend:
        cache.put(key, result)
    return result
