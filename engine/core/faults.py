"""Fault classes of the engine core: input faults fail their render at once, infrastructure
faults are retried (up to ``cluster.max_attempts``), and nothing ends the core or another render.

| fault                                                        | kind  | what happens            |
|--------------------------------------------------------------|-------|-------------------------|
| bad pose / plate / mask file, render-level config error      | input | render FAILED at once   |
| untrusted SAM mask with ``background.fallback_to_pose`` off   | input | render FAILED at once   |
| inputs changed since the render started (resume fingerprint) | input | render FAILED at once   |
| non-finite model output                                      | input | render FAILED at once   |
| worker died, node lost, out of memory, constructor failed    | infra | retried, then FAILED    |
| any other exception in a worker                              | infra | retried, then FAILED    |
"""

from __future__ import annotations

from typing import Literal

from engine.config import ConfigError

Kind = Literal["input", "infra"]


class NonFiniteOutputError(ValueError):
    """The model produced NaN or inf for a frame."""


class InputsChangedError(ConfigError):
    """A resumed render's inputs differ from those its persisted frames were made with."""


def _input_types() -> tuple[type[BaseException], ...]:
    from PIL import UnidentifiedImageError

    from engine.background import SamMaskError
    from engine.pose import PoseError

    return (
        SamMaskError,
        ConfigError,
        PoseError,
        NonFiniteOutputError,
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        UnidentifiedImageError,
        UnicodeDecodeError,
    )


def classify(error: BaseException) -> Kind:
    """``input`` for faults of the render's own inputs, else ``infra`` (worth a retry).

    Out-of-memory errors are infrastructure faults even though torch raises them as
    ``RuntimeError`` subclasses; a plain ``ValueError`` raised by our validation is an input fault.
    """
    if isinstance(error, MemoryError) or type(error).__name__ in ("OutOfMemoryError",):
        return "infra"
    if isinstance(error, _input_types()):
        return "input"
    if type(error) is ValueError:
        return "input"
    return "infra"


def describe(error: BaseException) -> str:
    """One line: the exception's message, prefixed with its type when that adds information."""
    text = "; ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    name = type(error).__name__
    if not text:
        return name
    return text if isinstance(error, (ConfigError,)) else f"{name}: {text}"
