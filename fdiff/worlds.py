"""The built-in worlds: procedural scenes with exact masks, rendered on the fly.

No files are needed: item i of a world is a pure function of (seed, split, i), so the book runs
anywhere and any index renders in any order. Each world encodes a premise a method relies on,
or breaks one:

- ``"object"``: one shaded object against a natural-looking texture, figure and ground from
  different appearance families, their colours shared in most scenes
  (:class:`~fdiff.scenes.ObjectScenes`): the factorized denoiser's premise holds;
- ``"object-flat"``, ``"object-shared"``, ``"objects"``: the same with one factor changed (no
  texture, shared statistics, up to four objects);
- ``"shapes"``: one to four textured objects of five shape classes on a textured background,
  objects and background drawing their colours and textures from one palette, with occlusion
  (:class:`ShapesDataset`): nothing tells figure from ground statistically;
- ``"simple-shapes"``: one flat shape on a flat background, the simplest form of the above.

:func:`world` returns a world by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checks import check_index, check_int
from .scenes import ObjectScenes
from .shapes import ShapeScenes, placed_sdf

__all__ = ["ShapesDataset", "WORLDS", "world"]

_SPLIT_STREAMS = {"train": 0, "test": 1}
# Size of an object: its "radius" r as a fraction of the image side, so that shapes span about a
# quarter to a half of the side. Each shape scales r so that the five classes have similar areas
# and the objects cover about 24% of an image on average.
_RADIUS_RANGE = (0.13, 0.27)
_PIXEL_NOISE = 0.02

_TEX_FLAT, _TEX_STRIPES, _TEX_CHECKER, _TEX_GRADIENT, _TEX_BLOBS = range(5)
_OBJECT_TEXTURES = (_TEX_FLAT, _TEX_STRIPES, _TEX_CHECKER, _TEX_GRADIENT, _TEX_BLOBS)
# A flat background would make "the region that is not one colour" a trivial cue.
_BACKGROUND_TEXTURES = (_TEX_STRIPES, _TEX_CHECKER, _TEX_GRADIENT, _TEX_BLOBS)


def _palette(rng: np.random.Generator, n: int) -> np.ndarray:
    # Objects and background draw from this one distribution, so a colour says nothing about
    # whether a pixel is foreground.
    return rng.uniform(0.05, 0.95, size=(n, 3)).astype(np.float32)


def _sample_texture(
    rng: np.random.Generator, kinds: Sequence[int], freq: tuple[float, float]
) -> dict[str, Any]:
    """Draw one texture's parameters; the same number of draws whatever the kind."""
    return {
        "kind": int(kinds[rng.integers(len(kinds))]),
        "colours": _palette(rng, 2),
        "angle": rng.uniform(0.0, math.pi),
        "freq": rng.uniform(*freq),
        "phase": rng.uniform(0.0, 2 * math.pi),
        "blob_angles": rng.uniform(0.0, 2 * math.pi, size=3),
        "blob_freqs": rng.uniform(freq[0] * 0.5, freq[1] * 0.6, size=3),
        "blob_phases": rng.uniform(0.0, 2 * math.pi, size=3),
    }


def _texture_rgb(tex: dict, dx: np.ndarray, dy: np.ndarray, span: float, size: int) -> np.ndarray:
    """Return the colours in [0, 1] of a texture at offsets (dx, dy) from its centre.

    ``dx`` has shape (1, W) and ``dy`` (H, 1), in image units; the result is (3, H, W).
    ``span`` is the distance a gradient takes to go from one colour to the other, ``size`` the
    image side in pixels, which bounds the finest pattern.
    """
    c1, c2 = tex["colours"]
    kind = tex["kind"]
    if kind == _TEX_FLAT:
        return np.broadcast_to(c1[:, None, None], (3, dy.shape[0], dx.shape[1]))
    # A period of at least 4 pixels keeps stripes from aliasing into moire at small sizes.
    freq = min(tex["freq"], size / 4.0)
    ca, sa = math.cos(tex["angle"]), math.sin(tex["angle"])
    along = ca * dx + sa * dy
    if kind == _TEX_STRIPES:
        # A clipped sine: flat bands with soft one-pixel edges.
        t = 0.5 + 1.5 * np.sin(2 * math.pi * freq * along + tex["phase"])
    elif kind == _TEX_CHECKER:
        across = ca * dy - sa * dx
        waves = np.sin(2 * math.pi * freq * along + tex["phase"]) * np.sin(
            2 * math.pi * freq * across
        )
        t = 0.5 + 3.0 * waves
    elif kind == _TEX_GRADIENT:
        t = 0.5 + along / span
    else:  # blobs: three plane waves summed and clipped give organic two-colour patches
        s = 0.0
        for a, f, p in zip(tex["blob_angles"], tex["blob_freqs"], tex["blob_phases"], strict=True):
            f = min(f, size / 6.0)  # blobs should stay larger than stripes
            s = s + np.sin(2 * math.pi * f * (math.cos(a) * dx + math.sin(a) * dy) + p)
        t = 0.5 + 0.6 * s
    t = np.clip(t, 0.0, 1.0)
    return c1[:, None, None] + (c2 - c1)[:, None, None] * t[None]



def _window(centre: float, reach: float, size: int) -> tuple[int, int]:
    """Return the pixel range [lo, hi) whose centres lie within ``reach`` of ``centre``."""
    lo = max(0, math.floor((centre - reach) * size))
    hi = min(size, math.ceil((centre + reach) * size))
    return lo, hi



class ShapesDataset(ShapeScenes):
    """Procedural scenes of 1 to ``max_objects`` textured shapes on a textured background.

    Item i is a pure function of (seed, split, max_objects, i, image_size): any index can be
    rendered in any order, by any worker. The shapes, positions and colours of a scene do not
    depend on ``image_size``; only the pixel noise does, and at small sizes the finest textures,
    which are coarsened to stay at least 4 pixels per period. ``split="test"`` draws from a seed
    stream disjoint from ``"train"``.

    Each item is a dict of:

    - ``image``: float32 (3, S, S) in [-1, 1], antialiased along the shape edges;
    - ``mask``: int64 (S, S), 1 where any object is visible, 0 on the background;
    - ``semantic``: int64 (S, S), 0 background, else the index in ``CLASS_NAMES`` of the
      visible object's shape;
    - ``instance``: int64 (S, S), 0 background, else k for the k-th object drawn (back to
      front); only visible parts are labelled, so a fully hidden object has no pixels.

    Objects and background take colours from one palette and carry textures (flat, stripes,
    checkerboard, gradient, blobs), so colour clustering alone does not find the objects.
    Labels are hard: a pixel belongs to the topmost object whose shape contains its centre.

    ``textured=False`` paints every object and the background in one flat colour (the first
    colour of its texture). The random draws are the same, so with the same ``max_objects`` a
    scene keeps its shapes, places and colours and only loses its patterns. With
    ``max_objects=1`` this is the built-in data's simplest form, ``"simple-shapes"``
    (:data:`WORLDS`).
    """


    def __init__(
        self,
        num_images: int,
        image_size: int = 32,
        seed: int = 0,
        split: str = "train",
        max_objects: int = 4,
        textured: bool = True,
    ) -> None:
        self.image_size = check_int(image_size, "image_size", 8)
        if not isinstance(textured, bool):
            raise TypeError(f"textured must be True or False, got {textured!r}")
        self.textured = textured
        self.num_images = check_int(num_images, "num_images", 1)
        self.seed = check_int(seed, "seed", 0)
        self.max_objects = check_int(max_objects, "max_objects", 1, 8)
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
        self.split = split
        size = self.image_size
        # Pixel centres in image units, kept as a row and a column so that broadcasting
        # builds the (S, S) grids only where needed.
        centres = (np.arange(size, dtype=np.float32) + 0.5) / size
        self._x = centres[None, :]
        self._y = centres[:, None]

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(num_images={self.num_images}, image_size={self.image_size}, "
            f"seed={self.seed}, split={self.split!r}, max_objects={self.max_objects}, "
            f"textured={self.textured})"
        )

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((_SPLIT_STREAMS[self.split], self.seed, index))

    def _sample_scene(self, rng: np.random.Generator) -> tuple[dict, list[dict]]:
        background = _sample_texture(rng, _BACKGROUND_TEXTURES, (1.5, 5.0))
        num_objects = int(rng.integers(1, self.max_objects + 1))
        objects = []
        for _ in range(num_objects):
            r = rng.uniform(*_RADIUS_RANGE)
            objects.append(
                {
                    "cls": int(rng.integers(1, len(self.CLASS_NAMES))),
                    "r": r,
                    # Centres keep the bulk of each shape inside the frame.
                    "cx": rng.uniform(r, 1.0 - r),
                    "cy": rng.uniform(r, 1.0 - r),
                    "angle": rng.uniform(0.0, 2 * math.pi),
                    "texture": _sample_texture(rng, _OBJECT_TEXTURES, (3.0, 8.0)),
                }
            )
        if not self.textured:  # drawn all the same, so that the scenes do not change
            for texture in (background, *(obj["texture"] for obj in objects)):
                texture["kind"] = _TEX_FLAT
        return background, objects

    def _render(
        self,
        index: int,
        image_out: np.ndarray,
        instance_out: np.ndarray,
        semantic_out: np.ndarray,
        full_masks: list | None = None,
    ) -> None:
        """Render item ``index`` into the given (3, S, S) float32 and two (S, S) int64 arrays."""
        size = self.image_size
        rng = self._rng(index)
        background, objects = self._sample_scene(rng)
        x, y = self._x, self._y
        rgb = np.array(_texture_rgb(background, x - 0.5, y - 0.5, 1.0, size))
        instance_out.fill(0)
        semantic_out.fill(0)
        for k, obj in enumerate(objects, start=1):
            # Work on the window the shape can touch: every shape lies within 1.4 r of its
            # centre, plus the one-pixel antialiasing ramp. Outside it alpha is exactly 0.
            reach = 1.5 * obj["r"] + 1.0 / size
            r0, r1 = _window(obj["cy"], reach, size)
            c0, c1 = _window(obj["cx"], reach, size)
            dx, dy = x[:, c0:c1] - obj["cx"], y[r0:r1] - obj["cy"]
            sdf = placed_sdf(obj["cls"], obj["angle"], obj["r"], dx, dy)
            # Coverage ramps over one pixel around the edge: alpha > 0.5 exactly where the
            # pixel centre is inside, so the hard labels agree with the antialiased image.
            alpha = np.clip(0.5 - sdf * size, 0.0, 1.0)
            colour = _texture_rgb(obj["texture"], dx, dy, 2.0 * obj["r"], size)
            window = rgb[:, r0:r1, c0:c1]
            window += alpha[None] * (colour - window)
            inside = sdf < 0.0
            instance_out[r0:r1, c0:c1][inside] = k
            semantic_out[r0:r1, c0:c1][inside] = obj["cls"]
            if full_masks is not None:
                full = np.zeros((size, size), dtype=bool)
                full[r0:r1, c0:c1] = inside
                full_masks.append((obj["cls"], full))
        # Drawn last so that the scene itself does not depend on the image size.
        rgb += _PIXEL_NOISE * rng.standard_normal(rgb.shape, dtype=np.float32)
        np.clip(rgb, 0.0, 1.0, out=rgb)
        np.multiply(rgb, 2.0, out=image_out)
        image_out -= 1.0

    def layers(self, index: int) -> dict[str, Tensor]:
        """Return every object of item ``index`` before occlusion, in drawing order.

        ``classes``: int64 (n,) shape classes in 1..len(CLASS_NAMES)-1; ``masks``: bool
        (n, S, S), the full extent of each shape, including parts hidden by later objects.
        """
        i = check_index(index, self.num_images)
        size = self.image_size
        full: list = []
        self._render(
            i,
            np.empty((3, size, size), np.float32),
            np.empty((size, size), np.int64),
            np.empty((size, size), np.int64),
            full_masks=full,
        )
        classes = torch.tensor([c for c, _ in full], dtype=torch.int64)
        masks = torch.from_numpy(np.stack([m for _, m in full]))
        return {"classes": classes, "masks": masks}



# The built-in worlds: the renderer of each and its arguments.
WORLDS: dict[str, tuple[type, dict[str, Any]]] = {
    "shapes": (ShapesDataset, {"max_objects": 4, "textured": True}),
    "simple-shapes": (ShapesDataset, {"max_objects": 1, "textured": False}),
    "object": (ObjectScenes, {}),
    "object-flat": (ObjectScenes, {"flat": True}),
    "object-shared": (ObjectScenes, {"objects": "texture"}),
    "objects": (ObjectScenes, {"max_objects": 4}),
}


def world(
    name: str, num_images: int, image_size: int = 32, seed: int = 0, split: str = "train"
) -> ShapesDataset | ObjectScenes:
    """Return built-in world ``name`` (a key of :data:`WORLDS`): ``num_images`` scenes of
    ``split`` ("train" or "test", disjoint streams) at ``image_size`` pixels."""
    if name not in WORLDS:
        raise ValueError(f"unknown built-in world {name!r}: expected one of {sorted(WORLDS)}")
    cls, kwargs = WORLDS[name]
    return cls(num_images, image_size, seed=seed, split=split, **kwargs)
