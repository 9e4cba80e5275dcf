"""The training loop: AdamW, EMA, gradient clipping, bf16 autocast, checkpoints, exact resume.

Every random draw of step ``s`` (which images, which t, which noise) comes from a generator
seeded by ``(seed, s)``. A run that is interrupted and resumed from its checkpoint therefore
continues exactly as if it had never stopped: the checkpoint only needs the weights, the EMA,
the optimizer state and the step counter.

Command line (the committed checkpoints were made this way; see data/checkpoints/manifest.json)::

    python -m fdiff.train --model unet --profile cpu --name ddpm_shapes --precision bf16

Interrupted, the same command resumes from ``$FDIFF_CACHE/runs/<name>-<hash>.resume.safetensors``
(the hash names the recipe without its step count, so a larger ``--steps`` extends the run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import io
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoints import load_checkpoint, save_checkpoint, save_model
from .profiles import default_device, model_device
from .schedules import NoiseSchedule

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "denoising_loss",
    "step_generator",
    "load_or_train",
    "partition_snapshots",
    "Recipe",
]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`. Vary with ``dataclasses.replace``."""

    steps: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    precision: str = "auto"  # "auto": bf16 autocast on GPUs that support it, else fp32
    checkpoint_every: int = 250
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "warmup_steps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (0: none), got {getattr(self, name)}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")


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


LossFn = Callable[[nn.Module, NoiseSchedule, Tensor, Tensor, Tensor], Tensor]


def denoising_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
    min_snr_gamma: float = 0.0,
) -> Tensor:
    """Return the DDPM loss: MSE of eps and eps_theta(sqrt(ab) x0 + sqrt(1 - ab) eps, t).

    ``min_snr_gamma`` > 0 weights each image's error by min(SNR_t, gamma) / SNR_t, the Min-SNR
    weighting of Hang et al. (ICCV 2023) written for eps-prediction: timesteps with little noise,
    whose targets are easy, no longer dominate the gradient, and the noisier timesteps where
    the picture's layout is decided get a larger share. 0 (the default) is the plain mean.
    The inputs are moved to the model's device (a no-op in training, where they already are).
    """
    if not min_snr_gamma >= 0:  # also refuses NaN
        raise ValueError(f"min_snr_gamma must be >= 0 (0: unweighted), got {min_snr_gamma}")
    device = model_device(model)
    x0, t, eps = x0.to(device), t.to(device), eps.to(device)
    xt = schedule.add_noise(x0, eps, t)
    if not min_snr_gamma:
        return F.mse_loss(model(xt, t).float(), eps)
    per_image = (model(xt, t).float() - eps).pow(2).flatten(1).mean(1)
    snr = schedule.snr(t).float()
    return (per_image * snr.clamp(max=min_snr_gamma) / snr).mean()


def step_generator(seed: int, step: int) -> torch.Generator:
    """Return the CPU generator that supplies every random draw of training step ``step``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _use_bf16(precision: str, device: torch.device) -> bool:
    # "auto" uses bf16 on GPUs only. Whether it pays on a CPU depends on the CPU and on the
    # memory layout: on this book's 2-core AVX-512 machine, bf16 trained the cpu profile's U-Net
    # 1.5x slower than fp32 in the default layout, but 1.4x faster in channels-last layout, and
    # the factorized model 1.4x faster (benchmarks/train_throughput.py, factorized_overhead.py).
    # CPUs without native bf16 emulate it slowly, so on a CPU it is asked for with "bf16".
    if precision != "auto":
        return precision == "bf16"
    # Native bf16 arithmetic starts with compute capability 8 (Ampere); older GPUs such as
    # Colab's T4 report bf16 as supported because they can emulate it, slowly.
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def _draw_batch(dataset, batch_size: int, gen: torch.Generator) -> Tensor:
    from .data import stack_images

    return stack_images(dataset, torch.randint(len(dataset), (batch_size,), generator=gen).tolist())


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list]:
    state = opt.state_dict()
    tensors = {
        f"optim.{pid}.{key}": value
        for pid, per_param in state["state"].items()
        for key, value in per_param.items()
    }
    return tensors, state["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list) -> None:
    per_param: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            per_param.setdefault(int(pid), {})[key] = value
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": per_param, "param_groups": groups})


def _prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def _unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def train(
    model: nn.Module,
    schedule: NoiseSchedule,
    dataset,
    config: TrainConfig,
    checkpoint: str | Path | None = None,
    loss_fn: LossFn = denoising_loss,
    progress: bool = True,
    callback: Callable[[int, TrainResult], None] | None = None,
    snapshot: Callable[[nn.Module], Tensor] | None = None,
    snapshot_every: int = 100,
) -> TrainResult:
    """Train ``model`` on ``dataset`` images for ``config.steps`` steps; resume if possible.

    dataset: items are dicts with "image" (C, H, W) in [-1, 1] (or a ``batch(indices)`` method).
    checkpoint: path of the resume file. If it exists, training continues from it; it is
    rewritten every ``config.checkpoint_every`` steps, at the end, and on KeyboardInterrupt.
    callback(step, result) runs after every step (``step`` counts completed steps).
    snapshot(model) -> Tensor runs (without gradients) before the first step and every
    ``snapshot_every`` steps, on the model being trained; its results go to
    ``result.snapshots`` and are kept in the resume file, so an interruption loses none of them.
    Returns a :class:`TrainResult`; the EMA model is the one to sample from.
    """
    device = model_device(model)
    # Convolutions in channels-last layout: on a 2-core CPU a training step of the cpu profile's
    # U-Net is 1.1-1.2x faster and the factorized model's 1.2-1.3x, whose narrow mask-generator
    # convolutions suffer most from the default layout (benchmarks/factorized_overhead.py).
    # Only the layout of 4-D tensors changes, the same in a resumed run, so resuming stays exact.
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    result = TrainResult(model=model, ema=ema)
    if snapshot_every < 1:
        raise ValueError(f"snapshot_every must be >= 1, got {snapshot_every}")
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        _resume(path, result, opt, config)
        if result.step > config.steps:
            raise ValueError(
                f"{path} has already trained {result.step} steps, more than the {config.steps} "
                f"asked for: ask for at least {result.step} steps, or delete the file to start "
                f"afresh"
            )
    bf16 = _use_bf16(config.precision, device)
    params = [p for p in model.parameters()]
    ema_params = [p for p in ema.parameters()]

    def save() -> None:
        if path is None:
            return
        tensors = {**_prefixed("model", model.state_dict()), **_prefixed("ema", ema.state_dict())}
        opt_tensors, groups = _optimizer_tensors(opt)
        tensors.update(opt_tensors)
        tensors["losses"] = torch.tensor(result.losses, dtype=torch.float32)
        if result.snapshots:
            tensors["snapshots"] = torch.stack(result.snapshots)
        meta = {
            "snapshot_steps": result.snapshot_steps,
            "step": result.step,
            "seconds": result.seconds,
            "train_config": asdict(config),
            "param_groups": groups,
        }
        save_checkpoint(path, tensors, meta)

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
            gen = step_generator(config.seed, result.step)
            x0 = _draw_batch(dataset, config.batch_size, gen)
            t = torch.randint(schedule.num_timesteps, (config.batch_size,), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            x0, t, eps = _to_channels_last(x0, device), t.to(device), _to_channels_last(eps, device)
            lr = config.lr * min(1.0, (result.step + 1) / max(1, config.warmup_steps))
            for group in opt.param_groups:
                group["lr"] = lr
            # Whatever the model draws from the global generator (dropout, mask noise) is seeded
            # by the step too, so a resumed run draws the same; the caller's state is restored
            # (manual_seed seeds every GPU, so every GPU's state is kept).
            cuda_devices = range(torch.cuda.device_count()) if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda_devices):
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_fn(model, schedule, x0, t, eps)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {result.step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            loss_value = loss.item()
            updating = True  # an interruption from here on would leave a half-updated state
            opt.step()
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
            if result.step % config.checkpoint_every == 0 or result.step == config.steps:
                save()
            if callback is not None:
                callback(result.step, result)
    except KeyboardInterrupt:
        if not updating:
            save()
            if path is not None:
                bar.write(f"interrupted: saved step {result.step} to {path}; run again to resume")
        raise
    finally:
        bar.close()
        model.eval()
    return result


def _to_channels_last(x: Tensor, device: torch.device) -> Tensor:
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def _resume(path: Path, result: TrainResult, opt: torch.optim.Optimizer, config: TrainConfig):
    tensors, meta = load_checkpoint(path)
    saved = meta.get("train_config", {})
    # Everything but the budget: a run resumed with other settings would not be the same run.
    keys = ("batch_size", "seed", "lr", "precision", "weight_decay", "warmup_steps", "ema_decay",
            "grad_clip")
    for key in keys:
        if saved.get(key) != getattr(config, key):
            raise ValueError(
                f"{path} was trained with {key}={saved.get(key)!r}, not {getattr(config, key)!r}: "
                f"resuming would not continue the same run; delete the file to start afresh"
            )
    result.model.load_state_dict(_unprefixed("model", tensors))
    result.ema.load_state_dict(_unprefixed("ema", tensors))
    _load_optimizer(opt, tensors, meta["param_groups"])
    result.losses = tensors["losses"].tolist()
    result.step = int(meta["step"])
    result.seconds = float(meta["seconds"])
    result.snapshot_steps = list(meta.get("snapshot_steps", []))
    if "snapshots" in tensors:
        result.snapshots = list(tensors["snapshots"].unbind(0))


# -- training a profile's model: the command line and the chapters' "load or train" ------------


def build_model(
    kind: str, profile, padding: str = "zeros", res_blocks: int | None = None, **factorized
) -> nn.Module:
    """Return a freshly initialised model of ``kind`` sized by ``profile``.

    ``padding``: the convolutions' padding mode (:attr:`~fdiff.unet.UNetConfig.padding_mode`).
    ``res_blocks``: residual blocks per resolution, instead of the profile's
    (:attr:`~fdiff.unet.UNetConfig.num_res_blocks`).
    ``factorized``: :class:`~fdiff.factorized.FactorizedConfig` fields (``num_regions``,
    ``mode``, ``shared_decoder``, ``mask_noise``) for the factorized model and its ablation
    variants.
    """
    from .factorized import FactorizedConfig, FactorizedDenoiser
    from .unet import UNet, UNetConfig

    overrides = {"padding_mode": padding}
    if res_blocks is not None:
        overrides["num_res_blocks"] = res_blocks
    if kind == "unet":
        if any(
            v != FactorizedConfig.__dataclass_fields__[k].default for k, v in factorized.items()
        ):
            raise ValueError(f"{sorted(factorized)} only apply to --model factorized")
        return UNet(UNetConfig.from_profile(profile, **overrides))
    if kind == "factorized":
        unet = UNetConfig.from_profile(profile, **overrides)
        return FactorizedDenoiser(FactorizedConfig(unet, **factorized))
    raise ValueError(f"unknown model kind {kind!r}: expected 'unet' or 'factorized'")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a trained model: what a checkpoint's name stands for.

    ``dataset``: ``"shapes"`` or ``"simple-shapes"`` (the built-in data and its simplest form,
    :data:`~fdiff.data.BUILTIN_DATASETS`, the profile's ``num_train_images``) or a real dataset
    of :data:`~fdiff.data.DATASET_NAMES`, trained on all but its test split at the profile's
    resolution. Where its files live is not part of the recipe.
    """

    kind: str
    profile: str
    schedule: str = "cosine"
    seed: int = 0
    steps: int | None = None  # None: the profile's train_steps
    precision: str = "auto"
    num_regions: int = 2  # the factorized model's K and ablation variant
    mode: str = "multiply"
    shared_decoder: bool = True
    mask_noise: float = 0.0
    dataset: str = "shapes"
    padding: str = "zeros"  # the convolutions' padding mode
    min_snr_gamma: float = 0.0  # loss weighting (denoising_loss); 0: unweighted
    res_blocks: int | None = None  # residual blocks per resolution; None: the profile's

    def __post_init__(self):
        from .data import DATASET_NAMES

        if self.dataset not in DATASET_NAMES:
            raise ValueError(
                f"unknown dataset {self.dataset!r}: expected one of {list(DATASET_NAMES)}"
            )
        if self.steps is not None and (
            not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1
        ):
            raise ValueError(
                f"steps must be a positive integer (None: the profile's), got {self.steps!r}"
            )
        if not self.min_snr_gamma >= 0:
            raise ValueError(
                f"min_snr_gamma must be >= 0 (0: unweighted), got {self.min_snr_gamma}"
            )
        if self.res_blocks is not None and (
            not isinstance(self.res_blocks, int)
            or isinstance(self.res_blocks, bool)
            or self.res_blocks < 1
        ):
            raise ValueError(
                "res_blocks must be a positive integer (None: the profile's), "
                f"got {self.res_blocks!r}"
            )

    def _model_schedule_config(self):
        from .profiles import get_profile

        profile = get_profile(self.profile)
        # Seeded for a reproducible initialisation, without touching the caller's generator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = build_model(
                self.kind,
                profile,
                padding=self.padding,
                res_blocks=self.res_blocks,
                num_regions=self.num_regions,
                mode=self.mode,
                shared_decoder=self.shared_decoder,
                mask_noise=self.mask_noise,
            )
        schedule = NoiseSchedule(self.schedule, profile.num_timesteps)
        config = TrainConfig(
            steps=profile.train_steps if self.steps is None else self.steps,
            batch_size=profile.batch_size,
            lr=profile.learning_rate,
            seed=self.seed,
            precision=self.precision,
        )
        return profile, model, schedule, config

    @property
    def budget(self) -> int:
        """The number of training steps: ``steps``, or the profile's ``train_steps``."""
        from .profiles import get_profile

        return get_profile(self.profile).train_steps if self.steps is None else self.steps

    def model_config(self) -> dict:
        """Return the config of the model this recipe trains (as saved in its checkpoint)."""
        return self._model_schedule_config()[1].config.to_dict()

    def data(self, root=None, download: bool = False, split: str = "train", progress=False):
        """Return the recipe's images of ``split`` ("train" or "test")."""
        from .data import BUILTIN_DATASETS, builtin_dataset, load_dataset, training_images
        from .profiles import get_profile

        profile = get_profile(self.profile)
        if self.dataset in BUILTIN_DATASETS:
            n = profile.num_train_images if split == "train" else profile.num_test_images
            return builtin_dataset(self.dataset, n, profile.image_size, self.seed, split)
        if split == "train":
            return training_images(self.dataset, root, profile.image_size, download, progress)
        return load_dataset(self.dataset, root, split, profile.image_size, download)

    def parts(self, root=None, download: bool = False, progress: bool = False):
        """Return (model, schedule, training data, TrainConfig), the model freshly seeded."""
        _, model, schedule, config = self._model_schedule_config()
        data = self.data(root, download, "train", progress)
        return model, schedule, data, config

    @property
    def loss_fn(self) -> LossFn:
        """The training loss: :func:`denoising_loss`, weighted as the recipe says."""
        if not self.min_snr_gamma:
            return denoising_loss
        return functools.partial(denoising_loss, min_snr_gamma=self.min_snr_gamma)

    def digest(self, with_steps: bool = True) -> str:
        """Return a short hash of the recipe and the resulting configs (names cache files).

        ``with_steps=False`` leaves the step budget out: it names a training run, which the
        same command with more steps extends.
        """
        profile, model, schedule, config = self._model_schedule_config()
        size = profile.num_train_images if self.dataset in ("shapes", "simple-shapes") else None
        # The resolved step count, so that "the profile's steps" and the same number given
        # explicitly name one recipe.
        steps = config.steps if with_steps else None
        fields = asdict(replace(self, steps=steps))
        # Options at their defaults are left out, as before they existed: old names still hold.
        if fields["padding"] == "zeros":
            del fields["padding"]
        if not fields["min_snr_gamma"]:
            del fields["min_snr_gamma"]
        if fields["res_blocks"] in (None, profile.num_res_blocks):
            del fields["res_blocks"]
        blob = json.dumps(
            [
                fields,
                model.config.to_dict(),
                schedule.config(),
                asdict(replace(config, steps=steps or 1)),
                [size, profile.image_size],
            ],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def same_model(self, other: Recipe) -> bool:
        """Whether ``other`` trains the same model: everything but the precision agrees.

        bf16 autocast changes the arithmetic of training, not which model it trains, so a
        checkpoint trained in bf16 stands for the same recipe in fp32.
        """
        return replace(self, precision="auto").digest() == replace(other, precision="auto").digest()

    @classmethod
    def from_command(cls, command: str, profile: str | None = None) -> Recipe:
        """Return the recipe of a training command, as the manifest records it.

        command: ``python -m fdiff.train ...`` (the leading ``python -m fdiff.train`` is
        optional). ``profile``: the one to assume when the command names none.
        """
        words = shlex.split(command)
        if words[:3] == ["python", "-m", "fdiff.train"]:
            words = words[3:]
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):  # argparse prints its complaint, then exits
                args = _parser().parse_args(words)
        except SystemExit:
            reason = said.getvalue().strip().splitlines()[-1:] or ["unreadable"]
            raise ValueError(f"not a valid training command: {command!r} ({reason[0]})") from None
        return _recipe_from_args(args, profile)


def run_recipe(recipe: Recipe, resume: Path, progress: bool = True, root=None, download=False):
    """Train the recipe's model (resuming from ``resume`` if it exists); return what to save.

    ``root`` and ``download``: where a real dataset's files are, and whether to fetch them.
    """
    model, schedule, data, config = recipe.parts(root, download, progress)
    device = default_device()
    snapshot, tensors = None, {}
    if recipe.kind == "factorized":
        probe = recipe.data(root, download, "test")
        snapshot, tensors = _partition_probe(schedule, probe, device)
    result = train(
        model.to(device),
        schedule,
        data,
        config,
        checkpoint=resume,
        loss_fn=recipe.loss_fn,
        progress=progress,
        snapshot=snapshot,
        snapshot_every=max(1, config.steps // 30),
    )
    if result.snapshots:
        tensors["snapshot_masks"] = torch.stack(result.snapshots)
        tensors["snapshot_steps"] = torch.tensor(result.snapshot_steps, dtype=torch.int64)
    extra = {
        "schedule": schedule.config(),
        "profile": recipe.profile,
        "dataset": recipe.dataset,
        "steps": result.step,
        "seconds": round(result.seconds, 1),
        "device": str(device),
        "losses": [round(v, 5) for v in result.losses],
    }
    return result.ema.cpu(), extra, tensors


def _partition_probe(schedule: NoiseSchedule, probe_data, device: torch.device, num_images=6):
    """Return the snapshot function of a factorized model's training and the probe it uses.

    The probe is the first ``num_images`` held-out images (``probe_data``, the test split)
    with one fixed noise tensor; each snapshot is the masks at
    :func:`~fdiff.factorized.snapshot_timesteps` as uint8 (0..255) of all regions but the last,
    shape (P, n_t, K - 1, H, W): the masks sum to one, so the last is implied and storing it
    would only make checkpoints bigger. :func:`partition_snapshots` restores it.
    """
    from .data import stack_images
    from .factorized import masks_over_t, snapshot_timesteps

    x0 = stack_images(probe_data, range(min(num_images, len(probe_data))))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1234))
    ts = snapshot_timesteps(schedule.num_timesteps)

    def snapshot(model: nn.Module) -> Tensor:
        masks = masks_over_t(model, schedule, x0.to(device), ts, noise.to(device))
        return (masks[:, :, :-1].float() * 255).round().to(torch.uint8)

    tensors = {
        "snapshot_images": x0,
        "snapshot_timesteps": torch.tensor(ts, dtype=torch.int64),
    }
    return snapshot, tensors


def partition_snapshots(tensors: dict[str, Tensor]) -> Tensor:
    """Return a factorized checkpoint's training snapshots with every region's mask.

    ``tensors``: the ``meta["tensors"]`` of the checkpoint. Returns uint8 (S, P, n_t, K, H, W)
    in 0..255 (S snapshots of P probe images at n_t timesteps): the stored K - 1 masks and the
    last one as 255 minus their sum, so the K masks sum to 255 (exactly for K = 2; for more
    regions the K - 1 stored roundings can push the sum a little past it).
    """
    if "snapshot_masks" not in tensors:
        raise KeyError("no partition snapshots here: only factorized training records them")
    head = tensors["snapshot_masks"]
    last = (255 - head.int().sum(dim=3, keepdim=True)).clamp(0, 255).to(torch.uint8)
    return torch.cat([head, last], dim=3)


def cache_dir() -> Path:
    """Return the folder for downloads and self-trained checkpoints (``$FDIFF_CACHE``)."""
    env = os.environ.get("FDIFF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fdiff"


def load_or_train(
    name: str,
    kind: str = "unet",
    profile=None,
    progress: bool = True,
    root=None,
    download: bool = False,
    device: str | torch.device | None = None,
    **recipe,
):
    """Return (model, metadata): the committed checkpoint ``name`` if it was trained for this
    profile and recipe, else a cached self-trained one, else train it now (resumable) and
    cache it. The model is in eval mode on ``device`` (default: a GPU if there is one).

    ``recipe``: further :class:`Recipe` fields (``steps``, ``res_blocks``, ``num_regions``,
    ``mode``, ``shared_decoder``, ``dataset``...). ``root``/``download``: where a real dataset is.
    The cache file name includes a hash of the full recipe, so a stale file is never loaded.
    On Colab, point ``FDIFF_CACHE`` at Google Drive to keep checkpoints across disconnects.
    """
    from .checkpoints import load_model, load_pretrained, read_manifest
    from .profiles import get_profile

    profile = profile or get_profile()
    spec = Recipe(kind=kind, profile=profile.name, **recipe)
    device = default_device() if device is None else torch.device(device)
    entry = read_manifest().get(name)
    if entry is not None and _entry_matches(entry, spec):
        model, meta = load_pretrained(name)
        # A checkpoint of the profile's former widths is not this recipe's model.
        if model.config.to_dict() == spec.model_config():
            return model.to(device), meta
    path = cache_dir() / "checkpoints" / f"{name}-{profile.name}-{spec.digest()}.safetensors"
    if not path.exists():
        resume = path.with_suffix(".resume")
        ema, extra, tensors = run_recipe(spec, resume, progress, root, download)
        save_model(path, ema, extra=extra, tensors=tensors)
        resume.unlink(missing_ok=True)
    model, meta = load_model(path)
    return model.to(device), meta


def _entry_matches(entry: dict, recipe: Recipe) -> bool:
    """Whether a manifest entry was trained by ``recipe``: the command it records gives the
    same model (kind, variant, profile, dataset, schedule, seed and step budget)."""
    if entry.get("profile") != recipe.profile:
        return False
    try:
        made = Recipe.from_command(entry["command"], profile=entry["profile"])
    except (KeyError, ValueError):
        return False
    return made.same_model(recipe) and entry.get("steps") == made.budget


_DESCRIPTION = (
    "Train a model (on the built-in data, or a real dataset with --dataset) and publish its EMA "
    "weights to the manifest."
)


def _parser() -> argparse.ArgumentParser:
    from .data import DATASET_NAMES

    parser = argparse.ArgumentParser(prog="python -m fdiff.train", description=_DESCRIPTION)
    parser.add_argument("--model", default="unet", choices=["unet", "factorized"])
    parser.add_argument("--profile", default=None, help="ci, cpu or gpu (default: $FDIFF_PROFILE)")
    parser.add_argument("--name", required=True, help="manifest name of the checkpoint")
    parser.add_argument("--steps", type=int, default=None, help="override the profile's steps")
    parser.add_argument("--schedule", default="cosine", choices=["linear", "cosine"])
    parser.add_argument("--out-dir", default=None, help="default: data/checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--regions", type=int, default=2, help="factorized model: K")
    parser.add_argument(
        "--mode",
        default="multiply",
        choices=["multiply", "concat", "mask_mid"],
        help="factorized model: how the decoder sees its mask (ablations)",
    )
    parser.add_argument(
        "--unshared-decoders",
        action="store_true",
        help="factorized model: one decoder per region (ablation)",
    )
    parser.add_argument(
        "--mask-noise",
        type=float,
        default=0.0,
        help="factorized model: Gumbel noise on the mask logits in training (not in the paper)",
    )
    parser.add_argument(
        "--dataset",
        default="shapes",
        choices=DATASET_NAMES,
        help="training images: the built-in shapes, their simplest form simple-shapes (one flat "
        "shape on a flat background), or a real dataset (all but its test split)",
    )
    parser.add_argument(
        "--padding",
        default="zeros",
        choices=["zeros", "replicate"],
        help="how convolutions pad the image's border (replicate: repeat the border pixels)",
    )
    parser.add_argument(
        "--min-snr-gamma",
        type=float,
        default=0.0,
        help="weight each timestep's loss by min(SNR, gamma) / SNR (Min-SNR; 0: unweighted)",
    )
    parser.add_argument(
        "--res-blocks",
        type=int,
        default=None,
        help="residual blocks per resolution (default: the profile's)",
    )
    parser.add_argument("--data-root", default=None, help="real datasets' folder")
    parser.add_argument("--download", action="store_true", help="fetch a missing real dataset")
    return parser


def _recipe_from_args(args: argparse.Namespace, profile: str | None = None) -> Recipe:
    """The recipe of parsed command-line arguments; ``profile`` if the command names none."""
    from .profiles import get_profile

    return Recipe(
        kind=args.model,
        profile=get_profile(args.profile or profile).name,
        schedule=args.schedule,
        seed=args.seed,
        steps=args.steps,
        precision=args.precision,
        num_regions=args.regions,
        mode=args.mode,
        shared_decoder=not args.unshared_decoders,
        mask_noise=args.mask_noise,
        dataset=args.dataset,
        padding=args.padding,
        min_snr_gamma=args.min_snr_gamma,
        res_blocks=args.res_blocks,
    )


def main(argv: list[str] | None = None) -> None:
    """Train a model and publish its EMA weights to the manifest (see ``--help``)."""
    from .checkpoints import checkpoint_dir, register_checkpoint

    args = _parser().parse_args(argv)
    command = "python -m fdiff.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    recipe = _recipe_from_args(args)
    # Outside the repository, in the cache (on Colab, point FDIFF_CACHE at Google Drive).
    # Named by the recipe too: a changed flag starts a new run instead of resuming another.
    run_name = f"{args.name}-{recipe.digest(with_steps=False)}"
    resume = cache_dir() / "runs" / f"{run_name}.resume.safetensors"
    ema, extra, tensors = run_recipe(recipe, resume, root=args.data_root, download=args.download)
    final = (Path(args.out_dir) if args.out_dir else checkpoint_dir()) / f"{args.name}.safetensors"
    save_model(final, ema, extra=extra, tensors=tensors)
    tail = extra["losses"][-100:]
    entry = register_checkpoint(
        args.name,
        final,
        command,
        duration_s=extra["seconds"],
        steps=extra["steps"],
        profile=recipe.profile,
        dataset=recipe.dataset,
        schedule=extra["schedule"],
        device=extra["device"],
        precision=recipe.precision,
        final_loss=round(sum(tail) / len(tail), 5),
        torch=torch.__version__,
    )
    print(json.dumps({args.name: entry}, indent=2))


if __name__ == "__main__":
    main()
