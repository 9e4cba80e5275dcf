"""Are generated images recognisable? A measurable answer on the simplest built-in data.

On ``simple-shapes`` (:data:`~fdiff.worlds.WORLDS`) every image is one flat shape on a
flat background. A generated image counts as a recognisable shape when three checks pass:

1. **two flat colours**: 2-means on its pixel colours (:func:`two_colour_split`) leaves a small
   RMS distance between pixels and their cluster's colour; the smaller cluster is the figure;
2. **one piece**: the figure's largest 8-connected component holds nearly all of it;
3. **a true shape**: some shape of the data's five classes, drawn by the data's own geometry at
   the figure's centre and area and at the best rotation (:func:`fit_shapes`), covers the figure
   with a high IoU. A blob of the right size scores well below a disk, square or cross drawn
   cleanly, which is what "recognisable" means here.

The thresholds are the same for data and samples, so the rate of held-out images, printed beside
the samples', says how strict they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from .checks import check_images
from .shapes import SYMMETRY, shape_sdf, unit_areas

__all__ = [
    "two_colour_split",
    "fit_shapes",
    "RecognitionReport",
    "recognise_shapes",
]


def _check_images(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    check_images(images, "images")
    return images.detach().float().cpu()


def _cluster_means(pixels: Tensor, assign: Tensor) -> tuple[Tensor, Tensor]:
    """Mean colour (B, 2, 3) and size (B, 2, 1) of clusters 0 (assign False) and 1 (True)."""
    weights = torch.stack([~assign, assign], 1).float()  # (B, 2, N)
    counts = weights.sum(2, keepdim=True)
    return (weights @ pixels) / counts.clamp_min(1), counts


def two_colour_split(images: Tensor, iterations: int = 10) -> tuple[Tensor, Tensor]:
    """Split each image's pixels into two colour clusters (2-means in RGB).

    ``images``: (B, 3, H, W) in [-1, 1]. Returns ``figure``, bool (B, H, W), True on the smaller
    cluster, and ``residual``, float (B,), the RMS distance per channel between each pixel and
    its cluster's mean colour (0 for two perfectly flat colours). The clusters start from a
    cut of the first principal component at its midpoint, then move by Lloyd's iterations.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    x = _check_images(images)
    b, _, h, w = x.shape
    pixels = x.flatten(2).transpose(1, 2)  # (B, N, 3)
    centred = pixels - pixels.mean(1, keepdim=True)
    # First principal direction per image, by power iteration on the 3x3 covariance.
    cov = centred.transpose(1, 2) @ centred
    direction = torch.ones(b, 3, 1) / 3**0.5
    for _ in range(20):
        direction = cov @ direction
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    proj = (centred @ direction)[..., 0]
    mid = (proj.amax(1, keepdim=True) + proj.amin(1, keepdim=True)) / 2
    assign = proj > mid
    for _ in range(iterations):
        centres, counts = _cluster_means(pixels, assign)
        dist = torch.cdist(pixels, centres)  # (B, N, 2)
        # An empty cluster stays empty (its distance is infinite).
        dist = dist.masked_fill((counts[:, None, :, 0] == 0), float("inf"))
        assign = dist[..., 1] < dist[..., 0]
    # The residual is measured against the means of the final clusters.
    centres, _ = _cluster_means(pixels, assign)
    chosen = torch.where(assign[..., None], centres[:, 1:2], centres[:, 0:1])
    residual = ((pixels - chosen) ** 2).mean((1, 2)).sqrt()
    figure = assign.clone()
    flip = assign.sum(1) > (h * w) / 2
    figure[flip] = ~figure[flip]
    return figure.view(b, h, w), residual


def _largest_piece(figure: np.ndarray) -> float:
    """Fraction of the figure's pixels in its largest 8-connected component (0 if empty)."""
    labels, n = ndimage.label(figure, structure=np.ones((3, 3), dtype=int))
    if n == 0:
        return 0.0
    return float(np.bincount(labels.ravel())[1:].max() / figure.sum())


def fit_shapes(
    figure: Tensor,
    num_angles: int = 24,
    scales: tuple[float, ...] = (0.92, 1.0, 1.08),
    shifts: tuple[float, ...] = (-0.4, 0.0, 0.4),
) -> tuple[Tensor, Tensor]:
    """Fit the built-in data's five shapes to each figure mask of ``figure`` (B, H, W) bool.

    Each class is drawn with the data's own geometry (:func:`~fdiff.shapes.shape_sdf`) at
    the figure's centroid, at the radius that gives the figure's area, then scaled by ``scales``,
    moved by ``shifts`` (pixels, in x and y) and turned through ``num_angles`` rotations of its
    symmetry period. Returns ``iou``, float (B,), the best IoU between figure and drawn shape,
    and ``label``, int64 (B,), the class that gave it (an index of ``ShapesDataset.CLASS_NAMES``;
    0 for an empty figure).
    """
    if not isinstance(figure, Tensor) or figure.ndim != 3 or figure.dtype != torch.bool:
        got = (figure.dtype, tuple(figure.shape)) if isinstance(figure, Tensor) else type(figure)
        raise ValueError(f"figure must be a bool tensor of shape (B, H, W), got {got}")
    figs = figure.cpu().numpy()
    b, h, w = figs.shape
    areas = unit_areas()
    px = ((np.arange(w) + 0.5) / w).astype(np.float32)
    py = ((np.arange(h) + 0.5) / h).astype(np.float32)
    best_iou, best_label = np.zeros(b), np.zeros(b, dtype=np.int64)
    for i, f in enumerate(figs):
        count = f.sum()
        if count == 0:
            continue
        ys, xs = np.nonzero(f)
        cy, cx = (ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w
        for k in range(1, 6):
            r0 = math.sqrt(count / (h * w) / areas[k])
            period = SYMMETRY[k]
            angles = np.arange(num_angles) * period / num_angles if period else np.zeros(1)
            grid = np.meshgrid(np.asarray(shifts) / w, np.asarray(shifts) / h, angles,
                               np.asarray(scales), indexing="ij")
            ox, oy, a, sc = (g.reshape(-1, 1, 1).astype(np.float32) for g in grid)
            dx = px[None, None, :] - (cx + ox)
            dy = py[None, :, None] - (cy + oy)
            ca, sa = np.cos(a), np.sin(a)
            inside = shape_sdf(k, ca * dx + sa * dy, ca * dy - sa * dx, r0 * sc) < 0
            iou = ((inside & f).sum((1, 2)) / (inside | f).sum((1, 2))).max()
            if iou > best_iou[i]:
                best_iou[i], best_label[i] = iou, k
    return torch.from_numpy(best_iou).float(), torch.from_numpy(best_label)


@dataclass
class RecognitionReport:
    """Per image, measurements and the checks they pass.

    ``residual``: RMS distance to the two colours ([-1, 1] units); ``piece``: the largest
    component's share of the figure; ``area``: the figure's share of the image; ``fit`` and
    ``label``: the best IoU with a drawn shape and its class (:func:`fit_shapes`).
    ``flat``, ``one_piece``, ``shaped``: the three checks; ``ok``: all three.
    """

    residual: Tensor
    piece: Tensor
    area: Tensor
    fit: Tensor
    label: Tensor
    flat: Tensor
    one_piece: Tensor
    shaped: Tensor

    @property
    def ok(self) -> Tensor:
        return self.flat & self.one_piece & self.shaped & (self.area > 0)

    @property
    def rate(self) -> float:
        """Fraction of images that pass all three checks."""
        return self.ok.float().mean().item()

    def class_counts(self, num_classes: int = 6) -> Tensor:
        """How many recognised images each class (background included, always 0) holds."""
        return torch.bincount(self.label[self.ok], minlength=num_classes)


def recognise_shapes(
    images: Tensor,
    max_residual: float = 0.1,
    min_piece: float = 0.95,
    min_fit: float = 0.9,
) -> RecognitionReport:
    """Run the three checks of the module's description on ``images`` (B, 3, H, W).

    The default ``max_residual`` is 2.5 times the built-in data's pixel noise (std 0.04 in
    [-1, 1] units), which leaves room for the antialiased edge pixels. Held-out images show
    how strict ``min_fit`` is: chapter 1 prints their rate beside the samples'.
    """
    figure, residual = two_colour_split(images)
    piece = torch.tensor([_largest_piece(f) for f in figure.numpy()])
    fit, label = fit_shapes(figure)
    area = figure.float().mean((1, 2))
    return RecognitionReport(
        residual,
        piece,
        area,
        fit,
        label,
        flat=residual <= max_residual,
        one_piece=piece >= min_piece,
        shaped=fit >= min_fit,
    )
