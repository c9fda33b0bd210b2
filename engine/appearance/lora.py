"""peft plumbing: add, remove, switch and snapshot LoRA adapters on a UNet or a text encoder.

Every helper works on any ``nn.Module`` whose LoRA layers peft injected (diffusers' UNet via
``add_adapter``, transformers' CLIP text encoder likewise), by walking peft's
``BaseTunerLayer`` modules. Adapters are added under explicit names so several characters can
coexist on one resident UNet; the active one is switched by name, or all are disabled (base
model). Inference state is kept clean: LoRA parameters never require grad outside training and
the LoRA modules are in eval mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.utils import recurse_remove_peft_layers
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
"""UNet modules that get LoRA: every attention's q/k/v/out projections (self and cross)."""
TEXT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
"""CLIP text encoder modules that get LoRA (``appearance.train_text_encoder``)."""


def lora_config(rank: int, alpha: float, targets: Sequence[str]) -> LoraConfig:
    """The LoRA of the appearance stage: rank ``rank``, scaling ``alpha / rank``, no dropout,
    gaussian A / zero B initialisation (an untrained adapter is the identity)."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; float works (alpha/r)
        target_modules=list(targets),
        init_lora_weights="gaussian",
        lora_dropout=0.0,
    )


_CACHE = "_avatar_lora_layers"


def lora_layers(module: nn.Module) -> list[BaseTunerLayer]:
    """peft's LoRA layers inside ``module``, cached on it: walking a UNet's thousands of modules
    on every denoising step was the bulk of per-row LoRA's cost. :func:`add_lora` and
    :func:`remove_lora` (the only injectors here) invalidate the cache."""
    cached = module.__dict__.get(_CACHE)
    if cached is None:
        cached = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
        module.__dict__[_CACHE] = cached
    return cached


def _forget_layers(module: nn.Module) -> None:
    module.__dict__.pop(_CACHE, None)
    module.__dict__[_GENERATION] = lora_generation(module) + 1


def refresh(module: nn.Module) -> None:
    """Forget ``module``'s cached LoRA layers after another library injected or removed some
    (diffusers' ``load_lora_into_unet``, peft's ``inject_adapter_in_model``)."""
    _forget_layers(module)


_GENERATION = "_avatar_lora_generation"


def lora_generation(module: nn.Module) -> int:
    """A counter bumped whenever :func:`add_lora` / :func:`remove_lora` change ``module``'s
    adapters (compiled steps cache packed LoRA matrices by it)."""
    return int(module.__dict__.get(_GENERATION, 0))


_layers = lora_layers


def loaded_adapters(module: nn.Module) -> list[str]:
    """Names of the adapters on ``module`` (sorted; empty when it has no LoRA)."""
    names: set[str] = set()
    for layer in _layers(module):
        names.update(getattr(layer, "lora_A", {}).keys())
    return sorted(names)


def _freeze(module: nn.Module) -> None:
    """LoRA modules in eval mode and not trainable (peft creates them in train mode)."""
    for layer in _layers(module):
        assert isinstance(layer, nn.Module)
        layer.eval()
        for p in layer.parameters():
            p.requires_grad_(False)


def add_lora(module: nn.Module, config: LoraConfig, name: str) -> None:
    """Inject an adapter ``name`` into ``module``; it becomes the only active adapter, frozen.

    Raises:
        ValueError: ``name`` is already on ``module``.
    """
    if name in loaded_adapters(module):
        raise ValueError(
            f"adapter {name!r} is already loaded on {type(module).__name__}: activate it, or "
            "remove_adapter() it first to replace it"
        )
    add = getattr(module, "add_adapter", None)
    _forget_layers(module)
    with warnings.catch_warnings():  # several adapters on one model is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        if add is not None:  # diffusers / transformers: also keeps their peft_config bookkeeping
            add(config, adapter_name=name)
        else:
            inject_adapter_in_model(config, module, adapter_name=name)
    _forget_layers(module)
    activate_lora(module, name)


def remove_lora(module: nn.Module, name: str) -> None:
    """Delete adapter ``name`` (no-op if absent). If it was active, no adapter is active after
    (base model; peft would silently pick another). When none is left, the LoRA layers are
    unwrapped: the module's state dict keys and outputs are exactly the base model's again."""
    if name not in loaded_adapters(module):
        return
    for layer in _layers(module):
        if name in layer.active_adapters:
            layer.set_adapter([a for a in layer.active_adapters if a != name], inference_mode=True)
        layer.delete_adapter(name)
    config = getattr(module, "peft_config", None)
    if isinstance(config, dict):
        config.pop(name, None)
    if not loaded_adapters(module):
        recurse_remove_peft_layers(module)
        _forget_layers(module)
        if hasattr(module, "peft_config"):
            del module.peft_config
        if hasattr(module, "_hf_peft_config_loaded"):
            setattr(module, "_hf_peft_config_loaded", False)  # noqa: B010  (nn.Module typing)
    _freeze(module)


def activate_lora(module: nn.Module, name: str | None) -> None:
    """Make ``name`` the only active adapter of ``module``, or disable all (``None`` = base).

    Raises:
        ValueError: ``name`` is not loaded on ``module`` (the message lists what is).
    """
    layers = _layers(module)
    if name is not None and name not in loaded_adapters(module):
        raise ValueError(
            f"adapter {name!r} is not loaded on {type(module).__name__} (loaded: "
            f"{loaded_adapters(module) or 'none'}); load_adapter() it first"
        )
    for layer in layers:
        if name is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(name, inference_mode=True)
    _freeze(module)


def active_adapter(module: nn.Module) -> str | None:
    """The active adapter of ``module``, or None (no LoRA, or adapters disabled)."""
    state = snapshot(module)
    if state is None or not state.enabled or not state.active:
        return None
    return state.active[0]


@dataclass(frozen=True)
class AdapterState:
    """Which adapters of a module are active and whether adapters are enabled."""

    active: tuple[str, ...]
    enabled: bool


def snapshot(module: nn.Module) -> AdapterState | None:
    """The adapter state of ``module`` (None when it has no LoRA layers)."""
    layers = _layers(module)
    if not layers:
        return None
    first = layers[0]
    return AdapterState(tuple(first.active_adapters), not first.disable_adapters)


def restore(module: nn.Module, state: AdapterState | None) -> None:
    """Put back a :func:`snapshot` (adapters deleted since are skipped)."""
    if state is None or not _layers(module):
        return
    loaded = set(loaded_adapters(module))
    active = [name for name in state.active if name in loaded]
    for layer in _layers(module):
        layer.enable_adapters(True)
        if active:
            layer.set_adapter(active, inference_mode=True)
        layer.enable_adapters(state.enabled and bool(active))
    _freeze(module)


@contextmanager
def base_model(*modules: nn.Module | None) -> Iterator[None]:
    """Run the block with every adapter of ``modules`` disabled, then restore their state."""
    present = [m for m in modules if m is not None]
    states = [snapshot(m) for m in present]
    try:
        for m, state in zip(present, states, strict=True):
            if state is not None:
                activate_lora(m, None)
        yield
    finally:
        for m, state in zip(present, states, strict=True):
            restore(m, state)


@contextmanager
def prompt_adapter(encoders: Sequence[nn.Module], name: str | None) -> Iterator[None]:
    """Run the block with adapter ``name`` active on each of ``encoders`` that has it (the
    others, and all for ``None``, run as the base model), then restore their state."""
    present = [m for m in encoders if snapshot(m) is not None]
    states = [snapshot(m) for m in present]
    try:
        for m in present:
            activate_lora(m, name if name in loaded_adapters(m) else None)
        yield
    finally:
        for m, state in zip(present, states, strict=True):
            restore(m, state)


def lora_parameters(module: nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The parameters of adapter ``name`` on ``module`` (names contain ``lora_`` and ``.name.``)."""
    marker = f".{name}."
    return [p for n, p in module.named_parameters() if "lora_" in n and marker in f"{n}."]


BASE = "__base__"
"""peft's name for "no adapter" in a mixed batch."""


@contextmanager
def per_row_adapters(module: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Run the block with adapter ``names[i]`` applied to batch row ``i`` (None = base model).

    peft's LoRA layers accept ``adapter_names`` (one per row) and add each row's own low-rank
    update in one batched forward; a forward pre-hook on every LoRA layer injects the list, so it
    reaches the layers through diffusers' attention code. Every named adapter is made active for
    the block (a layer only applies active adapters) and the previous state is restored after.
    With classifier-free guidance the list covers every row of the batch, in batch order.

    Cost per call (it runs on every denoising step): nothing when ``module`` has no LoRA; when no
    row names an adapter, only a switch to the base model if an adapter is active; otherwise one
    hook per LoRA layer, and an adapter switch only when the active set differs.
    """
    rows = [BASE if n is None else n for n in names]
    wanted = sorted({n for n in rows if n != BASE})
    layers = lora_layers(module)
    missing = set(wanted) - set(loaded_adapters(module) if layers else ())
    if missing:
        raise ValueError(f"adapters {sorted(missing)} are not loaded on {type(module).__name__}")
    if not layers:
        yield
        return
    if not wanted:
        with _switched(layers, None):
            yield
        return

    def inject(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "adapter_names": rows}

    hooks = [layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in layers]  # type: ignore[attr-defined]
    try:
        with _switched(layers, wanted):
            yield
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def _switched(layers: list[BaseTunerLayer], active: list[str] | None) -> Iterator[None]:
    """Inside the block ``layers`` apply exactly ``active`` (None = adapters disabled); the
    previous state is put back after. No-op when the state already matches."""
    first = layers[0]
    before = (list(first.active_adapters), not first.disable_adapters)
    target = (active if active is not None else before[0], active is not None)
    if (before[0] == target[0] or not target[1]) and before[1] == target[1]:
        yield
        return
    _set_state(layers, *target)
    try:
        yield
    finally:
        _set_state(layers, *before)


def _set_state(layers: list[BaseTunerLayer], active: list[str], enabled: bool) -> None:
    """Activate ``active`` on every layer and enable or disable adapters.

    Sets peft's two state fields directly (peft 0.21, pinned): its public setters also walk every
    LoRA parameter to set ``requires_grad``, which cost ≈15 % of a tiny denoising step when done
    twice per step. Inference adapters here are frozen once by :func:`_freeze` and stay frozen.
    """
    for layer in layers:
        layer._active_adapter = list(active)  # type: ignore[attr-defined]
        layer._disable_adapters = not enabled  # type: ignore[attr-defined]
