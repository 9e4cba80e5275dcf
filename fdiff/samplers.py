"""Reverse processes: DDPM ancestral sampling, DDIM, and DDIM inversion.

``sample`` is a generator that yields every step of the trajectory, so a chapter can draw the
reverse process or stop early; ``generate`` runs it to the end. Randomness comes from
``generator``: one ``torch.Generator`` for the whole batch, or a list of one generator per sample
(:func:`fdiff.seeding.per_sample_generators`), which makes sample i independent of the batch
size. Without one, a generator seeded with 0 is used: the same call gives the same samples.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import check_finite, check_images, check_int
from .profiles import model_device
from .schedules import NoiseSchedule
from .seeding import make_generator, randn

__all__ = [
    "Step",
    "ddpm_step",
    "ddim_step",
    "ddim_timesteps",
    "sample",
    "generate",
    "ddim_invert",
    "regenerate",
]

Generator = torch.Generator | Sequence[torch.Generator] | None
# eps_theta(x_t, t) -> eps; a U-Net, or a closure that adds a condition or guidance.
Denoiser = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Step:
    """One step of a trajectory: ``xt`` is the image reached at timestep ``t`` (-1: the final,
    clean sample) and ``x0`` the model's estimate of the clean image made on the way there."""

    t: int
    xt: Tensor
    x0: Tensor


def _full_t(value: int, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), value, dtype=torch.int64, device=like.device)


def ddpm_step(
    schedule: NoiseSchedule,
    eps: Tensor,
    t: Tensor,
    xt: Tensor,
    generator: Generator = None,
    noise: Tensor | None = None,
    clip_x0: bool = True,
) -> tuple[Tensor, Tensor]:
    """Take one ancestral step x_t -> x_{t-1} of DDPM (Ho et al., 2020, eqs. 6-7).

    Uses the posterior q(x_{t-1} | x_t, x0_hat) with x0_hat from the predicted eps (clipped to
    [-1, 1] if ``clip_x0``) and variance ``beta_tilde_t`` ("fixed small"); no noise is added at
    t = 0. The noise is ``noise``, else drawn from ``generator`` (one of them is needed).
    eps, xt: (B, C, H, W); t: int64 (B,). Returns (x_{t-1}, x0_hat).
    """
    x0 = schedule.eps_to_x0(xt, eps, t)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    ab_t = schedule.alpha_bar_at(t, xt)
    ab_prev = schedule.alpha_bar_at(t - 1, xt)
    beta_t = 1 - ab_t / ab_prev
    # Posterior mean: coefficients of x0_hat and x_t (eq. 7).
    mean = (ab_prev.sqrt() * beta_t / (1 - ab_t)) * x0 + (
        (1 - beta_t).sqrt() * (1 - ab_prev) / (1 - ab_t)
    ) * xt
    var = ((1 - ab_prev) / (1 - ab_t) * beta_t).clamp(min=1e-20)
    if noise is None:
        noise = randn(xt.shape, generator, device=xt.device, dtype=xt.dtype)
    nonzero = (t > 0).to(xt.dtype).view(-1, 1, 1, 1)
    return mean + nonzero * var.sqrt() * noise, x0


def ddim_step(
    schedule: NoiseSchedule,
    eps: Tensor,
    t: Tensor,
    t_prev: Tensor,
    xt: Tensor,
    eta: float = 0.0,
    generator: Generator = None,
    noise: Tensor | None = None,
    clip_x0: bool = True,
) -> tuple[Tensor, Tensor]:
    """Take one DDIM step x_t -> x_{t_prev} (Song et al., 2021, eq. 12).

    ``x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev))``. eta = 0 is the
    deterministic sampler, eta = 1 matches DDPM's variance. ``t_prev = -1`` means alpha_bar = 1.
    eps, xt: (B, C, H, W); t, t_prev: int64 (B,). Returns (x_{t_prev}, x0_hat).
    """
    x0 = schedule.eps_to_x0(xt, eps, t)
    if clip_x0:
        x0 = x0.clamp(-1, 1)  # the direction term below keeps the model's own eps
    ab_t = schedule.alpha_bar_at(t, xt)
    ab_prev = schedule.alpha_bar_at(t_prev, xt)
    sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
    x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            noise = randn(xt.shape, generator, device=xt.device, dtype=xt.dtype)
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def ddim_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """Return the DDIM timesteps, descending: ``k * (T // num_steps)`` for k = num_steps-1..0.

    This is the "leading" spacing (diffusers' default); the last step lands on t = 0.
    """
    check_int(num_steps, "num_steps", 1, num_timesteps)
    stride = num_timesteps // num_steps
    return [k * stride for k in reversed(range(num_steps))]


@torch.no_grad()
def sample(
    model: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    method: str = "ddim",
    num_steps: int | None = None,
    eta: float = 0.0,
    generator: Generator = None,
    device: str | torch.device | None = None,
    xT: Tensor | None = None,
    clip_x0: bool = True,
    t_start: int | None = None,
) -> Iterator[Step]:
    """Run the reverse process from x_T ~ N(0, I), yielding a :class:`Step` after every step.

    model: eps_theta(x_t, t). shape: (B, C, H, W). method: "ddpm" (all T steps; ``num_steps``
    and ``eta`` must stay unset) or "ddim" (``num_steps`` steps, default 50). The last yielded
    ``xt`` is the sample, in about [-1, 1].
    ``t_start``: start from step ``t_start`` instead of T - 1, with ``xT`` the images at that
    step (DDIM then takes its grid's steps below ``t_start``); see :func:`regenerate`.

    The model runs on its own device (or ``device``: give it when ``model`` is a closure, which
    has no parameters to tell); the yielded images are on ``xT``'s device, or on the CPU when the
    noise is drawn here, whatever device the model is on.
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {tuple(shape)}")
    if xT is not None and tuple(xT.shape) != tuple(shape):
        raise ValueError(f"xT must have the given shape {tuple(shape)}, got {tuple(xT.shape)}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < math.inf:
        raise ValueError(
            f"eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM's variance), "
            f"got {eta!r}"
        )
    if xT is not None:
        check_finite(xT, "xT")
    if method == "ddpm" and (num_steps is not None or eta != 0):
        raise ValueError(
            f"num_steps and eta are DDIM's settings; method='ddpm' runs all T steps with its own "
            f"variance (got num_steps={num_steps}, eta={eta}): use method='ddim' to set them"
        )
    T = schedule.num_timesteps
    if t_start is not None:
        t_start = check_int(t_start, "t_start", 0, T - 1)
        if xT is None:
            raise ValueError("t_start needs xT, the images at step t_start")
    if device is None:
        device = model_device(model)
    if generator is None:
        generator = make_generator(0)
    out = xT.device if xT is not None else torch.device("cpu")
    xt = randn(shape, generator, device=device) if xT is None else xT.to(device)
    if method == "ddpm":
        for t in reversed(range(T if t_start is None else t_start + 1)):
            tt = _full_t(t, xt)
            eps = model(xt, tt).float()
            xt, x0 = ddpm_step(schedule, eps, tt, xt, generator=generator, clip_x0=clip_x0)
            # xt is now x_{t-1}, labelled as DDIM's steps are below.
            yield Step(t - 1, xt.to(out), x0.to(out))
        return
    steps = ddim_timesteps(T, 50 if num_steps is None else num_steps)
    if t_start is not None:
        steps = [t_start] + [t for t in steps if t < t_start]
    for t, t_prev in zip(steps, steps[1:] + [-1]):
        tt = _full_t(t, xt)
        eps = model(xt, tt).float()
        xt, x0 = ddim_step(
            schedule,
            eps,
            tt,
            _full_t(t_prev, xt),
            xt,
            eta=eta,
            generator=generator,
            clip_x0=clip_x0,
        )
        yield Step(t_prev, xt.to(out), x0.to(out))


def generate(model: Denoiser, schedule: NoiseSchedule, shape: Sequence[int], **kwargs) -> Tensor:
    """Run :func:`sample` to the end and return the final x_0 (B, C, H, W), clamped to [-1, 1]."""
    (last,) = deque(sample(model, schedule, shape, **kwargs), maxlen=1)  # keep only the end
    return last.xt.clamp(-1, 1)


def regenerate(
    model: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    t_start: int,
    noise: Tensor | None = None,
    generator: Generator = None,
    **kwargs,
) -> Tensor:
    """Noise images to step ``t_start``, then run the reverse process back to a clean image.

    This is SDEdit (Meng et al., ICLR 2022): what the model can rebuild from the signal left at
    ``t_start`` comes back, the rest is replaced by what the model finds likely. x0: (B, C, H, W)
    in [-1, 1]; ``noise`` (same shape) is the forward noise, else ``generator`` draws it;
    ``generator`` also drives the reverse process (DDPM, or DDIM with eta > 0). ``kwargs`` go to
    :func:`sample` (method, num_steps, eta...). Returns (B, C, H, W) in [-1, 1].
    """
    if generator is None:
        generator = make_generator(0)
    if noise is None:
        noise = randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
    tt = torch.full((x0.shape[0],), int(t_start), dtype=torch.int64, device=x0.device)
    xt = schedule.add_noise(x0, noise, tt)
    # The same generator goes on to the reverse process (DDPM, or DDIM with eta > 0).
    return generate(
        model, schedule, x0.shape, xT=xt, t_start=t_start, generator=generator, **kwargs
    )


@torch.no_grad()
def ddim_invert(
    model: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    num_steps: int = 50,
    t_end: int | None = None,
    device: str | torch.device | None = None,
) -> Iterator[Step]:
    """Map a real image to noise with deterministic DDIM run backwards, yielding every step.

    x0: (B, C, H, W) in [-1, 1]. From t_prev to the next larger t, with eps = eps_theta(x_{t_prev},
    t_prev): ``x_t = sqrt(ab_t) x0_hat + sqrt(1 - ab_t) eps`` (Song et al., 2021; Mokady et al.,
    2023). Stops at the last DDIM timestep, or at the largest one not above ``t_end``: the last
    yielded ``Step.t`` is the step the noisy image belongs to. Running :func:`sample` with
    ``method="ddim"``, the same ``num_steps``, eta = 0, ``clip_x0=False`` and ``xT`` = the last
    ``xt`` approximately reconstructs x0. The model runs on its own device (or ``device``, which
    a closure needs); the yielded images are on x0's.
    """
    if isinstance(x0, Tensor) and x0.ndim != 4:
        raise ValueError(f"x0 must have shape (B, C, H, W), got {tuple(x0.shape)}")
    check_images(x0, "x0")
    T = schedule.num_timesteps
    if t_end is not None:
        t_end = check_int(t_end, "t_end", 0, T - 1)
    out = x0.device
    x0 = x0.to(model_device(model) if device is None else device)
    steps = list(reversed(ddim_timesteps(T, num_steps)))  # ascending
    if t_end is not None:
        steps = [t for t in steps if t <= t_end]
    xt = x0
    t_prev = -1
    for t in steps:
        tp = _full_t(t_prev, xt)
        ab_prev = schedule.alpha_bar_at(tp, xt)
        ab_t = schedule.alpha_bar_at(_full_t(t, xt), xt)
        # At t_prev = -1 x_t is the clean image; the model is queried at the nearest real t.
        eps = model(xt, _full_t(max(t_prev, 0), xt)).float()
        x0_hat = (xt - (1 - ab_prev).sqrt() * eps) / ab_prev.sqrt()
        xt = ab_t.sqrt() * x0_hat + (1 - ab_t).sqrt() * eps
        yield Step(t, xt.to(out), x0_hat.to(out))
        t_prev = t
