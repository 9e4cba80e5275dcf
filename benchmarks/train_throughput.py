"""Training and DDIM-sampling throughput of fdiff's U-Net next to diffusers' ``UNet2DModel``.

Both networks are built at the same widths, depth, resolution and batch (see
:func:`build_diffusers_unet` for how the diffusers config mirrors fdiff's layout) and are timed
side by side on the same input tensors, in interleaved blocks (fdiff, diffusers, fdiff, ...), so
that drifts in machine load hit both equally. Each reported number is the median over all timed
steps (training) or calls (sampling); images/s = batch / median.

A training step is what ``fdiff.train`` does minus EMA and gradient clipping: forward at random
t, MSE against the noise, backward, AdamW step. It is timed in fp32 and under
``torch.autocast("cpu", dtype=torch.bfloat16)``, the precision the book trains with on CPU.

Usage::

    python benchmarks/train_throughput.py                     # profile "cpu": 32 px, batch 64
    python benchmarks/train_throughput.py --precision bf16 --rounds 5
    python benchmarks/train_throughput.py --profile ci --rounds 2   # smoke test, a few seconds
"""

from __future__ import annotations

import os
import sys

# With OpenMP's default wait policy, idle worker threads spin. When the cores are shared with
# another job (e.g. a training run), a spinning or descheduled worker stalls every parallel
# region: a 2-thread training step was measured 3-5x slower, and far noisier, than with
# PASSIVE. Set before torch is imported; export OMP_WAIT_POLICY=ACTIVE to override.
_TORCH_PRELOADED = "torch" in sys.modules  # then the policy above may not have applied
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from fdiff.profiles import get_profile  # noqa: E402
from fdiff.samplers import generate  # noqa: E402
from fdiff.schedules import NoiseSchedule  # noqa: E402
from fdiff.unet import UNet, UNetConfig, count_parameters  # noqa: E402

PRECISIONS = ("fp32", "bf16")
NUM_INPUT_BATCHES = 4  # distinct (x_t, t, eps) batches, cycled identically for both models


# -- models ------------------------------------------------------------------------------------


def build_diffusers_unet(cfg: UNetConfig, image_size: int) -> nn.Module:
    """Return a diffusers ``UNet2DModel`` laid out like ``fdiff.unet.UNet(cfg)``.

    The correspondence is module for module: conv_in; per level ``num_res_blocks`` ResNet blocks
    (GroupNorm-SiLU-conv, time projection, GroupNorm-SiLU-conv, 1x1 shortcut on width change),
    each followed by self-attention at ``cfg.attn_levels``, and a strided 3x3 conv downsampler
    except at the lowest level; a middle ResNet-attention-ResNet; a decoder with
    ``num_res_blocks + 1`` blocks per level on concatenated skips and nearest-neighbour + conv
    upsamplers; GroupNorm-SiLU-conv_out. The time embedding is sinusoidal at ``base_channels``
    then a Linear-SiLU-Linear MLP to ``4 * base_channels`` in both. A q/k/v/out attention with
    biases has the same 4c^2 + 4c parameters as fdiff's fused 1x1 qkv conv plus projection, so
    the two parameter counts come out identical and ``add_attention`` needs no adjustment.

    diffusers takes one ``attention_head_dim`` for the whole network; it is set so that the
    attention at the lowest level and in the middle block (both ``widths[-1]`` wide) has
    ``cfg.num_heads`` heads, as in fdiff. Attention at other levels, if ``cfg`` asks for any,
    then has ``width / head_dim`` heads.
    """
    from diffusers import UNet2DModel

    widths = cfg.widths()
    levels = range(len(widths))
    attn = set(cfg.attn_levels)
    down = tuple("AttnDownBlock2D" if lv in attn else "DownBlock2D" for lv in levels)
    up = tuple("AttnUpBlock2D" if lv in attn else "UpBlock2D" for lv in reversed(levels))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=cfg.image_channels,
        out_channels=cfg.out_channels or cfg.image_channels,
        time_embedding_type="positional",
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2D",
        block_out_channels=tuple(widths),
        layers_per_block=cfg.num_res_blocks,
        norm_num_groups=cfg.groups,
        attention_head_dim=widths[-1] // cfg.num_heads,
        add_attention=True,
    )


class DiffusersEps(nn.Module):
    """Adapt ``UNet2DModel`` to fdiff's denoiser signature ``eps = model(x_t, t)``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        return self.unet(xt, t).sample


def build_models(cfg: UNetConfig, image_size: int, seed: int) -> dict[str, nn.Module]:
    """Return fresh, seeded fdiff and diffusers models, both as ``eps = model(x_t, t)``."""
    torch.manual_seed(seed)
    fdiff_model = UNet(cfg)
    torch.manual_seed(seed)
    diffusers_model = DiffusersEps(build_diffusers_unet(cfg, image_size))
    return {"fdiff": fdiff_model, "diffusers": diffusers_model}


# -- timing ------------------------------------------------------------------------------------


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def make_inputs(
    batch: int, image_size: int, channels: int, schedule: NoiseSchedule, seed: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Return ``NUM_INPUT_BATCHES`` (x_t, t, eps) triples with t uniform in [0, T)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(NUM_INPUT_BATCHES):
        x0 = torch.rand(batch, channels, image_size, image_size, generator=g) * 2 - 1
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=g)
        out.append((schedule.add_noise(x0, eps, t), t, eps))
    return out


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def make_train_step(
    model: nn.Module,
    inputs: list[tuple[Tensor, Tensor, Tensor]],
    precision: str,
    lr: float,
    memory_format: str = "channels_last",
) -> Callable[[], None]:
    """Return a closure running one training step on the next input batch.

    ``memory_format``: the layout of the model's 4-D weights and of the images; fdiff.train uses
    channels_last.
    """
    fmt = MEMORY_FORMATS[memory_format]
    model.to(memory_format=fmt).train()
    inputs = [(xt.contiguous(memory_format=fmt), t, eps) for xt, t, eps in inputs]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    counter = [0]

    def step() -> None:
        xt, t, eps = inputs[counter[0] % len(inputs)]
        counter[0] += 1
        opt.zero_grad(set_to_none=True)
        with autocast(precision):
            loss = F.mse_loss(model(xt, t).float(), eps)
        loss.backward()
        opt.step()

    return step


def make_sample_call(
    model: nn.Module,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    num_steps: int,
    precision: str,
    seed: int,
) -> Callable[[], None]:
    """Return a closure running one full DDIM generation (``num_steps`` network evaluations)."""
    model.eval()

    def call() -> None:
        g = torch.Generator().manual_seed(seed)
        with autocast(precision):
            generate(
                model,
                schedule,
                shape,
                method="ddim",
                num_steps=num_steps,
                generator=g,
                device="cpu",
            )

    return call


def interleaved(
    fns: dict[str, Callable[[], None]], warmup: int, rounds: int, per_block: int
) -> dict[str, list[float]]:
    """Warm each fn up, then run blocks of ``per_block`` calls in turn (A, B, A, B, ...).

    Returns every timed call's duration in seconds, per fn.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> tuple[float, float]:
    """Return (median, inter-quartile range) of ``times``."""
    med = statistics.median(times)
    if len(times) < 4:
        return med, max(times) - min(times)
    q = statistics.quantiles(times, n=4)
    return med, q[2] - q[0]


# -- report ------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(rows: list[dict]) -> None:
    headers = ["phase", "precision", "model", "batch", "n", "median s", "IQR s", "images/s"]
    keys = ["phase", "precision", "model", "batch", "n", "median", "iqr", "ips"]
    fmt = {"median": "{:.4f}", "iqr": "{:.4f}", "ips": "{:.2f}"}
    cells = [[fmt.get(k, "{}").format(r[k]) for k in keys] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    left = {0, 1, 2}

    def line(vals):
        return "  ".join(
            v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths))
        )

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print(line(c))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="cpu", help="fdiff profile: ci, cpu or gpu (default cpu)")
    p.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds of training blocks (default 5)"
    )
    p.add_argument(
        "--steps-per-block",
        type=int,
        default=2,
        help="training steps per model per round (default 2)",
    )
    p.add_argument(
        "--batch", type=int, default=None, help="training batch (default: the profile's batch_size)"
    )
    p.add_argument(
        "--sample-batch",
        type=int,
        default=None,
        help="DDIM sampling batch (default: the profile's num_sample_images)",
    )
    p.add_argument(
        "--ddim-steps",
        type=int,
        default=None,
        help="DDIM steps per generation (default: min(profile ddim_steps, 10)); 0 skips sampling",
    )
    p.add_argument(
        "--sample-rounds",
        type=int,
        default=None,
        help="interleaved rounds of one generation per model (default: --rounds)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    p.add_argument(
        "--memory-format",
        choices=tuple(MEMORY_FORMATS),
        default="channels_last",
        help="layout of weights and images in training (default channels_last, as fdiff.train)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("rounds", "steps_per_block", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the report and return the measurements."""
    args = parse_args(argv)
    profile = get_profile(args.profile)
    torch.set_num_threads(args.threads)
    batch = args.batch or profile.batch_size
    sample_batch = args.sample_batch or profile.num_sample_images
    ddim_steps = min(profile.ddim_steps, 10) if args.ddim_steps is None else args.ddim_steps
    sample_rounds = args.sample_rounds or args.rounds
    precisions = PRECISIONS if args.precision == "both" else (args.precision,)
    size = profile.image_size
    cfg = UNetConfig.from_profile(profile)
    schedule = NoiseSchedule("linear", num_timesteps=profile.num_timesteps)

    models = build_models(cfg, size, args.seed)
    n_f = count_parameters(models["fdiff"])
    n_d = count_parameters(models["diffusers"])
    dcfg = models["diffusers"].unet.config

    import diffusers

    print("fdiff U-Net vs diffusers UNet2DModel: training and DDIM sampling throughput")
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, python "
        f"{platform.python_version()}"
    )
    print(
        f"device: CPU ({cpu_name()}), {torch.get_num_threads()} threads, "
        f"capability {torch.backends.cpu.get_cpu_capability()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
        + (" (torch loaded before this script: may not apply)" if _TORCH_PRELOADED else "")
    )
    print(
        f"profile {profile.name}: {size}x{size} px, train batch {batch}, sample batch "
        f"{sample_batch}, T={schedule.num_timesteps}, DDIM steps {ddim_steps}"
    )
    print(
        f"timing: warmup 2 steps per model, then {args.rounds} rounds x "
        f"{args.steps_per_block} steps per model, interleaved; sampling: 1 short warmup, "
        f"then {sample_rounds} rounds x 1 generation per model; median reported; training "
        f"layout {args.memory_format}"
    )
    print(
        f"fdiff:     widths {cfg.widths()}, num_res_blocks {cfg.num_res_blocks}, attention at "
        f"levels {list(cfg.attn_levels)} + middle, heads {cfg.num_heads}, groups {cfg.groups}, "
        f"emb {cfg.emb_dim}"
    )
    print(
        f"diffusers: block_out_channels {list(dcfg.block_out_channels)}, layers_per_block "
        f"{dcfg.layers_per_block}, down {list(dcfg.down_block_types)}, up "
        f"{list(dcfg.up_block_types)}, attention_head_dim {dcfg.attention_head_dim}, "
        f"norm_num_groups {dcfg.norm_num_groups}"
    )
    ratio = n_f / n_d
    print(f"parameters: fdiff {n_f:,}, diffusers {n_d:,}, ratio fdiff/diffusers {ratio:.4f}")
    if not 0.9 <= ratio <= 1.1:
        print("WARNING: parameter counts differ by more than 10%; the comparison is not matched")
    print(flush=True)

    rows: list[dict] = []
    results: dict = {"params": {"fdiff": n_f, "diffusers": n_d}, "train": {}, "sample": {}}
    t_start = time.perf_counter()

    def record(phase: str, precision: str, b: int, times: dict[str, list[float]]) -> dict:
        out = {}
        for name, ts in times.items():
            med, iqr = summarize(ts)
            rows.append(
                dict(
                    phase=phase,
                    precision=precision,
                    model=name,
                    batch=b,
                    n=len(ts),
                    median=med,
                    iqr=iqr,
                    ips=b / med,
                )
            )
            out[name] = b / med
        out["ratio"] = out["fdiff"] / out["diffusers"]
        return out

    for precision in precisions:
        print(f"training, {precision} ...", flush=True)
        models = build_models(cfg, size, args.seed)
        inputs = make_inputs(batch, size, cfg.image_channels, schedule, args.seed)
        steps = {
            name: make_train_step(m, inputs, precision, profile.learning_rate, args.memory_format)
            for name, m in models.items()
        }
        times = interleaved(steps, warmup=2, rounds=args.rounds, per_block=args.steps_per_block)
        results["train"][precision] = record("train", precision, batch, times)
        del models, steps

    if ddim_steps > 0:
        shape = (sample_batch, cfg.image_channels, size, size)
        for precision in precisions:
            print(f"DDIM sampling, {precision} ...", flush=True)
            models = build_models(cfg, size, args.seed)
            for m in models.values():
                make_sample_call(m, schedule, shape, min(2, ddim_steps), precision, args.seed)()
            calls = {
                name: make_sample_call(m, schedule, shape, ddim_steps, precision, args.seed)
                for name, m in models.items()
            }
            times = interleaved(calls, warmup=0, rounds=sample_rounds, per_block=1)
            results["sample"][precision] = record(
                f"ddim{ddim_steps}", precision, sample_batch, times
            )
            del models, calls

    print()
    print_table(rows)
    print()
    print(f"total benchmark time {time.perf_counter() - t_start:.1f} s")
    for precision, r in results["sample"].items():
        print(f"DDIM sampling throughput ratio fdiff/diffusers ({precision}): {r['ratio']:.2f}")
    for precision, r in results["train"].items():
        print(f"train throughput ratio fdiff/diffusers ({precision}): {r['ratio']:.2f}")
    return results


if __name__ == "__main__":
    main()
