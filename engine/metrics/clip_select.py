"""Which CLIP model scores a render, and what its numbers mean (``settings.clip`` / ``clip_note``).

``tiny`` / ``small`` / ``micro`` renders are scored by the random :func:`tiny_clip` offline (micro
ships no CLIP and no hub is reachable); ``sd15`` renders and plain videos by ``model.clip``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.metrics.inputs import MetricsError
from engine.metrics.micro_report import is_micro

if TYPE_CHECKING:
    from engine.config import RenderConfig
    from engine.metrics.clip_score import ClipScorer


def clip_label(clip: ClipScorer) -> str:
    """A short name of a scorer's model (``tiny_clip (random)`` for the random one)."""
    name = getattr(clip.model.config, "_name_or_path", "") or ""
    return name or f"tiny_clip (random, {clip.image_size} px)"


def clip_for(config: RenderConfig | None, name: str | None = None) -> ClipScorer:
    """The CLIP scorer: ``name`` (``tiny`` or a hub id / folder), else the config's preset.

    tiny / small / micro → :func:`tiny_clip` (micro ships no CLIP and no hub is reachable, so its
    CLIP scores are random-model numbers: :func:`clip_note` says so in ``metrics.json``); sd15 or
    no config → ``model.clip`` (ViT-L/14 by default), on the config's device. Loading errors are
    :class:`MetricsError` naming the model and the fix.
    """
    from engine.config import ModelConfig
    from engine.metrics.clip_score import load_clip, tiny_clip

    model = config.model if config is not None else ModelConfig(preset="sd15", device="auto")
    if name == "tiny" or (name is None and model.preset in ("tiny", "small", "micro")):
        return tiny_clip()
    from engine.models.registry import resolve_device

    try:
        return load_clip(
            name or model.clip, resolve_device(model.device), local_files_only=model.offline
        )
    except RuntimeError as exc:
        raise MetricsError(f"{exc}; or pass --clip tiny for offline plumbing") from None


def clip_note(config: RenderConfig | None, clip: ClipScorer) -> str | None:
    """Why a random CLIP scored a preset's render (None when a real one did)."""
    if not clip_label(clip).startswith("tiny_clip"):
        return None
    if is_micro(config):
        return (
            "micro preset: it ships no CLIP and scores offline with the random tiny CLIP, so "
            "Text alignment and the CLIP consistencies carry no meaning; see the micro section"
        )
    return "random tiny CLIP: Text alignment and the CLIP consistencies carry no meaning"
