"""ONNX export of the denoise step and its onnxruntime runner (``model.backend: onnx``).

One graph per variant (plain / ``kv`` with ``include_self`` / LoRA rank, at one latent size):
batch size, reference count and adapter count are dynamic axes, so the graph exported from a
batch of 2 runs batches of 8. Graphs are cached on disk under a key of the weights' hash, the
variant, torch's version and the opset (:func:`graph_key`), written atomically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from engine.accel.graph import StepModule
from engine.accel.step import GraphStep, Runner, VariantKey
from engine.attention import CrossFrameContext
from engine.models.registry import DiffusionComponents

OPSET = 17
"""ONNX opset of the exported graphs (SDPA and LayerNorm export natively from 17)."""

_DYNAMIC = {
    "sample": {0: "batch"},
    "timestep": {0: "batch"},
    "text": {0: "batch"},
    "pose": {0: "batch"},
    "control_scale": {0: "batch"},
    "ref_index": {0: "batch", 1: "refs"},
    "lora_a": {0: "adapters"},
    "lora_b": {0: "adapters"},
    "lora_index": {0: "batch"},
    "eps": {0: "batch"},
}


def weights_hash(*modules: torch.nn.Module) -> str:
    """blake2b of the modules' non-LoRA state (names, dtypes, shapes, bytes): 16 hex digits."""
    h = hashlib.blake2b(digest_size=8)
    for module in modules:
        for name, tensor in module.state_dict().items():
            if "lora_" in name:
                continue
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def graph_key(module: StepModule, key: VariantKey, model_hash: str) -> str:
    """File-system key of one exported graph."""
    kv, own, rank, hw = key
    slots = len(module.layout.slots) if module.layout else 0
    return (
        f"{model_hash}-{'kv' if kv else 'plain'}{'' if own else '-noself'}-r{rank}x{slots}"
        f"-{hw[0]}x{hw[1]}-torch{torch.__version__.split('+')[0]}-op{OPSET}"
    )


def export_step(module: StepModule, example: list[torch.Tensor], path: Path) -> Path:
    """Export ``module`` traced on ``example`` (its forward's inputs) to ``path``/step.onnx,
    atomically (a folder, so weights over 2 GB can sit beside the graph). Returns the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent))
    names = module.input_names()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            torch.onnx.export(
                module,
                tuple(example),
                str(tmp / "step.onnx"),
                input_names=names,
                output_names=["eps"],
                dynamic_axes={n: _DYNAMIC[n] for n in [*names, "eps"]},
                opset_version=OPSET,
                dynamo=False,  # the tracer: the cross-frame processor's Python runs as written
            )
        try:
            os.replace(tmp, path)
        except OSError:  # another process exported the same graph first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path / "step.onnx"


def require_onnxruntime() -> None:
    """Raise a one-line RuntimeError when onnx / onnxruntime are not installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "model.backend=onnx needs onnx and onnxruntime (pip install 'dancing-avatar[onnx]'); "
            f"use model.backend=eager ({e})"
        ) from None


class OnnxStep(GraphStep):
    """The denoise step exported to ONNX and run by onnxruntime (CPU, or CUDA if available)."""

    name = "onnx"

    def __init__(
        self,
        parts: DiffusionComponents,
        context: CrossFrameContext,
        cache_dir: Path,
        threads: int | None = None,
    ):
        require_onnxruntime()
        super().__init__(parts, context)
        self.cache_dir = Path(cache_dir)
        self.threads = threads or torch.get_num_threads()
        self._hash: str | None = None

    def graph_path(self, module: StepModule, key: VariantKey) -> Path:
        if self._hash is None:
            self._hash = weights_hash(self.parts.unet, self.parts.controlnet)
        return self.cache_dir / "onnx" / graph_key(module, key, self._hash)

    def _build(self, module: StepModule, key: VariantKey) -> Runner:
        folder = self.graph_path(module, key)
        session: list = []

        def run(tensors: list[torch.Tensor]) -> torch.Tensor:
            if not session:  # export lazily, traced on the first real batch of this variant
                file = folder / "step.onnx"
                if not file.exists():
                    export_step(module, tensors, folder)
                module.close()
                session.append(self._session(file))
            feeds = {
                n: t.detach().cpu().numpy()
                for n, t in zip(module.input_names(), tensors, strict=True)
            }
            out = session[0].run(["eps"], feeds)[0]
            return torch.from_numpy(out).to(self.parts.device, self.parts.dtype)

        return run

    def _session(self, file: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        if self.parts.device.type != "cuda":
            providers = ["CPUExecutionProvider"]
        return ort.InferenceSession(str(file), options, providers=providers)
