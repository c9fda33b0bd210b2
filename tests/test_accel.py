"""Compiled denoise steps (engine/accel): the ONNX graph equals eager at any batch size and
reference count, with per-row LoRA as runtime inputs; unavailable back-ends fail in one line."""

from __future__ import annotations

import pytest
import torch
from accel_helpers import random_step_inputs

from engine.accel import BackendUnavailableError, EagerStep, StepInputs, make_step
from engine.appearance.lora import UNET_TARGETS, add_lora, lora_config

pytest.importorskip("onnxruntime", reason="the onnx extra (onnx, onnxruntime) is not installed")

TOL = 1e-4
"""Max abs error of a compiled step vs eager (fp32, CPU); measured ≈1.5e-6, outputs ≈1."""


@pytest.fixture(scope="module")
def chain():
    """A private tiny chain (adapters get loaded on it) with three random-B LoRA adapters."""
    from engine.chain import FrameChain
    from engine.config import ModelConfig
    from engine.models.registry import build_components

    parts = build_components(ModelConfig(preset="tiny", device="cpu", seed=1))
    chain = FrameChain(parts)
    g = torch.Generator().manual_seed(0)
    for i, rank in enumerate((4, 2, 4)):  # a smaller rank is zero-padded in the graph
        add_lora(parts.unet, lora_config(rank, rank, UNET_TARGETS), f"char{i}")
        for name, p in parts.unet.named_parameters():
            if f"lora_B.char{i}." in name:
                p.data.normal_(0.0, 0.2, generator=g)
    return chain


DISTINCT = torch.tensor([[1, 2], [2, 0], [0, 1]])
"""Reference slots of 3 rows, all distinct and none the row itself."""


def batch(rows: int, seed: int, *, kv: bool, adapters=None, refs=None) -> StepInputs:
    inputs = random_step_inputs(rows, seed, kv=kv, adapters=adapters, refs=refs)
    if refs is None and inputs.ref_index is not None:
        inputs.ref_index[0] = 0  # a row whose slots name itself: plain self-attention
        inputs.ref_index[1] = 0  # a repeated reference: attended to once
    return inputs


@torch.no_grad()
def test_one_onnx_export_runs_batch_2_and_8_like_eager(chain, tmp_path):
    step = make_step("onnx", chain.parts, chain.context, cache_dir=tmp_path)
    eager = EagerStep(chain.parts, chain.context)
    # exported from distinct slots, then fed repeated ones: the slot mask must be in the graph
    for rows, refs in ((3, DISTINCT), (2, None), (8, None)):
        inputs = batch(rows, rows, kv=True, refs=refs)
        err = (step(inputs) - eager(inputs)).abs().max().item()
        assert err < TOL, f"batch {rows}: max abs error {err:.2e}"
    assert len(list((tmp_path / "onnx").iterdir())) == 1  # one graph served both batch sizes


@torch.no_grad()
def test_lora_as_runtime_inputs_matches_peft_per_row(chain, tmp_path):
    names = ["char0", None, "char1", "char2", None, "char0"]
    step = make_step("onnx", chain.parts, chain.context, cache_dir=tmp_path)
    eager = EagerStep(chain.parts, chain.context)
    inputs = batch(6, 3, kv=True, adapters=names)
    want = eager(inputs)
    base = eager(batch(6, 3, kv=True))
    got = step(inputs)
    assert (want - base)[[0, 2, 3, 5]].abs().amax((1, 2, 3)).min() > 100 * TOL  # LoRA matters
    err = (got - want).abs().max().item()
    assert err < TOL, f"mixed batch of 3 adapters + base rows: max abs error {err:.2e}"
    # the same graph, another mix and adapter count
    inputs = batch(4, 4, kv=True, adapters=["char2", "char2", None, None])
    assert (step(inputs) - eager(inputs)).abs().max().item() < TOL


def test_unavailable_backends_fail_in_one_line(chain, monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: tensorrt may be available")
    with pytest.raises(BackendUnavailableError) as e:
        make_step("tensorrt", chain.parts, chain.context, cache_dir=tmp_path)
    assert "\n" not in str(e.value) and "model.backend" in str(e.value)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'dancing-avatar\[onnx\]'"):
        make_step("onnx", chain.parts, chain.context, cache_dir=tmp_path)


def test_tensorrt_profiles_cover_batch_refs_and_adapters():
    from engine.accel.tensorrt_step import profile_shapes

    names = ["sample", "ref_index", "lora_a", "lora_index"]
    example = [torch.zeros(3, 4, 8, 8), torch.zeros(3, 2), torch.zeros(2, 100), torch.zeros(3)]
    shapes = profile_shapes(names, example, {"rows": 32, "refs": 2, "adapters": 8})
    assert shapes["sample"] == ((1, 4, 8, 8), (32, 4, 8, 8), (32, 4, 8, 8))
    assert shapes["ref_index"] == ((1, 1), (32, 2), (32, 2))
    assert shapes["lora_a"] == ((1, 100), (9, 100), (9, 100))
    assert shapes["lora_index"][0] == (1,) and shapes["lora_index"][2] == (32,)


@torch.no_grad()
def test_tensorrt_step_matches_eager(tmp_path):
    pytest.importorskip(
        "tensorrt", reason="TensorRT cannot be installed on the CPU-only build machine"
    )
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU; none here")
    from engine.chain import FrameChain
    from engine.config import ModelConfig
    from engine.models.registry import build_components

    chain = FrameChain(build_components(ModelConfig(preset="tiny", device="cuda")))
    step = make_step("tensorrt", chain.parts, chain.context, cache_dir=tmp_path)
    eager = EagerStep(chain.parts, chain.context)
    for rows in (2, 8):
        inputs = batch(rows, rows, kv=True)
        for name in ("sample", "timestep", "text", "pose", "control_scale", "ref_index"):
            setattr(inputs, name, getattr(inputs, name).cuda())
        err = (step(inputs) - eager(inputs)).abs().max().item()
        assert err < 5e-2, f"fp16 engine, batch {rows}: max abs error {err:.2e}"
