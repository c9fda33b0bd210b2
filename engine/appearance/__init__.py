"""Intra-frame alignment: a per-character appearance LoRA (Dancing Avatar, arXiv 2308.07749).

The character (identifier token + refined clothes/face prompts) is rendered by the base model on
K canonical poses (front, three-quarter, upper body, face close-up), a DreamBooth-style LoRA is
trained on those references, stored content-addressed, and loaded into the frame chain's UNet
under a stable name, so every frame of the video shows the same person. Typical use::

    adapter = get_or_train_adapter(chain, refined, cfg.appearance, cache_root)
    load_adapter(chain.parts.unet, adapter.path, adapter.name)   # now active
    ... engine.batching.denoise_frame(chain, ...) ...
    activate(chain.parts.unet, None)                             # back to the base model

Modules: :mod:`.poses` (canonical poses), :mod:`.references` (reference synthesis),
:mod:`.train` (the LoRA training loop), :mod:`.adapter` (artifact + loading),
:mod:`.cache` (content-addressed cache), :mod:`.lora` (peft plumbing).
"""

from engine.appearance.adapter import (
    ADAPTER_FILE,
    META_FILE,
    activate,
    is_complete,
    load_adapter,
    read_adapter,
    remove_adapter,
    save_adapter,
    text_encoder_kwargs,
)
from engine.appearance.cache import Adapter, adapter_key, adapter_name, get_or_train_adapter
from engine.appearance.lora import TEXT_TARGETS, UNET_TARGETS, active_adapter, loaded_adapters
from engine.appearance.poses import VIEWS, canonical_poses, mirror, reference_pose, reference_views
from engine.appearance.references import (
    class_prompt,
    reference_pose_maps,
    reference_prompts,
    reference_settings,
    synthesize_references,
)
from engine.appearance.train import AdapterWeights, train_appearance_lora

__all__ = [
    "ADAPTER_FILE",
    "META_FILE",
    "TEXT_TARGETS",
    "UNET_TARGETS",
    "VIEWS",
    "Adapter",
    "AdapterWeights",
    "activate",
    "active_adapter",
    "adapter_key",
    "adapter_name",
    "canonical_poses",
    "class_prompt",
    "get_or_train_adapter",
    "is_complete",
    "load_adapter",
    "loaded_adapters",
    "mirror",
    "read_adapter",
    "reference_pose",
    "reference_pose_maps",
    "reference_prompts",
    "reference_settings",
    "reference_views",
    "remove_adapter",
    "save_adapter",
    "synthesize_references",
    "text_encoder_kwargs",
    "train_appearance_lora",
]
