"""Segmentations a reader would try before a diffusion model (chapter 3's baselines).

All return integer label maps (B, H, W), scored with :mod:`fdiff.metrics` like the factorized
model's masks:

- :func:`colour_kmeans`: k-means on each image's pixel colours;
- :func:`grabcut`: OpenCV's GrabCut (Rother et al., 2004) from a rectangle a few pixels inside
  the border, i.e. "the object is somewhere in the middle";
- :func:`feature_kmeans`: k-means on each image's CNN feature vectors (e.g. ImageNet
  MobileNetV2, :mod:`fdiff.imagenet`), upsampled to the image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_finite, check_images
from .seeding import make_generator

__all__ = ["kmeans", "colour_kmeans", "grabcut", "feature_kmeans"]


def kmeans(
    x: Tensor, k: int, iters: int = 30, restarts: int = 3, generator: torch.Generator | None = None
) -> Tensor:
    """Cluster rows of ``x`` (N, D) into ``k`` groups; return labels (N,) of the best restart.

    Lloyd's algorithm from k-means++ seeds (Arthur & Vassilvitskii, 2007); the restart with the
    lowest within-cluster sum of squares wins.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (N, D), got {tuple(x.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(x):
        raise ValueError(f"k must be an int in [1, N={len(x)}], got {k!r}")
    check_finite(x, "x")
    device = x.device
    # On the CPU, where the default generator lives: a GPU tensor would refuse it.
    x = x.detach().float().cpu()
    gen = generator or make_generator(0)
    best, best_cost = None, float("inf")
    for _ in range(restarts):
        centres = x[torch.randint(len(x), (1,), generator=gen)]
        for _ in range(1, k):
            d2 = torch.cdist(x, centres).pow(2).min(1).values
            probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
            centres = torch.cat([centres, x[torch.multinomial(probs, 1, generator=gen)]])
        for _ in range(iters):
            labels = torch.cdist(x, centres).argmin(1)
            new = torch.stack(
                [x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)]
            )
            if torch.allclose(new, centres):
                break
            centres = new
        labels = torch.cdist(x, centres).argmin(1)
        cost = float(((x - centres[labels]) ** 2).sum())
        if cost < best_cost:
            best, best_cost = labels, cost
    return best.to(device)


def colour_kmeans(images: Tensor, k: int = 2) -> Tensor:
    """Segment each image (B, C, H, W) by k-means on its pixels' colours; labels (B, H, W)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    check_images(images, "images")
    b, c, h, w = images.shape
    out = [kmeans(img.reshape(c, -1).T, k).view(h, w) for img in images]
    return torch.stack(out)


def grabcut(images: Tensor, margin: int = 2, iters: int = 5) -> Tensor:
    """Segment each image (B, 3, H, W) in [-1, 1] with OpenCV's GrabCut; labels (B, H, W).

    The initial rectangle leaves ``margin`` pixels of border as certain background. Labels are
    1 for (probable) foreground and 0 for background.
    """
    import cv2

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    check_images(images, "images")
    b, _, h, w = images.shape
    if not 0 < margin < min(h, w) // 2:
        raise ValueError(f"margin must be in [1, {min(h, w) // 2 - 1}], got {margin}")
    out = np.zeros((b, h, w), dtype=np.int64)
    rect = (margin, margin, w - 2 * margin, h - 2 * margin)
    cv2.setRNGSeed(0)
    for i, img in enumerate(images):
        rgb = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        bgr = rgb[..., ::-1]
        mask = np.zeros((h, w), np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.grabCut(np.ascontiguousarray(bgr), mask, rect, bgd, fgd, iters, cv2.GC_INIT_WITH_RECT)
        out[i] = np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD))
    return torch.from_numpy(out)


def feature_kmeans(features: Tensor, k: int = 2, size: int | None = None) -> Tensor:
    """Segment each image by k-means on its feature vectors (B, D, h, w); labels (B, S, S).

    Features are L2-normalised per position; the labels are upsampled (nearest) to ``size``.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (B, D, h, w), got {tuple(features.shape)}")
    check_finite(features, "features")
    b, d, h, w = features.shape
    f = F.normalize(features.float(), dim=1)
    labels = torch.stack([kmeans(x.reshape(d, -1).T, k).view(h, w) for x in f])
    if size is not None and size != h:
        labels = F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest")[:, 0]
    return labels.long()
