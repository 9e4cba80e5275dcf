"""Run profiles: one code path, three scales (``ci``, ``cpu``, ``gpu``).

The profile is read from the environment variable ``FDIFF_PROFILE``. When it is unset the
default is ``gpu`` if CUDA is available, else ``cpu``.

- ``ci``: tiny data, tiny models, a few steps. Executes every code path quickly; its numbers
  mean nothing.
- ``cpu``: the book's default. Small models on the built-in data at 32 px, loading committed
  checkpoints trained on a CPU with ``python -m fdiff.train``.
- ``gpu``: 64 px, real datasets, paper-like budgets, bf16 autocast, checkpoint/resume.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

__all__ = [
    "Profile",
    "PROFILES",
    "get_profile",
    "describe_profile",
    "default_device",
    "model_device",
]

ENV_VAR = "FDIFF_PROFILE"


@dataclass(frozen=True)
class Profile:
    """The scale of everything a chapter runs: data, model widths, budgets."""

    name: str
    image_size: int
    num_train_images: int  # size of the built-in training split
    num_test_images: int  # size of the built-in held-out split
    base_channels: int
    channel_mults: tuple[int, ...]
    num_res_blocks: int
    train_steps: int
    batch_size: int
    learning_rate: float
    num_sample_images: int
    ddim_steps: int
    num_timesteps: int = 1000


PROFILES: dict[str, Profile] = {
    "ci": Profile(
        name="ci",
        image_size=16,
        num_train_images=256,
        num_test_images=32,
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        train_steps=20,
        batch_size=16,
        learning_rate=1e-3,
        num_sample_images=4,
        ddim_steps=10,
        num_timesteps=100,
    ),
    "cpu": Profile(
        name="cpu",
        image_size=32,
        num_train_images=50_000,
        num_test_images=500,
        base_channels=32,
        channel_mults=(1, 2, 2),
        num_res_blocks=1,
        train_steps=3000,
        batch_size=64,
        learning_rate=1e-3,
        num_sample_images=16,
        ddim_steps=50,
    ),
    "gpu": Profile(
        name="gpu",
        image_size=64,
        num_train_images=200_000,
        num_test_images=2000,
        base_channels=64,
        channel_mults=(1, 2, 2, 4),
        num_res_blocks=2,
        train_steps=50_000,
        batch_size=128,
        learning_rate=2e-4,
        num_sample_images=64,
        ddim_steps=100,
    ),
}


def get_profile(name: str | None = None) -> Profile:
    """Return the active profile: ``name`` if given, else ``$FDIFF_PROFILE``, else a default.

    The default is ``gpu`` when CUDA is available and ``cpu`` otherwise.
    """
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip().lower() or None
    if name is None:
        name = "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}: expected one of {sorted(PROFILES)} "
            f"(set {ENV_VAR}=ci|cpu|gpu)"
        )
    return PROFILES[name]


def default_device() -> torch.device:
    """Return the device models run on: the first GPU if CUDA is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model) -> torch.device:
    """Return the device of a model's parameters (the CPU for a model without any)."""
    params = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return params.device if params is not None else torch.device("cpu")


def describe_profile(profile: Profile | None = None) -> str:
    """Return a one-line description of the profile and the device, for a chapter's first cell."""
    profile = profile or get_profile()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    fields = ", ".join(
        f"{f.name}={getattr(profile, f.name)}"
        for f in dataclasses.fields(profile)
        if f.name in ("image_size", "train_steps", "batch_size")
    )
    return f"fdiff profile: {profile.name} ({fields}); device: {device}; torch {torch.__version__}"
