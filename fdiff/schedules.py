"""Noise schedules and the forward process q(x_t | x_0).

Notation (Ho et al., 2020): ``beta_t`` the per-step variance, ``alpha_t = 1 - beta_t``,
``alpha_bar_t = prod_{s<=t} alpha_s``. Timesteps are integers ``t`` in ``[0, T)`` stored as int64
tensors of shape (B,). Schedules are computed in float64 and stored in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import check_finite, check_images, check_t

__all__ = ["NoiseSchedule", "ScheduleConfig", "linear_betas", "cosine_betas", "step_of"]


def step_of(t_of_1000: int, num_timesteps: int) -> int:
    """A step given out of 1000 (as the book states them) on a chain of ``num_timesteps``."""
    return min(num_timesteps - 1, round(t_of_1000 * num_timesteps / 1000))


def linear_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, max_beta: float = 0.999
) -> Tensor:
    """Return the linear schedule of Ho et al. (2020): betas evenly spaced, float64, shape (T,).

    The endpoints are rescaled by ``1000 / T`` so that shorter chains keep the same total noise.
    Betas are capped at ``max_beta`` (as in the cosine schedule): for T <= 20 the rescaled end
    would reach 1 or more, leaving alpha_bar at zero or negative.
    """
    scale = 1000.0 / num_timesteps
    betas = torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)
    return betas.clamp(max=max_beta)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Return the cosine schedule of Nichol & Dhariwal (2021), float64, shape (T,).

    ``alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2)`` for ``u = t / T``, and
    ``beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), max_beta)``.
    """
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return torch.clamp(1 - f[1:] / f[:-1], max=max_beta)


_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


@dataclass(frozen=True)
class ScheduleConfig:
    """Which schedule a run uses: ``kind`` ("linear" or "cosine") and its ``num_timesteps``."""

    kind: str = "cosine"
    num_timesteps: int = 1000

    def __post_init__(self):
        NoiseSchedule(self.kind, self.num_timesteps)  # the same checks, the same messages

    def build(self) -> NoiseSchedule:
        """Return the :class:`NoiseSchedule` this config describes."""
        return NoiseSchedule(self.kind, self.num_timesteps)


class NoiseSchedule:
    """A discrete noise schedule with the forward process and prediction conversions.

    Example::

        schedule = NoiseSchedule("cosine", num_timesteps=1000)
        xt = schedule.add_noise(x0, eps, t)           # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
        x0_hat = schedule.eps_to_x0(xt, eps_hat, t)
    """

    def __init__(self, kind: str = "linear", num_timesteps: int = 1000):
        if kind not in _SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}: expected one of {sorted(_SCHEDULES)}")
        if not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
        self.kind = kind
        self.num_timesteps = num_timesteps
        betas = _SCHEDULES[kind](num_timesteps)
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        self.betas = betas.float()
        self.alphas = alphas.float()
        self.alpha_bar = alpha_bar.float()

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.kind!r}, num_timesteps={self.num_timesteps})"

    def config(self) -> dict:
        """Return the constructor arguments, for saving next to model weights."""
        return {"kind": self.kind, "num_timesteps": self.num_timesteps}

    # -- indexing ---------------------------------------------------------------------------

    def check_t(self, t: Tensor, batch_size: int | None = None) -> None:
        """Raise a clear error unless ``t`` is an int64 tensor of shape (B,) in ``[0, T)``."""
        if not isinstance(t, Tensor) or t.dtype != torch.int64:
            raise TypeError(f"t must be an int64 tensor of shape (B,), got {_describe(t)}")
        if t.ndim != 1 or (batch_size is not None and t.shape[0] != batch_size):
            want = f"({batch_size},)" if batch_size is not None else "(B,)"
            raise ValueError(f"t must have shape {want}, got {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"t must lie in [0, {self.num_timesteps}), got values in "
                f"[{int(t.min())}, {int(t.max())}]"
            )

    def gather(self, values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """Return ``values[t]`` shaped (B, 1, 1, 1) on ``like``'s device and dtype."""
        self.check_t(t, like.shape[0])
        out = values.to(like.device)[t]
        return out.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def alpha_bar_at(self, t: Tensor, like: Tensor) -> Tensor:
        """Return ``alpha_bar_t`` shaped to broadcast against ``like``; t = -1 gives 1."""
        padded = torch.cat([self.alpha_bar, torch.ones(1)])  # index -1 -> 1.0
        if not isinstance(t, Tensor) or t.dtype != torch.int64:
            raise TypeError(f"t must be an int64 tensor of shape (B,), got {_describe(t)}")
        if t.numel() and (int(t.min()) < -1 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"t must lie in [-1, {self.num_timesteps}), got {t.tolist()}")
        out = padded.to(like.device)[t]
        return out.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    # -- forward process ---------------------------------------------------------------------

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Sample q(x_t | x_0): ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``.

        x0, eps: (B, C, H, W), x0 float in [-1, 1] (fdiff's image contract, checked here, where
        images enter every method), eps ~ N(0, I). t: int64 (B,). Returns x_t, same shape.
        """
        check_images(x0, "x0", ndim=x0.ndim if isinstance(x0, Tensor) else 4)
        check_finite(eps, "eps")
        if x0.shape != eps.shape:
            raise ValueError(f"x0 and eps must have the same shape, got {x0.shape} and {eps.shape}")
        ab = self.gather(self.alpha_bar, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    # -- conversions between parameterisations ------------------------------------------------

    def eps_to_x0(self, xt: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Return ``x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)``."""
        ab = self.gather(self.alpha_bar, t, xt)
        return (xt - (1 - ab).sqrt() * eps) / ab.sqrt()

    def x0_to_eps(self, xt: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """Return ``eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)``."""
        ab = self.gather(self.alpha_bar, t, xt)
        return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()

    def velocity(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Return the v target of Salimans & Ho (2022): ``v = sqrt(ab) eps - sqrt(1 - ab) x0``."""
        ab = self.gather(self.alpha_bar, t, x0)
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0

    def v_to_eps(self, xt: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """Return ``eps = sqrt(1 - ab) x_t + sqrt(ab) v`` (inverse of :meth:`velocity`)."""
        ab = self.gather(self.alpha_bar, t, xt)
        return (1 - ab).sqrt() * xt + ab.sqrt() * v

    def v_to_x0(self, xt: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """Return ``x0 = sqrt(ab) x_t - sqrt(1 - ab) v``."""
        ab = self.gather(self.alpha_bar, t, xt)
        return ab.sqrt() * xt - (1 - ab).sqrt() * v

    def snr(self, t: Tensor) -> Tensor:
        """Return the signal-to-noise ratio ``alpha_bar_t / (1 - alpha_bar_t)`` at ``t``, (B,)."""
        self.check_t(t)
        ab = self.alpha_bar.to(t.device)[t]
        return ab / (1 - ab)

    def same_noise_t(self, other: NoiseSchedule, t: int) -> int:
        """Return the timestep of this schedule whose noise level (``alpha_bar``) is nearest to
        ``other``'s at step ``t``: where a recipe stated for another schedule applies here."""
        target = other.alpha_bar[check_t(t, other)]
        return int((self.alpha_bar - target).abs().argmin())


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__
