"""The eager step's per-row LoRA (each row's merged weight, or the batched low-rank update for
models too large to merge) equals peft's per-row ``adapter_names`` path, and adds nothing to a
batch where no row has an adapter."""

from __future__ import annotations

import pytest
import torch
from accel_helpers import random_step_inputs

import engine.accel.step as step_module
from engine.accel import EagerStep, StepInputs
from engine.accel.graph import controlnet_unet
from engine.appearance.lora import (
    UNET_TARGETS,
    add_lora,
    lora_config,
    lora_layers,
    per_row_adapters,
    remove_lora,
)

TOL = 1e-5
"""Max abs error vs peft's per-row path (fp32, CPU; the same products, summed in another order)."""


@pytest.fixture(scope="module")
def chain():
    """A private tiny chain with three random-B adapters of ranks 4, 2, 4."""
    from engine.chain import FrameChain
    from engine.config import ModelConfig
    from engine.models.registry import build_components

    chain = FrameChain(build_components(ModelConfig(preset="tiny", device="cpu", seed=1)))
    g = torch.Generator().manual_seed(0)
    for i, rank in enumerate((4, 2, 4)):  # a smaller rank is zero-padded in the packs
        add_lora(chain.parts.unet, lora_config(rank, rank, UNET_TARGETS), f"char{i}")
        for name, p in chain.parts.unet.named_parameters():
            if f"lora_B.char{i}." in name:
                p.data.normal_(0.0, 0.2, generator=g)
    return chain


def batch(rows: int, seed: int, adapters, *, kv: bool = True) -> StepInputs:
    return random_step_inputs(rows, seed, kv=kv, adapters=adapters)


def peft_per_row(chain, inputs: StepInputs) -> torch.Tensor:
    """The reference: peft's own per-row path (``adapter_names`` injected into every layer)."""
    chain.context.ref_index, chain.context.include_self = inputs.ref_index, inputs.include_self
    try:
        with per_row_adapters(chain.parts.unet, inputs.adapters):
            return controlnet_unet(
                chain.parts.unet,
                chain.parts.controlnet,
                inputs.sample,
                inputs.timestep,
                inputs.text,
                inputs.pose,
                inputs.control_scale,
            )
    finally:
        chain.context.ref_index = None


def hook_count(unet: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in unet.modules())


@torch.no_grad()
@pytest.mark.parametrize("kv", [True, False])
@pytest.mark.parametrize("mode", ["merged", "low-rank"])
def test_eager_runtime_lora_equals_peft_per_row(chain, kv, mode, monkeypatch):
    if mode == "low-rank":  # what a model too large to merge per row (sd15 at 16 rows) runs
        monkeypatch.setattr(step_module, "MERGED_BYTES", 0)
    step = EagerStep(chain.parts, chain.context)
    names = ["char0", None, "char1", "char2", None, "char0"]
    inputs = batch(6, 3, names, kv=kv)
    want = peft_per_row(chain, inputs)
    base = peft_per_row(chain, batch(6, 3, [None] * 6, kv=kv))
    assert (want - base)[[0, 2, 3, 5]].abs().amax((1, 2, 3)).min() > 1e3 * TOL  # LoRA matters
    before = hook_count(chain.parts.unet)
    err = (step(inputs) - want).abs().max().item()
    assert err < TOL, f"3 adapters + base rows: max abs error {err:.2e} vs peft per-row"
    assert {lora.mode for lora in step._loras.values()} == {mode}
    assert hook_count(chain.parts.unet) == before, "the LoRA hooks must be removed after a step"
    inputs = batch(3, 4, ["char2", "char2", None], kv=kv)  # another mix, another rank set
    assert (step(inputs) - peft_per_row(chain, inputs)).abs().max().item() < TOL


@torch.no_grad()
def test_no_adapter_rows_run_the_exact_base_model(chain):
    step = EagerStep(chain.parts, chain.context)
    inputs = batch(4, 5, [None] * 4)
    seen: list[int] = []  # forward hooks on each LoRA layer when it runs (ours alone: 1)
    hooks = [
        layer.register_forward_hook(lambda m, *_: seen.append(len(m._forward_hooks)))
        for layer in lora_layers(chain.parts.unet)
    ]
    try:
        got = step(inputs)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(got, peft_per_row(chain, inputs))
    assert seen == [1] * len(hooks), "a batch without adapters must run no LoRA hook"


@torch.no_grad()
def test_adapters_added_and_removed_between_steps(chain):
    step = EagerStep(chain.parts, chain.context)
    names = ["char0", "char1"]
    step(batch(2, 6, names))  # packs cached
    unet = chain.parts.unet
    add_lora(unet, lora_config(8, 8, UNET_TARGETS), "late")  # a larger rank: a new layout
    for name, p in unet.named_parameters():
        if "lora_B.late." in name:
            p.data.fill_(0.05)
    try:
        inputs = batch(3, 7, ["late", "char0", None])
        assert (step(inputs) - peft_per_row(chain, inputs)).abs().max().item() < TOL
    finally:
        remove_lora(unet, "late")
    inputs = batch(2, 6, names)
    assert (step(inputs) - peft_per_row(chain, inputs)).abs().max().item() < TOL
    with pytest.raises(ValueError, match="'late' is not loaded"):
        step(batch(2, 6, ["late", None]))
