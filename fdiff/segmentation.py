"""Segmenting images with a trained factorized denoiser, and what its partition is worth.

- :func:`segment`: noise real images to a small t, run one forward pass, read the masks (the
  paper's recipe: t = 30 of a linear schedule of 1000 steps, about t = 63 of the cosine one);
- :func:`segment_dataset`: the same over a dataset, the noise of image i fixed by (seed, i);
- :func:`generate_with_masks`: samples with the masks the model used near the end of sampling;
- :func:`uniform_mask_gap`: the loss with the model's masks against uniform 1/K masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_int, check_t
from .factorized import FactorizedDenoiser
from .profiles import model_device
from .seeding import make_generator, randn

__all__ = ["segment", "segment_dataset", "generate_with_masks", "uniform_mask_gap",
           "single_region_gap"]


@torch.no_grad()
def segment(
    model: FactorizedDenoiser,
    schedule,
    x0: Tensor,
    t: int,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Segment real images: noise them to step ``t``, run one forward pass, return the masks.

    x0: (B, C, H, W) in [-1, 1]; t: an int in [0, T). The noise is ``noise``, else drawn from
    ``generator`` (default: seed 0). Returns soft masks (B, K, H, W); their argmax over K is
    the segmentation. The paper uses t = 30 of a linear schedule of 1000 steps. The model runs
    on its own device; the masks come back on x0's.
    """
    t = check_t(t, schedule)
    if noise is None:  # drawn on the generator's device, then moved to x0's
        noise = randn(x0.shape, generator or make_generator(0), device=x0.device, dtype=x0.dtype)
    device = model_device(model)
    tt = torch.full((x0.shape[0],), t, dtype=torch.int64, device=device)
    xt = schedule.add_noise(x0.to(device), noise.to(device), tt)
    _, masks = model(xt, tt, return_masks=True)
    return masks.to(x0.device)


@torch.no_grad()
def segment_dataset(
    model: FactorizedDenoiser,
    schedule,
    dataset,
    t: int,
    num_images: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> Tensor:
    """Segment the first ``num_images`` images of ``dataset`` at step ``t``; return soft masks.

    The noise of image i comes from ``make_generator(seed, i)``, so a sweep over t or over
    models sees the same noise. Returns (N, K, H, W) float masks on the CPU.
    """
    from tqdm.auto import tqdm

    from .data import stack_images

    t = check_t(t, schedule)
    n = len(dataset) if num_images is None else min(check_int(num_images, "num_images", 1),
                                                    len(dataset))
    if n == 0:
        raise ValueError("segment_dataset got a dataset without images: nothing to segment")
    out = []
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc=f"segment t={t}"):
        idx = list(range(start, min(n, start + batch_size)))
        x0 = stack_images(dataset, idx)
        noise = torch.cat([randn((1, *x0.shape[1:]), make_generator(seed, i)) for i in idx])
        out.append(segment(model, schedule, x0, t, noise=noise).cpu())
    return torch.cat(out)


@torch.no_grad()
def generate_with_masks(
    model: FactorizedDenoiser, schedule, shape, t_mask: int, **sample_kwargs
) -> tuple[Tensor, Tensor]:
    """Generate images and the masks the model itself used near the end of sampling.

    Runs :func:`fdiff.samplers.sample` (keyword arguments pass through) and, at the visited
    timestep closest to ``t_mask``, reads the masks of that step's x_t. Returns the samples
    (B, C, H, W) clamped to [-1, 1] and the masks (B, K, H, W), where :func:`sample` puts
    its images (the CPU unless ``xT`` is elsewhere).
    """
    from .samplers import sample

    check_t(t_mask, schedule)
    closest = None
    last = None
    for st in sample(model, schedule, shape, **sample_kwargs):
        if st.t >= 0 and (closest is None or abs(st.t - t_mask) < abs(closest.t - t_mask)):
            closest = st
        last = st
    if closest is None:
        raise ValueError("sampling visited no timestep to read masks at")
    device = model_device(model)
    tt = torch.full((shape[0],), closest.t, dtype=torch.int64, device=device)
    _, masks = model(closest.xt.to(device), tt, return_masks=True)
    return last.xt.clamp(-1, 1), masks.to(last.xt.device)


def _losses_with_masks(model, schedule, x0: Tensor, t: int, noise: Tensor | None,
                       batch_size: int, replacements: dict) -> dict[str, float]:
    """The mean denoising loss of ``x0`` noised to ``t`` with the model's own masks (``"own"``)
    and with each replacement: ``name -> fn(n, K, H, W, device)`` giving (n, K, H, W) masks."""
    t = check_t(t, schedule)
    if noise is None:
        noise = randn(x0.shape, make_generator(0))
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    device = model_device(model)
    k = model.config.num_regions
    totals = dict.fromkeys(["own", *replacements], 0.0)
    for s in range(0, len(x0), batch_size):
        x, e = x0[s:s + batch_size].to(device), noise[s:s + batch_size].to(device)
        tt = torch.full((len(x),), t, dtype=torch.int64, device=device)
        xt = schedule.add_noise(x, e, tt)
        totals["own"] += (model(xt, tt).float() - e).pow(2).sum().item()
        for name, make in replacements.items():
            masks = make(len(x), k, *x.shape[-2:], device)
            totals[name] += (model(xt, tt, masks=masks).float() - e).pow(2).sum().item()
    return {name: total / noise.numel() for name, total in totals.items()}


@torch.no_grad()
def uniform_mask_gap(model: FactorizedDenoiser, schedule, x0: Tensor, t: int,
                     noise: Tensor | None = None, batch_size: int = 64) -> dict[str, float]:
    """Measure what the learned masks are worth to the denoiser at step ``t``, against uniform
    masks.

    Noises ``x0`` (N, C, H, W) in [-1, 1] to ``t`` (with ``noise``, default seed 0) and returns
    the denoising loss with the model's own masks (``loss``), with every mask replaced by the
    uniform 1/K (``uniform_loss``), and the relative increase ``gap = uniform / own - 1``. With
    uniform masks every region's decoder run sees the same input, the skips scaled by 1/K: a gap
    near 0 says the masks do not help the denoising. A large gap does not prove a partition,
    though: a collapsed model (one region everywhere) also loses when its skips are scaled
    down; :func:`single_region_gap` compares with one region instead.
    """
    def uniform(n, k, h, w, device):
        return torch.full((n, k, h, w), 1 / k, device=device)

    losses = _losses_with_masks(model, schedule, x0, t, noise, batch_size, {"uniform": uniform})
    return {"loss": losses["own"], "uniform_loss": losses["uniform"],
            "gap": losses["uniform"] / losses["own"] - 1}


@torch.no_grad()
def single_region_gap(model: FactorizedDenoiser, schedule, x0: Tensor, t: int,
                      noise: Tensor | None = None, batch_size: int = 64) -> dict[str, float]:
    """Measure what the partition is worth against no partition at all: the loss rise when one
    region takes every pixel (the best of the K choices, ``region``).

    Same arguments as :func:`uniform_mask_gap`. Returns ``loss`` (own masks), ``single_loss``
    and ``gap = single / own - 1``. One region with mask 1 gives its decoder run the full skips:
    the model is then exactly a plain U-Net. A gap near 0 says the model is that U-Net (it has
    collapsed, whatever its soft masks look like); a positive gap, that splitting the image
    helps the denoising.
    """
    def one(j):
        def make(n, k, h, w, device):
            masks = torch.zeros(n, k, h, w, device=device)
            masks[:, j] = 1
            return masks
        return make

    k = model.config.num_regions
    losses = _losses_with_masks(model, schedule, x0, t, noise, batch_size,
                                {j: one(j) for j in range(k)})
    region = min(range(k), key=lambda j: losses[j])
    return {"loss": losses["own"], "single_loss": losses[region], "region": region,
            "gap": losses[region] / losses["own"] - 1}
