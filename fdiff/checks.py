"""Argument checks shared by the package: bad input gets an error that names what was expected."""

from __future__ import annotations

import operator
from typing import Any

__all__ = ["check_int", "check_index"]


def check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    """Return ``value`` as an int in [low, high], or raise TypeError/ValueError naming ``name``.

    Booleans and floats are refused even when they equal an integer: ``True`` or ``2.0`` where
    a count is expected is surely a mistake.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def check_index(index: Any, length: int) -> int:
    """Return ``index`` as an int in [0, length), or raise TypeError/IndexError."""
    try:
        i = operator.index(index)
    except TypeError:
        raise TypeError(f"index must be an int, got {type(index).__name__}") from None
    if not 0 <= i < length:
        raise IndexError(f"index {i} out of range for a dataset of {length} items [0, {length})")
    return i
