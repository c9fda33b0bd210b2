"""``model.backend``: build the chosen :class:`~engine.accel.step.DenoiseStep`, or fail in one line.

:func:`step_for` gives the sampler (engine/batching.py) the step of a frame chain, built once per
chain from ``chain.parts.backend`` (set by the model registry from ``model.backend``).
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

from engine.accel.step import DenoiseStep, EagerStep
from engine.attention import CrossFrameContext
from engine.models.registry import DiffusionComponents

BACKENDS = ("eager", "compile", "onnx", "tensorrt")


class BackendUnavailableError(RuntimeError):
    """The chosen ``model.backend`` cannot run here; the message names what is missing."""


def default_cache_dir() -> Path:
    """Where exported graphs and engines are cached: ``$AVATAR_CACHE_DIR/accel``."""
    root = os.environ.get("AVATAR_CACHE_DIR") or Path.home() / ".cache" / "dancing-avatar"
    return Path(root).expanduser() / "accel"


MAX_ROWS = 32
"""Rows per call a fixed-range back-end (TensorRT) is built for when nobody says
(:func:`step_for` passes the Sampler's capacity)."""


def make_step(
    backend: str,
    parts: DiffusionComponents,
    context: CrossFrameContext,
    *,
    cache_dir: Path | None = None,
    max_rows: int = MAX_ROWS,
) -> DenoiseStep:
    """The denoise step of ``backend`` over ``parts``; :class:`BackendUnavailableError` (one line,
    naming the fix) when it cannot run here. Never falls back to another back-end."""
    cache = cache_dir or default_cache_dir()
    try:
        if backend == "eager":
            return EagerStep(parts, context)
        if backend == "compile":
            from engine.accel.compile_step import CompileStep

            return CompileStep(parts, context)
        if backend == "onnx":
            from engine.accel.onnx_step import OnnxStep

            return OnnxStep(parts, context, cache)
        if backend == "tensorrt":
            from engine.accel.tensorrt_step import TensorRTStep

            return TensorRTStep(parts, context, cache, max_rows=max_rows)
    except RuntimeError as e:
        raise BackendUnavailableError(str(e)) from None
    raise BackendUnavailableError(f"model.backend={backend!r} is not one of {', '.join(BACKENDS)}")


_STEPS: weakref.WeakKeyDictionary[Any, DenoiseStep] = weakref.WeakKeyDictionary()


def step_for(chain: Any, max_rows: int | None = None) -> DenoiseStep:
    """The denoise step of a :class:`~engine.chain.FrameChain` (``chain.parts``, ``chain.context``),
    built on first use from ``chain.parts.backend`` and kept as long as the chain lives.

    ``max_rows``: the most rows one call will carry (the Sampler's capacity: ``cluster.max_batch``
    x rows per frame); a back-end with a fixed row range (TensorRT's optimisation profile) is
    built for it, and rebuilt if a later caller needs more."""
    step = _STEPS.get(chain)
    limit = getattr(step, "limits", {}).get("rows")
    if step is None or (max_rows is not None and limit is not None and limit < max_rows):
        rows = max_rows if max_rows is not None else MAX_ROWS
        step = make_step(chain.parts.backend, chain.parts, chain.context, max_rows=rows)
        _STEPS[chain] = step
    return step


def use_step(chain: Any, step: DenoiseStep) -> None:
    """Make ``step`` the denoise step of ``chain`` from now on (tests and benchmarks compare
    back-ends on one resident chain)."""
    _STEPS[chain] = step
