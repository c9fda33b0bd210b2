"""Errors of model loading (no heavy imports: the config checker and the CLI import this)."""

from __future__ import annotations


class WeightsNotFoundError(RuntimeError):
    """Real weights could not be found locally or fetched; the message names them and the fix."""
