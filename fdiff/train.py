"""The training loop: the denoising loss, AdamW, EMA, gradient clipping, bf16 or fp16 autocast,
exact resume.

Every random draw of step ``s`` (which images, which t, which noise, the model's own draws such
as the factorized model's mask noise) comes from ``make_generator(seed, s)``. A run that is
interrupted and resumed from its checkpoint therefore continues exactly as if it had never
stopped: the checkpoint only needs the weights, the EMA, the optimizer state and the counters.

A SIGTERM (``kill``, a timeout, a preempted machine) is handled like Ctrl-C: the step in
progress finishes or is dropped whole, the resume file is written, and training stops with
:class:`Terminated`, a ``KeyboardInterrupt``. One process at a time trains into a resume file:
a second one is refused while the first holds the file's lock.

Named runs, their command line (``python -m fdiff.train NAME``) and the checkpoints they leave
are in :mod:`fdiff.runs`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoints import load_checkpoint, save_checkpoint
from .checks import check_images, check_int
from .profiles import model_device
from .schedules import NoiseSchedule
from .seeding import make_generator

__all__ = ["TrainConfig", "TrainResult", "train", "denoising_loss", "Terminated"]


class Terminated(KeyboardInterrupt):
    """Training was stopped by SIGTERM; like Ctrl-C, its progress was saved first."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`: everything that decides the trained weights.

    ``min_snr_gamma`` > 0 weights the loss by Min-SNR (:func:`denoising_loss`).
    Vary with ``dataclasses.replace``.
    """

    steps: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # "auto": bf16 autocast on GPUs with native bf16, fp16 with a gradient scaler on older
    # GPUs (Colab's T4), fp32 on a CPU; or one of "bf16", "fp16", "fp32".
    precision: str = "auto"
    seed: int = 0
    min_snr_gamma: float = 0.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "warmup_steps", "seed"):
            check_int(getattr(self, name), name, 1 if name in ("steps", "batch_size") else 0)
        for name in ("lr", "weight_decay", "ema_decay", "grad_clip", "min_snr_gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16', 'fp16' or 'fp32', got "
                             f"{self.precision!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "min_snr_gamma"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be >= 0 (0: none), got {getattr(self, name)}")


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained and EMA models and the loss of every step."""

    model: nn.Module
    ema: nn.Module
    losses: list[float] = field(default_factory=list)
    step: int = 0
    seconds: float = 0.0
    snapshot_steps: list[int] = field(default_factory=list)
    snapshots: list[Tensor] = field(default_factory=list)  # one per entry of snapshot_steps


def denoising_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
    min_snr_gamma: float = 0.0,
    generator: torch.Generator | None = None,
    cond: Tensor | None = None,
) -> Tensor:
    """Return the DDPM loss: MSE of eps and eps_theta(sqrt(ab) x0 + sqrt(1 - ab) eps, t).

    ``min_snr_gamma`` > 0 weights each image's error by min(SNR_t, gamma) / SNR_t, the Min-SNR
    weighting of Hang et al. (ICCV 2023) written for eps-prediction: timesteps with little noise,
    whose targets are easy, no longer dominate the gradient. 0 (the default) is the plain mean.
    ``generator`` goes to the model for the draws it makes in training; ``cond``, one condition
    per image, to a conditioned model (:class:`fdiff.guidance.GuidedUNet`), which drops some of
    them with that generator. The inputs are moved to the model's device (a no-op in training,
    where they already are).
    """
    if not min_snr_gamma >= 0:  # also refuses NaN
        raise ValueError(f"min_snr_gamma must be >= 0 (0: unweighted), got {min_snr_gamma}")
    device = model_device(model)
    x0, t, eps = x0.to(device), t.to(device), eps.to(device)
    extra = {} if cond is None else {"cond": cond.to(device)}
    eps_hat = model(schedule.add_noise(x0, eps, t), t, generator=generator, **extra).float()
    if not min_snr_gamma:
        return F.mse_loss(eps_hat, eps)
    per_image = (eps_hat - eps).pow(2).flatten(1).mean(1)
    snr = schedule.snr(t).float()
    return (per_image * snr.clamp(max=min_snr_gamma) / snr).mean()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a training step on ``device`` uses (None: fp32)."""
    # "auto" uses reduced precision on GPUs only. Whether bf16 pays on a CPU depends on the CPU
    # and on the memory layout: on this book's 2-core AVX-512 machine, bf16 trained the cpu
    # profile's U-Net 1.5x slower than fp32 in the default layout, but 1.4x faster in
    # channels-last layout, and the factorized model 1.4x faster (benchmarks/train_throughput.py,
    # factorized_overhead.py).
    # CPUs without native bf16 emulate it slowly, so on a CPU it is asked for with "bf16".
    if precision != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    if device.type != "cuda":
        return None
    # Native bf16 arithmetic starts with compute capability 8 (Ampere); older GPUs such as
    # Colab's T4 report bf16 as supported because they can emulate it, slowly. They have fast
    # fp16 instead, whose narrow range needs a gradient scaler.
    native_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
    return torch.bfloat16 if native_bf16 else torch.float16


def _draw_batch(dataset, batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """A random batch of images, and their conditions when the dataset has them
    (:class:`fdiff.annotate.Conditioned`)."""
    from .annotate import Conditioned
    from .data import stack_images

    idx = torch.randint(len(dataset), (batch_size,), generator=gen).tolist()
    if isinstance(dataset, Conditioned):
        items = dataset.batch(idx)
        return items["image"], items["cond"]
    return stack_images(dataset, idx), None


def _channels_last(x: Tensor, device: torch.device) -> Tensor:
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


class _State:
    """Everything a resume file holds: weights, EMA, optimizer, losses, snapshots, counters."""

    def __init__(self, result: TrainResult, opt: torch.optim.Optimizer, config: TrainConfig,
                 scaler: torch.amp.GradScaler | None = None):
        self.result, self.opt, self.config, self.scaler = result, opt, config, scaler

    def save(self, path: Path) -> None:
        r = self.result
        tensors = {f"model.{k}": v for k, v in r.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in r.ema.state_dict().items()})
        state = self.opt.state_dict()
        for pid, per_param in state["state"].items():
            tensors.update({f"optim.{pid}.{key}": v for key, v in per_param.items()})
        tensors["losses"] = torch.tensor(r.losses, dtype=torch.float32)
        if r.snapshots:
            tensors["snapshots"] = torch.stack(r.snapshots)
        meta = {
            "snapshot_steps": r.snapshot_steps,
            "step": r.step,
            "seconds": r.seconds,
            "train_config": dataclasses.asdict(self.config),
            "param_groups": state["param_groups"],
        }
        if self.scaler is not None:
            meta["grad_scaler"] = self.scaler.state_dict()
        save_checkpoint(path, tensors, meta)

    def load(self, path: Path) -> None:
        tensors, meta = load_checkpoint(path)
        saved = {k: v for k, v in meta.get("train_config", {}).items() if k != "steps"}
        wanted = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "steps"}
        for key in sorted(set(saved) | set(wanted)):
            if saved.get(key) != wanted.get(key):
                raise ValueError(
                    f"{path} was trained with {key}={saved.get(key)!r}, not {wanted.get(key)!r}: "
                    f"resuming would not continue the same run; delete the file to start afresh"
                )
        r = self.result
        r.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        r.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        per_param: dict[int, dict[str, Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, pid, key = name.split(".", 2)
                per_param.setdefault(int(pid), {})[key] = value
        groups = meta["param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        self.opt.load_state_dict({"state": per_param, "param_groups": groups})
        r.losses = tensors["losses"].tolist()
        r.step, r.seconds = int(meta["step"]), float(meta["seconds"])
        r.snapshot_steps = list(meta.get("snapshot_steps", []))
        if "snapshots" in tensors:
            r.snapshots = list(tensors["snapshots"].unbind(0))
        if self.scaler is not None and "grad_scaler" in meta:
            self.scaler.load_state_dict(meta["grad_scaler"])


def train(
    model: nn.Module,
    schedule: NoiseSchedule,
    dataset,
    config: TrainConfig,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    callback: Callable[[int, TrainResult], None] | None = None,
    snapshot: Callable[[nn.Module], Tensor] | None = None,
    snapshot_every: int = 100,
    save_every: int = 250,
) -> TrainResult:
    """Train ``model`` on ``dataset`` images for ``config.steps`` steps; resume if possible.

    dataset: items are dicts with "image" (C, H, W) in [-1, 1] (or a ``batch(indices)`` method).
    checkpoint: path of the resume file. If it exists, training continues from it; it is
    rewritten every ``save_every`` steps, at the end, and on KeyboardInterrupt.
    callback(step, result) runs after every step (``step`` counts completed steps).
    snapshot(model) -> Tensor runs (without gradients) before the first step and every
    ``snapshot_every`` steps, on the model being trained; its results go to
    ``result.snapshots`` and are kept in the resume file, so an interruption loses none of them.
    Returns a :class:`TrainResult`; the EMA model is the one to sample from.
    """
    if snapshot_every < 1 or save_every < 1:
        raise ValueError(f"snapshot_every and save_every must be >= 1, got {snapshot_every}, "
                         f"{save_every}")
    if len(dataset) == 0:
        raise ValueError("train needs a dataset with at least one image, got an empty one")
    path = Path(checkpoint) if checkpoint is not None else None
    with contextlib.ExitStack() as stack:
        if path is not None:
            stack.enter_context(_one_trainer(path))
        stack.enter_context(_sigterm_as_interrupt())
        return _train(model, schedule, dataset, config, path, progress, callback, snapshot,
                      snapshot_every, save_every)


@contextlib.contextmanager
def _one_trainer(path: Path) -> Iterator[None]:
    """Hold the resume file's lock while training: a second trainer of the same run is refused
    instead of both writing one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(
            f"another process is training into {path} (it holds {lock.lock_file}): wait for it "
            f"to finish or stop it; running the same command again afterwards resumes"
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while training (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated(f"signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _save_or_warn(state: _State, path: Path | None, step: int) -> None:
    """Write the resume file; a failure (a full disk) is a warning, not the end of the run: the
    model in memory is intact and is returned at the end."""
    if path is None:
        return
    try:
        state.save(path)
    except OSError as err:
        warnings.warn(f"could not write the resume file {path} at step {step} ({err}): training "
                      f"goes on, but an interruption would lose the steps since the last save",
                      stacklevel=3)


def _train(model, schedule, dataset, config, path, progress, callback, snapshot,
           snapshot_every, save_every) -> TrainResult:
    device = model_device(model)
    # Convolutions in channels-last layout: on a 2-core CPU a training step of the cpu profile's
    # U-Net is 1.1-1.2x faster and the factorized model's 1.2-1.3x, whose narrow mask-generator
    # convolutions suffer most from the default layout (benchmarks/factorized_overhead.py).
    # Only the layout of 4-D tensors changes, the same in a resumed run, so resuming stays exact.
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    result = TrainResult(model=model, ema=ema)
    dtype = autocast_dtype(config.precision, device)
    # fp16 gradients underflow without scaling; the scaler's state is part of the resume file.
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    state = _State(result, opt, config, scaler)
    if path is not None and path.exists():
        state.load(path)
        if result.step > config.steps:
            raise ValueError(
                f"{path} has already trained {result.step} steps, more than the {config.steps} "
                f"asked for: ask for at least {result.step} steps, or delete the file to start "
                f"afresh"
            )
    params, ema_params = list(model.parameters()), list(ema.parameters())
    model.train()
    bar = tqdm(total=config.steps, initial=result.step, disable=not progress, desc="training")
    updating = False

    def take_snapshot() -> None:
        nonlocal updating
        if snapshot is None or result.step in result.snapshot_steps:
            return
        with torch.no_grad():
            model.eval()
            masks = snapshot(model).detach().cpu()
            model.train()
        updating = True  # the masks and their step are recorded together or not at all
        result.snapshots.append(masks)
        result.snapshot_steps.append(result.step)
        updating = False

    try:
        # Also after a resume: an interruption during a snapshot saved its step without it.
        if result.step == 0 or result.step % snapshot_every == 0 or result.step == config.steps:
            take_snapshot()
        while result.step < config.steps:
            t_start = time.perf_counter()
            gen = make_generator(config.seed, result.step)
            x0, cond = _draw_batch(dataset, config.batch_size, gen)
            x0 = check_images(x0, "the training images")
            t = torch.randint(schedule.num_timesteps, (config.batch_size,), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            x0, t, eps = _channels_last(x0, device), t.to(device), _channels_last(eps, device)
            if cond is not None:
                cond = _channels_last(cond, device)
            lr = config.lr * min(1.0, (result.step + 1) / max(1, config.warmup_steps))
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                loss = denoising_loss(model, schedule, x0, t, eps, config.min_snr_gamma, gen,
                                      cond)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {result.step}")
            opt.zero_grad(set_to_none=True)
            (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is not None:
                scaler.unscale_(opt)  # clip the true gradients
            if config.grad_clip:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            loss_value = loss.item()
            updating = True  # an interruption from here on would leave a half-updated state
            if scaler is None:
                opt.step()
            else:  # skips the step if the scaled gradients overflowed, then adapts the scale
                scaler.step(opt)
                scaler.update()
            # EMA with a warm-up so that short runs still average over their later steps.
            decay = min(config.ema_decay, (1 + result.step) / (10 + result.step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - decay)
            result.step += 1
            result.losses.append(loss_value)  # one loss per step, also when interrupted
            updating = False
            result.seconds += time.perf_counter() - t_start
            bar.update(1)
            if result.step % snapshot_every == 0 or result.step == config.steps:
                take_snapshot()
            if result.step % 10 == 0 or result.step == config.steps:
                bar.set_postfix(loss=f"{sum(result.losses[-10:]) / len(result.losses[-10:]):.4f}")
            if result.step % save_every == 0 or result.step == config.steps:
                _save_or_warn(state, path, result.step)
            if callback is not None:
                callback(result.step, result)
    except KeyboardInterrupt:
        if not updating and path is not None:
            _save_or_warn(state, path, result.step)
            bar.write(f"interrupted: saved step {result.step} to {path}; run again to resume")
        raise
    finally:
        bar.close()
        model.eval()
    return result


if __name__ == "__main__":  # python -m fdiff.train NAME: the command of fdiff.cli
    from .cli import main

    main()
