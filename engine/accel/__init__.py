"""Accelerated denoise steps (``model.backend``): eager, torch.compile, ONNX, TensorRT.

:class:`DenoiseStep` maps one batch (:class:`StepInputs`) to noise predictions; every back-end
keeps the cross-frame attention and per-row LoRA (as runtime inputs in the compiled graphs).
The eager step also runs DeepCache (:mod:`engine.accel.deepcache`, ``sampler.deep_cache``).
"""

from engine.accel.backends import (
    BACKENDS,
    BackendUnavailableError,
    default_cache_dir,
    make_step,
    step_for,
    use_step,
)
from engine.accel.deepcache import DeepFeatures
from engine.accel.step import DenoiseStep, EagerStep, GraphStep, StepInputs

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "DeepFeatures",
    "DenoiseStep",
    "EagerStep",
    "GraphStep",
    "StepInputs",
    "default_cache_dir",
    "make_step",
    "step_for",
    "use_step",
]
