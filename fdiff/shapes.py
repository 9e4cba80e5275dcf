"""The geometry of the built-in worlds' five shape classes, as signed distance functions.

A shape of class ``cls`` (1 disk, 2 square, 3 triangle, 4 ring, 5 cross; 0 is the background)
and "radius" ``r`` is the set where :func:`shape_sdf` is negative, in the shape's own rotated
frame. The worlds (:mod:`fdiff.worlds`) draw with it, and :mod:`fdiff.recognise` fits the same
shapes to generated figures.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SHAPE_NAMES", "ROTATES", "SYMMETRY", "shape_sdf", "unit_areas"]

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


def unit_areas(resolution: int = 400) -> dict[int, float]:
    """Return the area of each shape class at radius 1, measured on a fine grid."""
    c = (np.arange(resolution) + 0.5) / resolution * 4 - 2  # [-2, 2]: every shape fits
    inside = {k: shape_sdf(k, c[None, :], c[:, None], 1.0) < 0 for k in range(1, 6)}
    return {k: float(v.mean() * 16) for k, v in inside.items()}
