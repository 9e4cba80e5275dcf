"""Run profiles: one code path, four scales (``ci``, ``cpu``, ``gpu``, ``paper``).

The profile is read from the environment variable ``FDIFF_PROFILE``. When it is unset the
default is ``gpu`` if CUDA is available, else ``cpu``.

- ``ci``: tiny data, tiny models, a few steps. Executes every code path quickly; its numbers
  mean nothing.
- ``cpu``: the book's default. Small models on the built-in data at 32 px, loading committed
  checkpoints trained on a CPU with ``python -m fdiff.train``.
- ``gpu``: 64 px, real datasets, sized for one free Colab session: each chapter's training
  fits in about 45 minutes of a T4 (:mod:`fdiff.budget` counts it; fp16 autocast with a gradient
  scaler there, bf16 on newer GPUs), and published weights are used when there are any.
- ``paper``: the ``gpu`` profile at paper-like scale (a deeper, wider U-Net, 50,000 steps of
  128 images): hours of a large GPU per model. Only ever chosen explicitly.
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

    @property
    def real_data(self) -> bool:
        """Whether the chapters run on a real dataset (Oxford-IIIT Pets) rather than the built-in
        data: in the ``gpu`` and ``paper`` profiles."""
        return self.name in ("gpu", "paper")


# One row per profile, in the order of Profile's fields after its name:
#         image  train     test  base  channel_mults  blocks steps   batch lr    samples ddim T
_TABLE = {
    "ci":  (16,   256,     32,   16,   (1, 2),        1,     20,     16,   1e-3, 4,      10,  100),
    "cpu": (32,   50_000,  500,  32,   (1, 2, 2),     1,     3000,   64,   1e-3, 16,     50,  1000),
    "gpu": (64,   200_000, 2000, 64,   (1, 2, 2, 2),  1,     12_000, 64,   2e-4, 64,     100, 1000),
    "paper": (64, 200_000, 2000, 64,   (1, 2, 2, 4),  2,     50_000, 128,  2e-4, 64,     100, 1000),
}
PROFILES: dict[str, Profile] = {name: Profile(name, *row) for name, row in _TABLE.items()}


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
            f"(set {ENV_VAR}=ci|cpu|gpu|paper)"
        )
    return PROFILES[name]


def default_device() -> torch.device:
    """Return the device models run on: the first GPU if CUDA is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model) -> torch.device:
    """Return the device of a model's parameters (the CPU for a model without any)."""
    params = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return params.device if params is not None else torch.device("cpu")


def free_cores(samples: int = 11, interval: float = 0.05) -> int:
    """The CPU cores no other process is using now: this process's usable cores minus the
    processes running or waiting to run, read from ``/proc/loadavg`` (Linux; elsewhere all cores).

    Torch's CPU kernels split each operation over their threads and wait for the slowest: on a
    2-core machine that also runs one busy process, a training step of the cpu profile's U-Net
    took 3.2x as long with 2 threads as on the idle machine, and 1.8x with 1 thread
    (``benchmarks/busy_threads.py``). Give a kernel this many threads (``OMP_NUM_THREADS``, or
    ``torch.set_num_threads``) when the machine is shared. The median of ``samples`` readings
    ``interval`` seconds apart smooths the instant count.
    """
    import os
    import statistics
    import time

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        counts = []
        for i in range(samples):
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
            counts.append(running - 1)  # this process is one of them
            if i + 1 < samples:
                time.sleep(interval)
    except (OSError, ValueError, IndexError):
        return cores or 1
    return max(1, (cores or 1) - round(statistics.median(counts)))


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
