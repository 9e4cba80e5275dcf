"""Are generated images recognisable? A measurable answer on the simplest built-in data.

On ``simple-shapes`` (:data:`~fdiff.data.BUILTIN_DATASETS`) every image is one flat shape on a
flat background. A generated image counts as a recognisable shape when three checks pass:

1. **two flat colours**: 2-means on its pixel colours (:func:`two_colour_split`) leaves a small
   RMS distance between pixels and their cluster's colour; the smaller cluster is the figure;
2. **one piece**: the figure's largest 8-connected component holds nearly all of it;
3. **a named shape**: a small CNN trained on the data's own figures (:class:`ShapeClassifier`)
   gives one of the five shape classes a high probability.

The thresholds are the same for data and samples, so the rate of the data itself, printed beside
the samples', says how strict they are. The classifier only knows the five shapes: a blob is
pushed into one of them, which is why its confidence, not its label, is the test, and why the
class histogram of samples is worth a look too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

__all__ = [
    "two_colour_split",
    "ShapeClassifier",
    "fit_shape_classifier",
    "RecognitionReport",
    "recognise_shapes",
]


def _check_images(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [-1, 1], got {images.dtype}")
    return images.detach().float().cpu()


def two_colour_split(images: Tensor, iterations: int = 10) -> tuple[Tensor, Tensor]:
    """Split each image's pixels into two colour clusters (2-means in RGB).

    ``images``: (B, 3, H, W) in [-1, 1]. Returns ``figure``, bool (B, H, W), True on the smaller
    cluster, and ``residual``, float (B,), the RMS distance per channel between each pixel and
    its cluster's mean colour (0 for two perfectly flat colours). The clusters start from a
    cut of the first principal component at its midpoint, then move by Lloyd's iterations.
    """
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
        weights = torch.stack([~assign, assign], 1).float()  # (B, 2, N)
        counts = weights.sum(2, keepdim=True)
        centres = (weights @ pixels) / counts.clamp_min(1)  # (B, 2, 3)
        dist = torch.cdist(pixels, centres)  # (B, N, 2)
        # An empty cluster stays empty (its distance is infinite).
        dist = dist.masked_fill((counts[:, None, :, 0] == 0), float("inf"))
        assign = dist[..., 1] < dist[..., 0]
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


class ShapeClassifier(nn.Module):
    """A small CNN that names the shape of a binary figure mask (B, H, W) -> (B, classes) logits."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        channels = 1
        for mult in (1, 2, 4):
            layers += [nn.Conv2d(channels, width * mult, 3, padding=1), nn.ReLU()]
            layers += [nn.Conv2d(width * mult, width * mult, 3, padding=1), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            channels = width * mult
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, figure: Tensor) -> Tensor:
        if figure.ndim != 3:
            raise ValueError(f"figure must be a (B, H, W) mask, got shape {tuple(figure.shape)}")
        x = figure.float()[:, None] * 2 - 1
        return self.head(self.features(x).amax((2, 3)))


def fit_shape_classifier(
    dataset, num_images: int = 4000, steps: int = 400, batch_size: int = 128, seed: int = 0
) -> tuple[ShapeClassifier, float]:
    """Train a :class:`ShapeClassifier` on the figures that :func:`two_colour_split` finds in
    the first ``num_images`` images of a one-object dataset (``simple-shapes``).

    Labels are the object's class (the largest value of ``semantic``), minus one, so that the
    classes are the shapes without the background. Returns the classifier and its accuracy on
    the last fifth of those images, which it does not train on.
    """
    if getattr(dataset, "max_objects", 1) != 1:
        raise ValueError("fit_shape_classifier needs one object per image (simple-shapes)")
    if num_images < 10:
        raise ValueError(f"num_images must be at least 10, got {num_images}")
    data = dataset.batch(list(range(num_images)))
    figure, _ = two_colour_split(data["image"])
    labels = data["semantic"].flatten(1).amax(1) - 1
    if int(labels.min()) < 0:
        raise ValueError("every image must hold an object (a semantic class above 0)")
    num_classes = len(dataset.CLASS_NAMES) - 1
    split = num_images - num_images // 5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapeClassifier(num_classes)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(split, (batch_size,), generator=gen)
            loss = nn.functional.cross_entropy(model(figure[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (model(figure[split:]).argmax(1) == labels[split:]).float().mean().item()
    return model, accuracy


@dataclass
class RecognitionReport:
    """Per image, measurements and the checks they pass.

    ``residual``: RMS distance to the two colours ([-1, 1] units); ``piece``: the largest
    component's share of the figure; ``area``: the figure's share of the image; ``confidence``
    and ``label``: the classifier's top probability and class (0-based over the shapes).
    ``flat``, ``one_piece``, ``sure``: the three checks; ``ok``: all three, on a non-empty figure.
    """

    residual: Tensor
    piece: Tensor
    area: Tensor
    confidence: Tensor
    label: Tensor
    flat: Tensor
    one_piece: Tensor
    sure: Tensor

    @property
    def ok(self) -> Tensor:
        return self.flat & self.one_piece & self.sure & (self.area > 0)

    @property
    def rate(self) -> float:
        """Fraction of images that pass all three checks."""
        return self.ok.float().mean().item()

    def class_counts(self, num_classes: int) -> Tensor:
        """How many recognised images the classifier puts in each shape class."""
        return torch.bincount(self.label[self.ok], minlength=num_classes)


def recognise_shapes(
    images: Tensor,
    classifier: ShapeClassifier,
    max_residual: float = 0.1,
    min_piece: float = 0.95,
    min_confidence: float = 0.9,
) -> RecognitionReport:
    """Run the three checks of the module's description on ``images`` (B, 3, H, W).

    The default ``max_residual`` is 2.5 times the built-in data's pixel noise (std 0.04 in
    [-1, 1] units), which leaves room for the antialiased edge pixels.
    """
    figure, residual = two_colour_split(images)
    piece = torch.tensor([_largest_piece(f) for f in figure.numpy()])
    with torch.no_grad():
        probs = classifier(figure).softmax(1)
    confidence, label = probs.max(1)
    area = figure.float().mean((1, 2))
    return RecognitionReport(
        residual,
        piece,
        area,
        confidence,
        label,
        flat=residual <= max_residual,
        one_piece=piece >= min_piece,
        sure=confidence >= min_confidence,
    )
