"""Argument checks shared by the package: bad input gets an error that names what was expected.

fdiff's input contract for images, enforced where images enter (the forward process, training,
segmentation, features, inversion, baselines, feature networks): float tensors with every value
finite and in [-1, 1]; integer images are refused, with the conversion to use.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_int", "check_index", "check_t", "check_finite", "check_images"]


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
        raise ValueError(f"{name} must be an int {bounds}, got {value}")
    return value


def check_t(t: Any, schedule) -> int:
    """Return timestep ``t`` as an int in [0, T) of ``schedule``, or raise a ValueError."""
    try:
        value = None if isinstance(t, bool) else operator.index(t)
    except TypeError:
        value = None
    if value is None or not 0 <= value < schedule.num_timesteps:
        raise ValueError(f"t must be an int in [0, {schedule.num_timesteps}), got {t!r}")
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


# Images in [-1, 1]; a little slack for arithmetic on the way (a resize, a float64 round trip).
_RANGE_SLACK = 1e-3


def check_finite(x: Tensor, name: str) -> Tensor:
    """Return ``x`` unchanged, or raise a ValueError that counts its NaN and infinite values."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.is_floating_point() and x.numel():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{name} has {bad} NaN or infinite values of {x.numel()}")
    return x


def check_images(images: Tensor, name: str = "images", ndim: int = 4) -> Tensor:
    """Return ``images`` if they keep fdiff's input contract, else raise a clear error.

    The contract: float tensors (``ndim`` dimensions, (B, C, H, W) by default) with every value
    finite and in [-1, 1]. Integer images are refused rather than guessed at: convert 8-bit ones
    with :func:`fdiff.data.from_uint8`. A batch of at least 8 images with no negative value is
    almost surely in [0, 1] instead, and gets a warning.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a float tensor in [-1, 1], got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be float images in [-1, 1], got dtype {images.dtype}: convert 8-bit "
            f"images with fdiff.data.from_uint8 (x / 127.5 - 1)"
        )
    if images.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(images.shape)}")
    check_finite(images, name)
    if images.numel():
        low, high = float(images.min()), float(images.max())
        if low < -1 - _RANGE_SLACK or high > 1 + _RANGE_SLACK:
            raise ValueError(
                f"{name} must lie in [-1, 1], got values from {low:.4g} to {high:.4g}: images "
                f"in [0, 255] need x / 127.5 - 1, images in [0, 1] need x * 2 - 1"
            )
        if images.shape[0] >= 8 and low >= 0:
            warnings.warn(
                f"{name} has no negative value in {images.shape[0]} images: are they in [0, 1]? "
                f"fdiff expects [-1, 1] (x * 2 - 1)",
                stacklevel=3,
            )
    return images
