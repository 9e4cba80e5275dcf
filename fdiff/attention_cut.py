"""AttentionCut: a binary object mask from a diffusion model's self-attention and a graph cut.

DiffusionSeg (Ma et al., 2023) reads object masks off a diffusion model's attention and cleans
them with a graph cut, without training. The paper does not give its energy; this module's is:

1. **A foreground score per pixel** (:func:`foreground_score`), from the attention maps
   (B, N, N) of the U-Net's self-attention at step ``t``, averaged over heads and layers:

   - ``"border"`` (the default): background surrounds objects, and a background token spends
     its attention on other background, much of it on the image's border. The score of token
     ``i`` is one minus the attention it pays to the border tokens ``B``,
     ``sum_{j in B} A[i, j]``, rescaled to [0, 1] per image. (The attention the border pays to
     ``i``, ``A[B, i]``, was measured too, alone and averaged with it: both worse, chapter 5);
   - ``"centre"``: objects sit near the middle; the score is the attention a token pays to a
     Gaussian centre weight, rescaled;
   - ``"colour"``: a control without the model, how far a pixel's colour is from the mean
     colour of the border pixels, rescaled.

   Token scores are upsampled bilinearly to pixels.
2. **A cut** (:func:`graph_cut`): the binary mask ``m`` minimising

   ``E(m) = sum_p U_p(m_p) + weight * sum_{p~q} exp(-beta |I_p - I_q|^2) [m_p != m_q]``

   with unaries ``U_p(1) = -log s_p``, ``U_p(0) = -log(1 - s_p)`` from the score ``s``
   (clamped away from 0 and 1), 4-connected neighbours, ``beta = 1 / (2 mean |I_p - I_q|^2)``
   over the image (the contrast term of GrabCut), solved exactly by max-flow (PyMaxflow).
   ``weight = 0`` thresholds the score at one half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import attention_maps

__all__ = ["CutConfig", "PRIORS", "LAYER_GROUPS", "foreground_score", "graph_cut",
           "cut_energy", "cut_scores", "mean_attention", "attention_cut", "sweep_cut"]

PRIORS = ("border", "centre", "colour")


def _rescale(x: Tensor) -> Tensor:
    """Rescale each image's values (B, ...) to [0, 1]; a constant image becomes 0.5."""
    flat = x.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = (hi - lo).clamp(min=1e-12)
    out = (flat - lo[:, None]) / span[:, None]
    out[(hi - lo) < 1e-12] = 0.5
    return out.view_as(x)


def _border(h: int, w: int) -> Tensor:
    ring = torch.zeros(h, w, dtype=torch.bool)
    ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
    return ring.flatten()


def foreground_score(attn: Tensor | None, images: Tensor, prior: str = "border",
                     sigma: float = 0.25) -> Tensor:
    """Foreground score (B, H, W) in [0, 1] of ``images`` (B, 3, H, W).

    ``attn``: attention maps (B, N, N) over a square grid of N tokens (unused by ``"colour"``);
    ``prior``: one of :data:`PRIORS`; ``sigma``: the centre weight's width, as a fraction of
    the image side.
    """
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    if prior == "colour":
        ring = _border(h, w)
        pixels = images.flatten(2)  # (B, 3, HW)
        ground = pixels[:, :, ring].mean(-1, keepdim=True)
        return _rescale(((pixels - ground) ** 2).sum(1)).view(b, h, w)
    if attn is None or attn.ndim != 3 or attn.shape[0] != b or attn.shape[1] != attn.shape[2]:
        raise ValueError(f"expected attention maps (B={b}, N, N), got "
                         f"{None if attn is None else tuple(attn.shape)}")
    side = int(round(attn.shape[1] ** 0.5))
    if side * side != attn.shape[1]:
        raise ValueError(f"the attention maps' {attn.shape[1]} tokens are not a square grid")
    attn = attn.float()
    if prior == "border":
        ring = _border(side, side)
        score = 1 - _rescale(attn[:, :, ring].sum(-1))
    else:
        coords = (torch.arange(side) + 0.5) / side - 0.5
        centre = torch.exp(-(coords[:, None] ** 2 + coords[None] ** 2) / (2 * sigma ** 2))
        score = _rescale(attn @ centre.flatten())
    grid = score.view(b, 1, side, side)
    return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)


def _pairwise(image: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights of the edges to the right and down neighbours (H, W) of an image (3, H, W)."""
    right = ((image[:, :, 1:] - image[:, :, :-1]) ** 2).sum(0)
    down = ((image[:, 1:] - image[:, :-1]) ** 2).sum(0)
    mean = np.concatenate([right.ravel(), down.ravel()]).mean()
    beta = 1.0 / (2 * mean) if mean > 0 else 0.0
    h, w = image.shape[1:]
    w_right, w_down = np.zeros((h, w)), np.zeros((h, w))
    w_right[:, :-1] = weight * np.exp(-beta * right)
    w_down[:-1] = weight * np.exp(-beta * down)
    return w_right, w_down


def _unaries(score: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    s = np.clip(score, eps, 1 - eps)
    return -np.log(s), -np.log(1 - s)  # cost of foreground, cost of background


def cut_energy(mask: np.ndarray, score: np.ndarray, image: np.ndarray, weight: float,
               eps: float = 1e-4) -> float:
    """The energy :func:`graph_cut` minimises, of a binary ``mask`` (H, W)."""
    cost_fg, cost_bg = _unaries(score, eps)
    w_right, w_down = _pairwise(image, weight)
    m = mask.astype(bool)
    unary = np.where(m, cost_fg, cost_bg).sum()
    pair = (w_right[:, :-1] * (m[:, 1:] != m[:, :-1])).sum()
    pair += (w_down[:-1] * (m[1:] != m[:-1])).sum()
    return float(unary + pair)


def graph_cut(score: Tensor, image: Tensor, weight: float = 1.0, eps: float = 1e-4) -> Tensor:
    """The binary mask (H, W) of least energy (module docstring) for one image (3, H, W) and its
    foreground score (H, W) in [0, 1]; exact, by max-flow."""
    import maxflow

    if score.ndim != 2 or image.ndim != 3 or image.shape[1:] != score.shape:
        raise ValueError(f"expected a score (H, W) and an image (3, H, W) of the same size, got "
                         f"{tuple(score.shape)} and {tuple(image.shape)}")
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    s = score.detach().double().cpu().numpy()
    img = image.detach().double().cpu().numpy()
    cost_fg, cost_bg = _unaries(s, eps)
    graph = maxflow.Graph[float]()
    nodes = graph.add_grid_nodes(s.shape)
    w_right, w_down = _pairwise(img, weight)
    right = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0]])
    down = np.array([[0, 0, 0], [0, 0, 0], [0, 1, 0]])
    graph.add_grid_edges(nodes, weights=w_right, structure=right, symmetric=True)
    graph.add_grid_edges(nodes, weights=w_down, structure=down, symmetric=True)
    # A node left on the source side is foreground: cutting its sink edge costs U(1), cutting
    # its source edge (it ends on the sink side, background) costs U(0).
    graph.add_grid_tedges(nodes, cost_bg, cost_fg)
    graph.maxflow()
    return torch.from_numpy(~graph.get_grid_segments(nodes))


LAYER_GROUPS = ("encoder", "middle", "decoder")


@dataclass(frozen=True)
class CutConfig:
    """AttentionCut's choices: the step ``t`` images are noised to, the attention layers (names
    or prefixes of names, e.g. ``("decoder",)``; None: all), the foreground prior, and the
    pairwise weight of the cut (0: no cut, the score thresholded at one half).

    The defaults are chapter 5's choices, measured on 64 labelled training images of the
    built-in data with ``ddpm_shapes-deep-long`` (:func:`sweep_cut`)."""

    t: int = 100
    layers: tuple[str, ...] | None = ("decoder",)
    prior: str = "border"
    weight: float = 2.0

    def __post_init__(self):
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.weight < 0 or self.t < 0:
            raise ValueError(f"t and weight must be >= 0, got {self.t}, {self.weight}")


def attention_cut(model, schedule, images: Tensor, config: CutConfig | None = None,
                  noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Masks (B, H, W, bool) and foreground scores (B, H, W) of ``images`` (B, 3, H, W) in
    [-1, 1] by AttentionCut (module docstring; ``config`` default: :class:`CutConfig`'s)."""
    config = CutConfig() if config is None else config
    attn = None
    if config.prior != "colour":
        maps = attention_maps(model, schedule, images, config.t, noise)
        attn = mean_attention(maps, config.layers)
    scores = foreground_score(attn, images.float().cpu(), config.prior)
    return cut_scores(scores, images, config.weight), scores


def mean_attention(maps: dict[str, Tensor], layers: tuple[str, ...] | None = None) -> Tensor:
    """The mean of the maps ``{name: (B, N, N)}`` whose names start with one of ``layers``
    (None: all); the chosen maps must share one token grid."""
    chosen = [a for name, a in maps.items()
              if layers is None or any(name.startswith(p) for p in layers)]
    if not chosen:
        raise ValueError(f"no attention layer matches {layers}; the layers are {list(maps)}")
    sizes = {a.shape[-1] for a in chosen}
    if len(sizes) > 1:
        raise ValueError(f"the chosen layers have different token grids {sorted(sizes)}: "
                         "choose layers of one resolution")
    return torch.stack(chosen).mean(0)


def cut_scores(scores: Tensor, images: Tensor, weight: float) -> Tensor:
    """Masks (B, H, W) from foreground scores: thresholded at one half when ``weight`` is 0,
    else :func:`graph_cut` image by image."""
    if weight == 0:
        return scores > 0.5
    return torch.stack([graph_cut(s, x, weight) for s, x in zip(scores, images.cpu())])


def sweep_cut(model, schedule, images: Tensor, fg: Tensor, ts, layer_groups, weights,
              prior: str = "border") -> dict[tuple, float]:
    """Mean IoU (per image) with the true foreground ``fg`` (B, H, W) of AttentionCut at every
    (t, layers, weight) of the grid; ``layer_groups``: tuples of name prefixes (None: all)."""
    from .metrics import saliency_scores

    results = {}
    for t in ts:
        maps = attention_maps(model, schedule, images, t)
        for layers in layer_groups:
            scores = foreground_score(mean_attention(maps, layers), images.float().cpu(), prior)
            for w in weights:
                results[t, layers, w] = saliency_scores(cut_scores(scores, images, w), fg)["iou"]
    return results
