"""Object scenes: one shaded object against a natural-looking texture, and its variants.

The world where the factorized denoiser's premise holds, made the way its paper's datasets
are (a flower on foliage, a bird on a branch): one object per scene, and figure and ground
drawn independently from different appearance families. The object is one of the five shapes
of :mod:`fdiff.shapes`, large enough to cross the frame about half of the time, painted in one
colour with smooth shading (a light direction and a soft highlight); the background is a
multi-scale texture (plane waves from 1 to 8 cycles per image, amplitude falling with
frequency) mapped through three colours. In most scenes one of those colours is the object's
own, so a pixel's colour alone does not say whether it is figure or ground.

Variants change one factor at a time, for the study of when the partition emerges:

- ``objects="texture"`` paints the objects with the background's family of textures (shared
  statistics instead of distinct ones);
- ``flat=True`` paints object and background in one flat colour each (no texture, no shading);
- ``max_objects > 1`` puts up to that many (smaller) shaded objects in a scene.

Every variant draws the same random numbers in the same order, so one scene index keeps its
object, place and colours across the variants with one object. Items are dicts of ``image``
(3, S, S) in [-1, 1], ``mask`` (foreground), ``semantic`` (shape class, 0 background) and
``instance`` (k-th object drawn, 0 background), the keys of :class:`fdiff.worlds.ShapesDataset`.
"""

from __future__ import annotations

import math

import numpy as np

from .checks import check_int
from .shapes import ShapeScenes, placed_sdf

__all__ = ["ObjectScenes"]

_STREAM = {"train": 2, "test": 3}  # distinct from the shapes world's streams (0 and 1)
_OCTAVES = (1, 2, 4, 8)  # cycles per image of the texture's four scales
_WAVES = 6  # plane waves per scale
_SLOPE = 0.9  # amplitude ~ frequency ** -slope: a natural-looking spectrum
_SHARE_COLOUR = 0.6  # how often the background uses the object's colour
_SHADE = (0.25, 0.5)  # the range of the shading's strength
_PIXEL_NOISE = 0.02


def _texture(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Return a multi-scale texture in (0, 1) on the grid (x (1, W), y (H, 1))."""
    field = np.zeros((y.shape[0], x.shape[1]))
    for octave in _OCTAVES:
        for _ in range(_WAVES):
            angle, phase = rng.uniform(0, 2 * math.pi, 2)
            freq = octave * rng.uniform(0.8, 1.25)
            along = math.cos(angle) * x + math.sin(angle) * y
            field += freq**-_SLOPE * np.sin(2 * math.pi * freq * along + phase)
    field = (field - field.mean()) / (field.std() + 1e-8)
    return 1 / (1 + np.exp(-1.6 * field))


def _ramp(t: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (H, W) through a piecewise-linear ramp of colours (n, 3): (3, H, W)."""
    n = len(colours) - 1
    pos = np.clip(t * n, 0, n - 1e-6)
    i = pos.astype(int)
    w = (pos - i)[..., None]
    return (colours[i] * (1 - w) + colours[i + 1] * w).transpose(2, 0, 1)


class ObjectScenes(ShapeScenes):
    """Procedural scenes of one shaded object (or up to ``max_objects``) on a textured ground.

    Item i is a pure function of (seed, split, i and the variant's arguments): any index renders
    in any order. ``split="test"`` draws from a stream disjoint from ``"train"``. See the
    module's description for what each argument changes.
    """

    def __init__(self, num_images: int, image_size: int = 32, seed: int = 0,
                 split: str = "train", max_objects: int = 1, objects: str = "shaded",
                 flat: bool = False) -> None:
        self.num_images = check_int(num_images, "num_images", 1)
        self.image_size = check_int(image_size, "image_size", 8)
        self.seed = check_int(seed, "seed", 0)
        self.max_objects = check_int(max_objects, "max_objects", 1, 8)
        if split not in _STREAM:
            raise ValueError(f"split must be one of {sorted(_STREAM)}, got {split!r}")
        if objects not in ("shaded", "texture"):
            raise ValueError(f"objects must be 'shaded' or 'texture', got {objects!r}")
        if not isinstance(flat, bool):
            raise TypeError(f"flat must be True or False, got {flat!r}")
        self.split, self.objects, self.flat = split, objects, flat
        centres = (np.arange(self.image_size) + 0.5) / self.image_size
        self._x, self._y = centres[None, :], centres[:, None]

    def __repr__(self) -> str:
        return (f"ObjectScenes(num_images={self.num_images}, image_size={self.image_size}, "
                f"seed={self.seed}, split={self.split!r}, max_objects={self.max_objects}, "
                f"objects={self.objects!r}, flat={self.flat})")

    def _object(self, rng: np.random.Generator) -> dict:
        """Draw one object's shape, place and paint; the same draws whatever the variant."""
        one = self.max_objects == 1
        r = rng.uniform(0.25, 0.38) if one else rng.uniform(0.13, 0.22)
        # One object may cross the frame (its centre is kept 0.9 r from the border); several
        # stay inside it, as in the shapes world.
        margin = (0.9 if one else 1.45) * r
        return {
            "cls": int(rng.integers(1, len(self.CLASS_NAMES))),
            "r": r,
            "cx": rng.uniform(margin, 1 - margin),
            "cy": rng.uniform(margin, 1 - margin),
            "angle": rng.uniform(0, 2 * math.pi),
            "colour": rng.uniform(0.1, 0.9, 3),
            "light": rng.uniform(0, 2 * math.pi),
            "shade": rng.uniform(*_SHADE),
            "texture_colours": rng.uniform(0.05, 0.95, (3, 3)),
            "texture_seed": int(rng.integers(2**31)),
        }

    def _paint(self, obj: dict, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        """The object's colours (3, H, W) over the whole grid; its alpha cuts them out."""
        x, y = self._x, self._y
        if self.flat:
            return np.broadcast_to(obj["colour"][:, None, None], (3, y.shape[0], x.shape[1]))
        if self.objects == "texture":
            tex = _texture(np.random.default_rng(obj["texture_seed"]), x, y)
            return _ramp(tex, obj["texture_colours"])
        # Smooth shading: brighter towards the light, with a soft highlight on that side.
        ca, sa, r = math.cos(obj["light"]), math.sin(obj["light"]), obj["r"]
        shade = 1 + obj["shade"] * (ca * dx + sa * dy) / r
        hx, hy = 0.4 * r * ca, 0.4 * r * sa
        high = 0.35 * np.exp(-((dx - hx) ** 2 + (dy - hy) ** 2) / (2 * (0.35 * r) ** 2))
        return np.clip(obj["colour"][:, None, None] * shade[None] + high[None], 0, 1)

    def _render(self, index: int, image_out: np.ndarray, instance: np.ndarray,
                semantic: np.ndarray) -> None:
        rng = np.random.default_rng((_STREAM[self.split], self.seed, index))
        x, y = self._x, self._y
        ground = rng.uniform(0.05, 0.95, (3, 3))
        count = int(rng.integers(1, self.max_objects + 1))
        objects = [self._object(rng) for _ in range(count)]
        if rng.uniform() < _SHARE_COLOUR:  # the ground also wears the (first) object's colour
            shared = np.clip(objects[0]["colour"] + rng.normal(0, 0.05, 3), 0, 1)
            ground[rng.integers(3)] = shared
        texture = _texture(rng, x, y)
        if self.flat:
            image = np.broadcast_to(ground[0][:, None, None], (3, y.shape[0], x.shape[1])).copy()
        else:
            image = _ramp(texture, ground)
        instance[:] = 0
        semantic[:] = 0
        size = self.image_size
        for k, obj in enumerate(objects, start=1):
            dx, dy = x - obj["cx"], y - obj["cy"]
            sdf = placed_sdf(obj["cls"], obj["angle"], obj["r"], dx, dy)
            # Antialiased over one pixel; alpha > 0.5 exactly where the pixel centre is inside.
            alpha = np.clip(0.5 - sdf * size, 0, 1)[None]
            image = image + alpha * (self._paint(obj, dx, dy) - image)
            instance[sdf < 0] = k
            semantic[sdf < 0] = obj["cls"]
        image = image + _PIXEL_NOISE * rng.standard_normal(image.shape)
        image_out[:] = np.clip(image, 0, 1) * 2 - 1
