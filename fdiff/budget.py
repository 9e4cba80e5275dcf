"""What training costs: FLOPs of a run, and minutes of a GPU at a stated throughput.

The ``gpu`` profile is sized for one free Colab session: each chapter's training, when the
chapter runs with no weights published or cached, should fit in about 45 minutes of a T4.
Nothing here times a GPU: a training step's floating-point operations are counted by
:class:`torch.utils.flop_counter.FlopCounterMode` on the CPU (forward and backward of a small
batch, scaled to the run's batch size), and minutes follow from an assumed throughput.

The T4's datasheet gives 65 TFLOP/s of fp16 tensor-core peak. A small U-Net at 64 pixels reaches a
fraction of it: convolutions of few channels, group norms and element-wise work are bound by
memory, not by the tensor cores. :data:`T4_TFLOPS` assumes a quarter of the peak; the estimate is
as good as that assumption, and ``benchmarks/gpu_budget.py`` prints it beside the peak-rate
bound so the spread is visible.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .profiles import Profile, get_profile

__all__ = ["T4_PEAK_TFLOPS", "T4_TFLOPS", "CHAPTER_RUNS", "step_flops", "run_flops",
           "gpu_minutes", "chapter_minutes"]

T4_PEAK_TFLOPS = 65.0  # NVIDIA T4 datasheet, fp16 with tensor cores
T4_TFLOPS = T4_PEAK_TFLOPS / 4  # assumed sustained rate for the book's U-Nets
COLAB_MINUTES = 45.0  # each chapter's training budget in the gpu profile

# What each chapter trains in the gpu/paper profiles when nothing is published or cached:
# (run, dataset or None for the run's own). "real" is the profile's real dataset (Pets); the
# "going further" sections of chapters 1 and 4 use the cpu profile's committed checkpoints.
CHAPTER_RUNS: dict[str, list[tuple[str, str | None]]] = {
    "01_diffusion": [("ddpm_shapes", None)],
    "02_factorized": [("factorized_shapes", None), ("ddpm_shapes", None)],
    "03_segmenting": [("factorized_pets", None)]
    + [(f"ablation_{v}", "real") for v in ("k2", "k3", "k4", "concat", "mask_mid", "unshared",
                                          "mask_noise", "replicate")]
    + [("factorized_simple-shapes", None), ("factorized_simple-shapes-replicate", None)],
    "04_features": [("ddpm_pets", None), ("factorized_pets", None)],
    "05_discovery": [("ddpm_pets", None), ("factorized_pets", None)],
    # chapter 6's simple-shapes lessons load the cpu profile's committed runs in every profile
    # but ci; on a GPU it trains self-guidance on the real dataset
    "06_guidance": [("ddpm_pets", None), ("guided_none_pets", None), ("guided_self_pets", None)],
}
# Chapter 1 also trains its live example, a small U-Net for a few thousand steps of 64 images.
LIVE_EXAMPLE = {"config": {"base_channels": 16, "channel_mults": (1, 2), "num_heads": 2},
                "batch": 64, "steps": {"ci": 5, "cpu": 400, "gpu": 2000, "paper": 2000}}


def _model_flops(model: torch.nn.Module, image_size: int, batch: int, probe: int = 2) -> float:
    """FLOPs of one training step (forward and backward) of ``model`` on ``batch`` images,
    counted on ``probe`` images and scaled: every operation of these networks is linear in the
    batch size."""
    from .factorized import FactorizedDenoiser

    x = torch.randn(probe, 3, image_size, image_size)
    t = torch.randint(0, 1000, (probe,))
    # Gumbel mask noise needs a generator; its cost is a few element-wise operations.
    extra = {"generator": torch.Generator()} if isinstance(model, FactorizedDenoiser) else {}
    with FlopCounterMode(display=False) as counter:
        model(x, t, **extra).float().pow(2).mean().backward()
    return counter.get_total_flops() * batch / probe


def step_flops(run) -> float:
    """FLOPs of one training step of a :class:`fdiff.runs.Run`."""
    return _model_flops(run.build_model(), run.data.image_size, run.train.batch_size)


def run_flops(run) -> float:
    """FLOPs of a whole training run."""
    return step_flops(run) * run.train.steps


def gpu_minutes(flops: float, tflops: float = T4_TFLOPS) -> float:
    """Minutes that ``flops`` take at a sustained ``tflops`` TFLOP/s."""
    return flops / (tflops * 1e12) / 60


def live_example_flops(profile: Profile) -> float:
    """FLOPs of chapter 1's live training example."""
    from .unet import UNet, UNetConfig

    model = UNet(UNetConfig(**LIVE_EXAMPLE["config"]))
    return (_model_flops(model, profile.image_size, LIVE_EXAMPLE["batch"])
            * LIVE_EXAMPLE["steps"][profile.name])


def chapter_flops(profile: Profile | str | None = None) -> dict[str, dict[str, float]]:
    """For each chapter, the FLOPs of every run it trains in ``profile`` (default ``gpu``)."""
    from .runs import resolve_run

    profile = profile if isinstance(profile, Profile) else get_profile(profile or "gpu")
    real = "pets" if profile.real_data else "shapes"  # the dataset labelled_data picks
    cache: dict[str, float] = {}
    out: dict[str, dict[str, float]] = {}
    for chapter, runs in CHAPTER_RUNS.items():
        out[chapter] = {}
        for name, dataset in runs:
            run = resolve_run(name, profile, real if dataset == "real" else None)
            key = run.digest()
            if key not in cache:
                cache[key] = run_flops(run)
            out[chapter][f"{name} ({run.train.steps} steps)"] = cache[key]
    out["01_diffusion"]["live example"] = live_example_flops(profile)
    return out


def chapter_minutes(profile: Profile | str | None = None,
                    tflops: float = T4_TFLOPS) -> dict[str, float]:
    """Each chapter's training time in minutes at ``tflops`` (default: the assumed T4 rate)."""
    return {chapter: gpu_minutes(sum(runs.values()), tflops)
            for chapter, runs in chapter_flops(profile).items()}
