"""Errors of model loading (no heavy imports: the config checker and the CLI import this)."""

from __future__ import annotations


class WeightsNotFoundError(RuntimeError):
    """Real weights could not be found locally or fetched; the message names them and the fix."""


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (at most 300 characters; its type when empty), for a
    one-line error that quotes what a library raised."""
    return (str(e).splitlines() or [type(e).__name__])[0][:300]
