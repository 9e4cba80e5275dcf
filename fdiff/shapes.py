"""The geometry of the built-in worlds' five shape classes, as signed distance functions.

A shape of class ``cls`` (1 disk, 2 square, 3 triangle, 4 ring, 5 cross; 0 is the background)
and "radius" ``r`` is the set where :func:`shape_sdf` is negative, in the shape's own rotated
frame. The worlds (:mod:`fdiff.worlds`) draw with it, and :mod:`fdiff.recognise` fits the same
shapes to generated figures. :class:`ShapeScenes` is what every procedural world of these
shapes shares: items and batches rendered by the world's ``_render``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .checks import check_index

__all__ = ["SHAPE_NAMES", "ROTATES", "SYMMETRY", "shape_sdf", "placed_sdf", "unit_areas",
           "ShapeScenes"]

SHAPE_NAMES: tuple[str, ...] = ("background", "disk", "square", "triangle", "ring", "cross")

# Disks and rings look the same at every angle: drawing them skips the rotation.
ROTATES = {1: False, 2: True, 3: True, 4: False, 5: True}
# The rotation after which each class looks the same again (0: every rotation).
SYMMETRY = {1: 0.0, 2: math.pi / 2, 3: 2 * math.pi / 3, 4: 0.0, 5: math.pi / 2}


def _box_sdf(u: np.ndarray, v: np.ndarray, hu: float, hv: float) -> np.ndarray:
    qu = np.abs(u) - hu
    qv = np.abs(v) - hv
    outside = np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0))
    return outside + np.minimum(np.maximum(qu, qv), 0.0)


_TRIANGLE_NORMALS = [
    (math.cos(a), math.sin(a)) for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))
]


def shape_sdf(cls: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Return the signed distance (negative inside) to shape ``cls`` of radius ``r``.

    ``u, v`` are coordinates in the object's rotated frame, in image units. Polygons use the
    max of their edge half-planes, exact inside and near the edges, which is all that a
    one-pixel antialiasing ramp needs. The five classes have about the same area for one r.
    """
    if cls == 1:  # disk
        return np.hypot(u, v) - r
    if cls == 2:  # square, half-side 0.88 r: about the area of the disk
        return _box_sdf(u, v, 0.88 * r, 0.88 * r)
    if cls == 3:  # equilateral triangle, inradius 0.7 r (circumradius 1.4 r)
        d = [nx * u + ny * v for nx, ny in _TRIANGLE_NORMALS]
        return np.maximum(np.maximum(d[0], d[1]), d[2]) - 0.7 * r
    if cls == 4:  # ring from 0.5 r to 1.05 r
        return np.abs(np.hypot(u, v) - 0.775 * r) - 0.275 * r
    if cls == 5:  # cross (plus sign), arms 2.1 r long and 0.7 r wide
        return np.minimum(_box_sdf(u, v, 1.05 * r, 0.35 * r), _box_sdf(u, v, 0.35 * r, 1.05 * r))
    raise ValueError(f"unknown shape class {cls}: expected 1..{len(SHAPE_NAMES) - 1}")


def placed_sdf(cls: int, angle: float, r: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Return :func:`shape_sdf` of a shape turned by ``angle`` (radians; ignored for the
    classes that look the same at every angle) at offsets ``dx, dy`` from its centre."""
    if ROTATES[cls]:
        ca, sa = math.cos(angle), math.sin(angle)
        return shape_sdf(cls, ca * dx + sa * dy, ca * dy - sa * dx, r)
    return shape_sdf(cls, dx, dy, r)


def unit_areas(resolution: int = 400) -> dict[int, float]:
    """Return the area of each shape class at radius 1, measured on a fine grid."""
    c = (np.arange(resolution) + 0.5) / resolution * 4 - 2  # [-2, 2]: every shape fits
    inside = {k: shape_sdf(k, c[None, :], c[:, None], 1.0) < 0 for k in range(1, 6)}
    return {k: float(v.mean() * 16) for k, v in inside.items()}


class ShapeScenes(Dataset):
    """A procedural world of these shapes: ``num_images`` scenes of ``image_size`` pixels.

    A subclass renders scene ``index`` with ``_render(index, image, instance, semantic)``, into
    float32 (3, S, S) in [-1, 1] and int64 (S, S) label arrays; items and batches follow.
    """

    CLASS_NAMES: tuple[str, ...] = SHAPE_NAMES
    has_masks = True
    num_images: int
    image_size: int

    @property
    def num_classes(self) -> int:
        """Number of semantic labels, background included."""
        return len(self.CLASS_NAMES)

    def __len__(self) -> int:
        return self.num_images

    def _render(self, index: int, image: np.ndarray, instance: np.ndarray,
                semantic: np.ndarray) -> None:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """Return item ``index`` as a dict of ``image``, ``mask``, ``semantic``, ``instance``."""
        out = self.batch([index])
        return {key: value[0] for key, value in out.items()}

    def batch(self, indices: Sequence[int] | Tensor | np.ndarray) -> dict[str, Tensor]:
        """Render several items at once and return them stacked.

        Same keys as an item, each with a leading batch dimension B = len(indices):
        ``image`` (B, 3, S, S) float32 in [-1, 1], ``mask`` (foreground), ``semantic`` (shape
        class, 0 background), ``instance`` (k-th object drawn, 0 background), (B, S, S) int64.
        """
        if isinstance(indices, (Tensor, np.ndarray)):
            if indices.ndim != 1:
                shape = tuple(indices.shape)
                raise ValueError(f"indices must be one-dimensional, got shape {shape}")
            indices = indices.tolist()
        idx = [check_index(i, self.num_images) for i in indices]
        size = self.image_size
        images = np.empty((len(idx), 3, size, size), dtype=np.float32)
        instance = np.empty((len(idx), size, size), dtype=np.int64)
        semantic = np.empty((len(idx), size, size), dtype=np.int64)
        for b, i in enumerate(idx):
            self._render(i, images[b], instance[b], semantic[b])
        instance_t = torch.from_numpy(instance)
        return {
            "image": torch.from_numpy(images),
            "mask": (instance_t > 0).long(),
            "semantic": torch.from_numpy(semantic),
            "instance": instance_t,
        }
