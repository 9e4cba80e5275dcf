"""Training-step cost of the factorized denoiser over a plain U-Net of the same widths.

For K = 2 and K = 4 regions, prints side by side from one run: FLOPs per training step (counted
with ``torch.utils.flop_counter``: forward + backward), their ratio to the plain U-Net's, the
measured step time (median of interleaved blocks), its ratio, and the ratio of the two ratios.
A time ratio close to the FLOP ratio means the K regions really run batched: the model costs
what its architecture costs and nothing more.

    python benchmarks/factorized_overhead.py                 # cpu profile: 32 px, batch 64
    python benchmarks/factorized_overhead.py --profile ci --rounds 2
    python benchmarks/factorized_overhead.py --regions 2 --mask-width 0.5   # width's effect
    python benchmarks/factorized_overhead.py --memory-format contiguous   # the default layout

Models and images are in channels-last layout by default, as in ``fdiff.train``: with the
default (contiguous) layout the mask generator's narrow convolutions cost more time per FLOP
than the rest of the model, and the step-time ratio exceeds the FLOP ratio.
"""

from __future__ import annotations

import argparse
import sys

# Imported first: it sets OMP_WAIT_POLICY before torch loads (see its comment).
from train_throughput import (  # isort: skip
    MEMORY_FORMATS,
    autocast,
    interleaved,
    make_inputs,
    make_train_step,
    summarize,
)

import torch  # noqa: E402  (after the OpenMP policy)
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from fdiff.factorized import FactorizedConfig, FactorizedDenoiser  # noqa: E402
from fdiff.profiles import get_profile  # noqa: E402
from fdiff.schedules import NoiseSchedule  # noqa: E402
from fdiff.unet import UNet, UNetConfig, count_parameters  # noqa: E402


def step_flops(model, xt, t, eps, precision: str) -> int:
    """Count the FLOPs of one forward + backward pass."""
    with FlopCounterMode(display=False) as counter:
        with autocast(precision):
            loss = F.mse_loss(model(xt, t).float(), eps)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-block", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--regions", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--memory-format",
        choices=tuple(MEMORY_FORMATS),
        default="channels_last",
        help="layout of weights and images (default channels_last, as fdiff.train)",
    )
    parser.add_argument(
        "--mask-width",
        type=float,
        nargs="*",
        default=[],
        help="also time K = 2 with the mask generator at these fractions of the U-Net's width "
        "(without attention), to see how its width changes the time per FLOP",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    profile = get_profile(args.profile)
    cfg = UNetConfig.from_profile(profile)
    batch = args.batch or profile.batch_size
    schedule = NoiseSchedule("cosine", profile.num_timesteps)
    inputs = make_inputs(batch, profile.image_size, 3, schedule, seed=0)
    torch.manual_seed(0)
    models = {"unet": UNet(cfg)}
    batches = {"unet": inputs}
    for k in args.regions:
        models[f"factorized K={k}"] = FactorizedDenoiser(FactorizedConfig(cfg, num_regions=k))
        batches[f"factorized K={k}"] = inputs
    for width in args.mask_width:
        name = f"K=2, mask width {width}"
        config = FactorizedConfig(cfg, num_regions=2, mask_width=width, mask_attention=False)
        models[name], batches[name] = FactorizedDenoiser(config), inputs
    # Reference: the plain U-Net on K times the batch, i.e. how this machine's step time scales
    # with batch size alone. The factorized decoder runs on K * batch images.
    for k in args.regions:
        models[f"unet, batch x{k}"] = UNet(cfg)
        batches[f"unet, batch x{k}"] = make_inputs(k * batch, profile.image_size, 3, schedule, 0)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision}, "
        f"profile {profile.name}: {profile.image_size} px, batch {batch}, {args.memory_format}"
    )
    flops = {name: step_flops(m, *batches[name][0], args.precision) for name, m in models.items()}
    steps = {
        name: make_train_step(m, batches[name], args.precision, 1e-4, args.memory_format)
        for name, m in models.items()
    }
    times = interleaved(steps, warmup=2, rounds=args.rounds, per_block=args.steps_per_block)

    base_t, _ = summarize(times["unet"])
    rows = {}
    header = (
        f"{'model':<18}{'params':>11}{'GFLOP/step':>12}{'FLOP ratio':>12}{'s/step':>9}"
        f"{'IQR':>7}{'time ratio':>12}{'time/FLOP':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, model in models.items():
        med, iqr = summarize(times[name])
        fr, tr = flops[name] / flops["unet"], med / base_t
        rows[name] = {"flop_ratio": fr, "time_ratio": tr, "seconds": med}
        print(
            f"{name:<18}{count_parameters(model):>11,}{flops[name] / 1e9:>12.2f}{fr:>12.2f}"
            f"{med:>9.3f}{iqr:>7.3f}{tr:>12.2f}{tr / fr:>11.2f}"
        )
    for name, r in rows.items():
        if name != "unet":
            print(
                f"{name}: step-time ratio {r['time_ratio']:.2f} vs FLOP ratio "
                f"{r['flop_ratio']:.2f} ({100 * (r['time_ratio'] / r['flop_ratio'] - 1):+.0f}%)"
            )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
