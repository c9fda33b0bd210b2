"""``model.backend: tensorrt``: engines built from the exported ONNX step (the [tensorrt] extra).

fp16 engines with one optimisation profile covering 1…``max_rows`` batch rows, 1…``max_refs``
reference slots and 1…``max_adapters`` LoRA adapters (+ the base slot), cached by the graph's key
(weights hash + variant + latent size) + precision + profile + TensorRT version. TensorRT is
imported lazily and needs a CUDA device. Not run on the CPU-only build machine (see README).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.accel.graph import StepModule
from engine.accel.onnx_step import OnnxStep, export_step
from engine.accel.step import GraphStep, Runner, VariantKey
from engine.attention import CrossFrameContext
from engine.models.registry import DiffusionComponents

Shape = tuple[int, ...]


def require_tensorrt(device: torch.device) -> str:
    """TensorRT's version; a one-line RuntimeError when it or a CUDA device is missing."""
    try:
        import tensorrt
    except ImportError as e:
        raise RuntimeError(
            "model.backend=tensorrt needs TensorRT (pip install 'dancing-avatar[tensorrt]') and "
            f"a CUDA GPU; use model.backend=onnx or eager ({e})"
        ) from None
    if device.type != "cuda":
        raise RuntimeError(
            f"model.backend=tensorrt needs model.device=cuda (got {device}); use model.backend=onnx"
        )
    return str(tensorrt.__version__)


def profile_shapes(
    names: list[str], example: list[torch.Tensor], limits: dict[str, int]
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every input: dim 0 of batch inputs 1…rows, ``ref_index`` dim 1
    1…refs, ``lora_a``/``lora_b`` dim 0 1…adapters + 1; opt = max; other dims as ``example``."""
    out = {}
    for name, t in zip(names, example, strict=True):
        lo, hi = list(t.shape), list(t.shape)
        if name in ("lora_a", "lora_b"):
            lo[0], hi[0] = 1, limits["adapters"] + 1
        else:
            lo[0], hi[0] = 1, limits["rows"]
        if name == "ref_index":
            lo[1], hi[1] = 1, limits["refs"]
        out[name] = (tuple(lo), tuple(hi), tuple(hi))
    return out


def build_engine(
    onnx_file: Path, engine_file: Path, profiles: dict[str, tuple[Shape, Shape, Shape]]
) -> None:
    """Parse ``onnx_file``, build an fp16 engine with ``profiles``, write it atomically."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_file} (see its log)")
    tmp = engine_file.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_file)


class TensorRTStep(OnnxStep):
    """The exported step as a TensorRT fp16 engine, run on CUDA tensors."""

    name = "tensorrt"

    def __init__(
        self,
        parts: DiffusionComponents,
        context: CrossFrameContext,
        cache_dir: Path,
        max_rows: int = 32,
        max_refs: int = 2,
        max_adapters: int = 8,
    ):
        if parts.is_sdxl:
            raise RuntimeError(
                "model.backend=tensorrt is not verified for SDXL (its ONNX graph is, "
                "tests/test_sdxl.py; TensorRT engines of it were never built on a GPU here): use "
                "model.backend=onnx or eager"
            )
        self.trt_version = require_tensorrt(parts.device)
        GraphStep.__init__(self, parts, context)  # not OnnxStep's: onnxruntime is not needed
        self.cache_dir, self.threads, self._hash = Path(cache_dir), 1, None
        self.limits = {"rows": max_rows, "refs": max_refs, "adapters": max_adapters}

    def _build(self, module: StepModule, key: VariantKey) -> Runner:
        folder = self.graph_path(module, key)
        limits = "-".join(f"{k}{v}" for k, v in self.limits.items())
        engine_file = folder.with_name(f"{folder.name}-fp16-{limits}-trt{self.trt_version}.plan")
        state: list = []

        def run(tensors: list[torch.Tensor]) -> torch.Tensor:
            names = module.input_names()
            if tensors[0].shape[0] > self.limits["rows"]:
                raise ValueError(
                    f"a batch of {tensors[0].shape[0]} rows exceeds the TensorRT engine's profile "
                    f"(1…{self.limits['rows']} rows, from cluster.max_batch)"
                )
            if not state:
                if not engine_file.exists():
                    onnx_file = folder / "step.onnx"
                    if not onnx_file.exists():
                        export_step(module, tensors, folder)
                    build_engine(
                        onnx_file, engine_file, profile_shapes(names, tensors, self.limits)
                    )
                module.close()
                state.append(_load(engine_file))
            return _execute(state[0], names, tensors)

        return run


def _load(engine_file: Path):
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_file.read_bytes())
    return engine.create_execution_context()


def _execute(context, names: list[str], tensors: list[torch.Tensor]) -> torch.Tensor:
    """Bind contiguous CUDA ``tensors`` to the engine's inputs, run on torch's stream → eps."""
    tensors = [t.contiguous() for t in tensors]
    for name, t in zip(names, tensors, strict=True):
        context.set_input_shape(name, tuple(t.shape))
        context.set_tensor_address(name, t.data_ptr())
    sample = tensors[0]
    eps = torch.empty_like(sample)
    context.set_tensor_address("eps", eps.data_ptr())
    stream = torch.cuda.current_stream(sample.device)
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed (see its log)")
    return eps
