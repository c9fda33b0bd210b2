"""The paper's stages before the frame chain: refine → appearance LoRA → background plate.

Each stage writes its artifacts into the render folder and is switchable for ablations
(``alignment.intra_frame``, ``alignment.background``); refinement always runs (the offline
``template`` backend by default) because the later stages consume its fine-grained prompts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.chain import FrameChain
from engine.config import ConfigError, RenderConfig
from engine.pose import PoseSequence
from engine.refine import RefinedPrompt, RefineError, refine

log = logging.getLogger(__name__)

Stage = Callable[[str], AbstractContextManager[None]]


@dataclass
class Preparation:
    """What the frame chain needs from the stages before it."""

    refined: RefinedPrompt
    prompt: str
    """The frame prompt (refined, with the character's identifier)."""
    negative: str
    adapter_name: str | None
    """Name of the active appearance LoRA on the chain's UNet, or None."""
    plate: np.ndarray | None
    """(H, W, 3) uint8 background plate, or None (free background)."""
    record: dict[str, Any] = field(default_factory=dict)
    """Manifest entries: artifacts and their provenance."""


def cache_root(config: RenderConfig) -> Path:
    """Root of the caches: ``cache_dir``, else ``$AVATAR_CACHE_DIR``, else ``~/.cache/dancing-avatar``."""
    default = os.environ.get("AVATAR_CACHE_DIR") or Path.home() / ".cache" / "dancing-avatar"
    return Path(config.cache_dir or default).expanduser()


def prepare(
    chain: FrameChain,
    config: RenderConfig,
    poses: PoseSequence,
    out: Path,
    *,
    stage: Stage,
    progress: bool = False,
) -> Preparation:
    """Run refine → appearance → background for one render; artifacts land in ``out``."""
    with stage("refine"):
        refined = refine_prompt(config)
        _write_json(out / "refined_prompt.json", refined.model_dump(mode="json"))
    prep = Preparation(refined, refined.frame_prompt, config.negative_prompt, None, None)
    prep.record["refined_prompt"] = "refined_prompt.json"
    if config.alignment.intra_frame:
        with stage("appearance"):
            prep.adapter_name = _appearance(chain, config, refined, prep.record, progress)
    if config.alignment.background:
        with stage("background"):
            prep.plate = _background(chain, config, refined, poses, out, prep.record)
    return prep


def refine_prompt(config: RenderConfig) -> RefinedPrompt:
    """The spec's prompt refined by the configured backend (cached under the cache root)."""
    cache = config.refine.cache_dir or cache_root(config) / "refine"
    try:
        return refine(
            config.prompt,
            config=config.refine,
            cache_dir=cache,
            identifier=config.appearance.identifier,
        )
    except RefineError as e:
        raise ConfigError(f"prompt refinement ({config.refine.backend}) failed: {e}") from None


def _appearance(
    chain: FrameChain,
    config: RenderConfig,
    refined: RefinedPrompt,
    record: dict[str, Any],
    progress: bool,
) -> str:
    """Get (train once, then cache) the character's LoRA and activate it on the chain's UNet."""
    from engine.appearance import activate, get_or_train_adapter, load_adapter, loaded_adapters

    adapter = get_or_train_adapter(
        chain,
        refined,
        config.appearance,
        cache_root(config),
        progress=progress,
        sampler=config.sampler,
    )
    unet = chain.parts.unet
    text_encoder = chain.parts.text_encoder if config.appearance.train_text_encoder else None
    if adapter.name in loaded_adapters(unet):
        activate(unet, adapter.name, text_encoder=text_encoder)
    else:
        load_adapter(unet, adapter.path, adapter.name, text_encoder=text_encoder)
    record["adapter"] = {
        "name": adapter.name,
        "path": str(adapter.path),
        "trained": adapter.trained,
    }
    return adapter.name


def release(chain: FrameChain, prep: Preparation) -> None:
    """Return the resident models to the base state after a render (adapters stay loaded)."""
    if prep.adapter_name is not None:
        from engine.appearance import activate

        activate(chain.parts.unet, None, text_encoder=chain.parts.text_encoder)


def _background(
    chain: FrameChain,
    config: RenderConfig,
    refined: RefinedPrompt,
    poses: PoseSequence,
    out: Path,
    record: dict[str, Any],
) -> np.ndarray:
    """The supplied plate (``plate:``) or one made by SAM + inpainting at pose frame 0."""
    if config.plate is not None:
        record["plate"] = {"source": str(config.plate)}
        return load_plate(config.plate, config.width, config.height)
    from engine.background import build_plate_models, make_plate, plate_record, save_plate_result

    pipe, predictor = build_plate_models(config, chain.parts)
    result = make_plate(
        chain, pipe, predictor, poses.keypoints[0], refined, config, seed=config.seed
    )
    files = save_plate_result(result, out / "plate")
    record["plate"] = {"source": "generated", **plate_record(result)}
    record["plate"]["files"] = {k: str(Path(v).relative_to(out)) for k, v in files.items()}
    return result.plate


def load_plate(path: Path, width: int, height: int) -> np.ndarray:
    """A plate image as (height, width, 3) uint8 RGB (resized if its size differs)."""
    try:
        with Image.open(path) as file:
            img = file.convert("RGB")
    except OSError as e:
        raise ConfigError(f"cannot read plate {path}: {e}") from None
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(img).copy()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
