"""Datasets: the procedural ``ShapesDataset`` and wrappers around four real datasets.

Every dataset returns dicts of tensors with one convention: ``image`` is float32 of shape
(3, S, S) in [-1, 1] and ``mask`` is int64 of shape (S, S) with 1 for foreground, 0 for
background, or -1 everywhere ("ignore") when the dataset has no masks (``has_masks`` is False).

``ShapesDataset`` needs no files: item i is rendered on the fly from (seed, split, i), so the
book runs anywhere. The real datasets (Oxford-IIIT Pets, Oxford Flowers 102, CelebA,
Fashion-MNIST) are read through ``torchvision.datasets`` from :func:`default_data_root` unless a
root is given; nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import math
import operator
import os
import shutil
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import utils as tv_utils
from torchvision.transforms import InterpolationMode

__all__ = [
    "DatasetNotFoundError",
    "SegmentationDataset",
    "ShapesDataset",
    "OxfordPets",
    "Flowers102",
    "CelebA",
    "FashionMNIST",
    "DATASET_NAMES",
    "BUILTIN_DATASETS",
    "builtin_dataset",
    "default_data_root",
    "load_dataset",
    "stack_images",
    "InMemoryImages",
    "training_images",
    "ForegroundClasses",
    "LabelledData",
    "labelled_data",
    "pet_trimap_to_mask",
    "flower_segmim_to_mask",
]


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are missing and cannot be (or were not) downloaded."""


def default_data_root() -> Path:
    """Return the folder datasets are read from and downloaded to.

    ``$FDIFF_DATA`` when set, else ``~/.cache/fdiff/datasets``; the folder is not created here.
    """
    env = os.environ.get("FDIFF_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fdiff" / "datasets"


def _check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    # bool is an int subclass, but ShapesDataset(True) is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _check_index(index: Any, length: int) -> int:
    try:
        i = operator.index(index)
    except TypeError:
        raise TypeError(f"index must be an int, got {type(index).__name__}") from None
    if not 0 <= i < length:
        raise IndexError(f"index {i} out of range for a dataset of {length} items [0, {length})")
    return i


# --------------------------------------------------------------------------------------------
# Common base class: resizing and scaling shared by the real datasets
# --------------------------------------------------------------------------------------------


def stack_images(dataset, indices: Sequence[int]) -> Tensor:
    """Return the images of ``dataset`` at ``indices`` stacked (B, C, H, W).

    Uses ``dataset.batch`` when it exists (one render for the built-in data); items may be
    dicts with an ``image`` or bare image tensors.
    """
    if hasattr(dataset, "batch"):
        items = dataset.batch(list(indices))
        return items["image"] if isinstance(items, dict) else items
    items = [dataset[i] for i in indices]
    return torch.stack([it["image"] if isinstance(it, dict) else it for it in items])


class SegmentationDataset(Dataset):
    """Base class of every fdiff dataset: items are ``{"image", "mask"}`` dicts.

    ``image``: float32 (3, S, S) in [-1, 1]; ``mask``: int64 (S, S), 1 foreground, 0 background,
    or -1 everywhere when ``has_masks`` is False. Subclasses backed by files implement
    ``__len__`` and ``_load``; images are resized so that their shorter side is S (bilinear,
    antialiased) and centre-cropped to S x S, masks the same way with nearest neighbour.
    """

    has_masks: bool = True

    def __init__(self, image_size: int) -> None:
        self.image_size = _check_int(image_size, "image_size", 8)

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> tuple[Tensor, Tensor | None]:
        """Return the raw image (C, H, W) uint8 and its mask (H, W) bool, or None if absent."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image, mask = self._load(_check_index(index, len(self)))
        return self._prepare(image, mask)

    def _prepare(self, image: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        size = self.image_size
        if image.ndim == 2:
            image = image.unsqueeze(0)
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        elif image.shape[0] == 4:
            image = image[:3]
        elif image.shape[0] != 3:
            raise ValueError(f"expected an image with 1, 3 or 4 channels, got {image.shape[0]}")
        image = image.float()
        image = TF.resize(image, [size], InterpolationMode.BILINEAR, antialias=True)
        image = TF.center_crop(image, [size, size])
        image = (image / 127.5 - 1.0).clamp_(-1.0, 1.0).contiguous()
        if mask is None:
            out_mask = torch.full((size, size), -1, dtype=torch.int64)
        else:
            m = mask.to(torch.uint8).unsqueeze(0)
            m = TF.resize(m, [size], InterpolationMode.NEAREST)
            m = TF.center_crop(m, [size, size])
            out_mask = m[0].to(torch.int64).contiguous()
        return {"image": image, "mask": out_mask}


# --------------------------------------------------------------------------------------------
# ShapesDataset: procedural scenes of textured shapes on textured backgrounds
# --------------------------------------------------------------------------------------------

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


def _box_sdf(u: np.ndarray, v: np.ndarray, hu: float, hv: float) -> np.ndarray:
    qu = np.abs(u) - hu
    qv = np.abs(v) - hv
    outside = np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0))
    return outside + np.minimum(np.maximum(qu, qv), 0.0)


_TRIANGLE_NORMALS = [
    (math.cos(a), math.sin(a)) for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))
]


def _shape_sdf(cls: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Return the signed distance (negative inside) to shape ``cls`` of radius ``r``.

    ``u, v`` are coordinates in the object's rotated frame, in image units. Polygons use the
    max of their edge half-planes, exact inside and near the edges, which is all that the
    one-pixel antialiasing ramp needs.
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
    raise ValueError(f"unknown shape class {cls}")


# Disks and rings look the same at every angle, so their rotation is skipped; the angle is still
# drawn, so that every class consumes the random stream alike.
_ROTATES = {1: False, 2: True, 3: True, 4: False, 5: True}


def _window(centre: float, reach: float, size: int) -> tuple[int, int]:
    """Return the pixel range [lo, hi) whose centres lie within ``reach`` of ``centre``."""
    lo = max(0, math.floor((centre - reach) * size))
    hi = min(size, math.ceil((centre + reach) * size))
    return lo, hi


class ShapesDataset(SegmentationDataset):
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
    (:data:`BUILTIN_DATASETS`).
    """

    CLASS_NAMES: tuple[str, ...] = ("background", "disk", "square", "triangle", "ring", "cross")

    def __init__(
        self,
        num_images: int,
        image_size: int = 32,
        seed: int = 0,
        split: str = "train",
        max_objects: int = 4,
        textured: bool = True,
    ) -> None:
        super().__init__(image_size)
        if not isinstance(textured, bool):
            raise TypeError(f"textured must be True or False, got {textured!r}")
        self.textured = textured
        self.num_images = _check_int(num_images, "num_images", 1)
        self.seed = _check_int(seed, "seed", 0)
        self.max_objects = _check_int(max_objects, "max_objects", 1, 8)
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
        self.split = split
        size = self.image_size
        # Pixel centres in image units, kept as a row and a column so that broadcasting
        # builds the (S, S) grids only where needed.
        centres = (np.arange(size, dtype=np.float32) + 0.5) / size
        self._x = centres[None, :]
        self._y = centres[:, None]

    @property
    def num_classes(self) -> int:
        """Number of semantic labels, background included."""
        return len(self.CLASS_NAMES)

    def __len__(self) -> int:
        return self.num_images

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
            if _ROTATES[obj["cls"]]:
                ca, sa = math.cos(obj["angle"]), math.sin(obj["angle"])
                u, v = ca * dx + sa * dy, ca * dy - sa * dx
            else:
                u, v = dx, dy
            sdf = _shape_sdf(obj["cls"], u, v, obj["r"])
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

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """Return item ``index`` as a dict of ``image``, ``mask``, ``semantic``, ``instance``."""
        out = self.batch([index])
        return {key: value[0] for key, value in out.items()}

    def batch(self, indices: Sequence[int] | Tensor | np.ndarray) -> dict[str, Tensor]:
        """Render several items at once and return them stacked.

        Same keys as an item, each with a leading batch dimension B = len(indices):
        ``image`` (B, 3, S, S) float32 in [-1, 1], ``mask``, ``semantic``, ``instance``
        (B, S, S) int64. Equal to stacking ``self[i]`` but skips the per-item collation.
        """
        if isinstance(indices, (Tensor, np.ndarray)):
            if indices.ndim != 1:
                shape = tuple(indices.shape)
                raise ValueError(f"indices must be one-dimensional, got shape {shape}")
            indices = indices.tolist()
        idx = [_check_index(i, self.num_images) for i in indices]
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

    def layers(self, index: int) -> dict[str, Tensor]:
        """Return every object of item ``index`` before occlusion, in drawing order.

        ``classes``: int64 (n,) shape classes in 1..len(CLASS_NAMES)-1; ``masks``: bool
        (n, S, S), the full extent of each shape, including parts hidden by later objects.
        """
        i = _check_index(index, self.num_images)
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


# --------------------------------------------------------------------------------------------
# Real datasets
# --------------------------------------------------------------------------------------------


def _open_torchvision(
    factory: Callable[[], Any],
    *,
    name: str,
    root: Path,
    folder: Path,
    download: bool,
    size_hint: str,
    manual: str,
) -> Any:
    """Build a torchvision dataset, turning missing files and failed downloads into one error."""
    try:
        return factory()
    except (RuntimeError, OSError, EOFError, tarfile.TarError) as err:  # a truncated archive, too
        if download:
            raise DatasetNotFoundError(
                f"Downloading {name} into {root} failed ({type(err).__name__}: {err}). "
                f"There is probably no internet connection. To install it by hand, {manual} "
                f"(expected folder: {folder})."
            ) from err
        raise DatasetNotFoundError(
            f"{name} was not found (or is incomplete) in {folder}. Pass download=True (needs "
            f"internet, {size_hint}), or {manual}."
        ) from err


def _as_root(root: str | Path | None) -> Path:
    if root is None:
        return default_data_root()
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a str or Path, got {type(root).__name__}")
    return Path(root).expanduser()


def _check_split(split: str, valid: Sequence[str], name: str) -> str:
    if split not in valid:
        raise ValueError(f"{name} split must be one of {list(valid)}, got {split!r}")
    return split


def pet_trimap_to_mask(trimap: Tensor | np.ndarray) -> Tensor:
    """Turn an Oxford-IIIT Pets trimap into a foreground mask.

    ``trimap``: integer (H, W) with 1 = pet, 2 = background, 3 = border (the uncertain band
    around the pet). Returns int64 (H, W) in {0, 1}; the border counts as foreground.
    """
    t = torch.as_tensor(np.asarray(trimap))
    if t.ndim != 2:
        raise ValueError(f"expected a trimap of shape (H, W), got {tuple(t.shape)}")
    return (t != 2).long()


class OxfordPets(SegmentationDataset):
    """Oxford-IIIT Pets (cats and dogs) with foreground masks from the trimaps.

    Items: ``image`` float32 (3, S, S) in [-1, 1], ``mask`` int64 (S, S) in {0, 1}. The trimap
    border band (value 3) counts as foreground, as does the pet (1); only 2 is background.
    ``split`` is ``"trainval"`` (3680 images) or ``"test"`` (3669). Files are read from
    ``root/oxford-iiit-pet/{images,annotations}``.
    """

    has_masks = True

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "trainval",
        image_size: int = 64,
        download: bool = False,
    ) -> None:
        super().__init__(image_size)
        self.root = _as_root(root)
        self.split = _check_split(split, ("trainval", "test"), "OxfordPets")
        self._tv = _open_torchvision(
            lambda: torchvision.datasets.OxfordIIITPet(
                str(self.root), split=split, target_types="segmentation", download=download
            ),
            name="Oxford-IIIT Pets",
            root=self.root,
            folder=self.root / "oxford-iiit-pet",
            download=download,
            size_hint="about 800 MB",
            manual=(
                "download images.tar.gz and annotations.tar.gz from "
                "https://www.robots.ox.ac.uk/~vgg/data/pets/ and extract both into "
                f"{self.root / 'oxford-iiit-pet'} (giving images/ and annotations/)"
            ),
        )

    def __len__(self) -> int:
        return len(self._tv)

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        image, trimap = self._tv[index]
        return TF.pil_to_tensor(image.convert("RGB")), pet_trimap_to_mask(np.array(trimap))


_FLOWER_SEGMENTATIONS_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102segmentations.tgz"


def _fetch_flower_masks(folder: Path, segmim: Path) -> None:
    """Download and extract the Flowers-102 masks so that ``segmim`` appears whole or not at all.

    The archive is extracted into a staging folder and renamed into place; a failed download or
    extraction deletes the archive, which has no published checksum to catch a truncated copy
    the next time.
    """
    staging = folder / "segmim.partial"
    archive = folder / _FLOWER_SEGMENTATIONS_URL.rsplit("/", 1)[1]
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tv_utils.download_and_extract_archive(
            _FLOWER_SEGMENTATIONS_URL, download_root=str(folder), extract_root=str(staging)
        )
        os.replace(staging / "segmim", segmim)
    except BaseException:
        archive.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def flower_segmim_to_mask(segmim: Tensor | np.ndarray) -> Tensor:
    """Turn an Oxford Flowers ``segmim`` picture into a foreground mask.

    ``segmim``: uint8 (H, W, 3) RGB, the photo with its background painted pure blue
    (0, 0, 254). Returns int64 (H, W) in {0, 1}. The files are JPEGs, so "blue" is tested
    with a tolerance rather than for equality.
    """
    a = torch.as_tensor(np.asarray(segmim)).int()
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB array of shape (H, W, 3), got {tuple(a.shape)}")
    r, g, b = a.unbind(-1)
    blue = (r < 50) & (g < 50) & (b > 200)
    return (~blue).long()


class Flowers102(SegmentationDataset):
    """Oxford Flowers 102 with foreground masks from the separate segmentation archive.

    Items: ``image`` float32 (3, S, S) in [-1, 1], ``mask`` int64 (S, S) in {0, 1}, or all -1
    when the masks are absent (``has_masks`` False). ``split`` is ``"train"``, ``"val"`` (1020
    images each) or ``"test"`` (6149). Images are read from ``root/flowers-102`` (``jpg/``,
    ``imagelabels.mat``, ``setid.mat``); masks from ``root/flowers-102/segmim/segmim_XXXXX.jpg``,
    which come from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102segmentations.tgz
    extracted into ``root/flowers-102/`` (``download=True`` fetches it too).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        image_size: int = 64,
        download: bool = False,
    ) -> None:
        super().__init__(image_size)
        self.root = _as_root(root)
        self.split = _check_split(split, ("train", "val", "test"), "Flowers102")
        folder = self.root / "flowers-102"
        manual_images = (
            "download 102flowers.tgz, imagelabels.mat and setid.mat from "
            "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ into "
            f"{folder} and extract the archive there (giving jpg/)"
        )
        common = dict(name="Oxford Flowers 102", root=self.root, folder=folder, download=download)
        self._tv = _open_torchvision(
            lambda: torchvision.datasets.Flowers102(str(self.root), split=split, download=download),
            size_hint="about 330 MB",
            manual=manual_images,
            **common,
        )
        self._segmim_folder = folder / "segmim"
        if download and not self._segmim_folder.is_dir():
            _open_torchvision(
                lambda: _fetch_flower_masks(folder, self._segmim_folder),
                size_hint="about 200 MB",
                manual=f"download {_FLOWER_SEGMENTATIONS_URL} and extract it into {folder}",
                **common,
            )
        self.has_masks = self._segmim_folder.is_dir()

    def __len__(self) -> int:
        return len(self._tv)

    def _load(self, index: int) -> tuple[Tensor, Tensor | None]:
        image, _ = self._tv[index]
        image_t = TF.pil_to_tensor(image.convert("RGB"))
        if not self.has_masks:
            return image_t, None
        # torchvision keeps the image paths in order of the split; the mask of
        # jpg/image_00042.jpg is segmim/segmim_00042.jpg.
        image_path = Path(self._tv._image_files[index])
        seg_path = self._segmim_folder / image_path.name.replace("image_", "segmim_", 1)
        if not seg_path.is_file():
            raise FileNotFoundError(f"mask {seg_path} for {image_path} is missing")
        with Image.open(seg_path) as seg:
            mask = flower_segmim_to_mask(np.array(seg.convert("RGB")))
        if mask.shape != image_t.shape[-2:]:
            mask = TF.resize(
                mask[None].to(torch.uint8), list(image_t.shape[-2:]), InterpolationMode.NEAREST
            )[0]
        return image_t, mask


# Aligned CelebA images are 178 x 218 with the face in the middle; a centred square of this side
# keeps the face and drops most of the background.
_CELEBA_CROP = 140


class CelebA(SegmentationDataset):
    """CelebA aligned faces, without masks (``has_masks`` False, ``mask`` all -1).

    Items: ``image`` float32 (3, S, S) in [-1, 1], ``mask`` int64 (S, S) filled with -1. Each
    178 x 218 image is first centre-cropped to 140 x 140 around its centre (the face), then
    resized to S x S. ``split`` is ``"train"``, ``"valid"`` or ``"test"``. Files are read from
    ``root/celeba`` (``img_align_celeba/`` and the list_*.txt / identity_CelebA.txt files).
    """

    has_masks = False

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        image_size: int = 64,
        download: bool = False,
    ) -> None:
        super().__init__(image_size)
        self.root = _as_root(root)
        self.split = _check_split(split, ("train", "valid", "test"), "CelebA")
        self._tv = _open_torchvision(
            lambda: torchvision.datasets.CelebA(
                str(self.root), split=split, target_type=[], download=download
            ),
            name="CelebA",
            root=self.root,
            folder=self.root / "celeba",
            download=download,
            size_hint="about 1.4 GB from Google Drive, with the gdown package installed",
            manual=(
                "download img_align_celeba.zip, list_eval_partition.txt, identity_CelebA.txt, "
                "list_attr_celeba.txt, list_bbox_celeba.txt and list_landmarks_align_celeba.txt "
                "from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into "
                f"{self.root / 'celeba'} and extract the zip there (giving img_align_celeba/)"
            ),
        )

    def __len__(self) -> int:
        return len(self._tv)

    def _load(self, index: int) -> tuple[Tensor, None]:
        image, _ = self._tv[index]
        image_t = TF.pil_to_tensor(image.convert("RGB"))
        crop = min(_CELEBA_CROP, *image_t.shape[-2:])
        return TF.center_crop(image_t, [crop, crop]), None


# Fashion-MNIST backgrounds are 0 or nearly so; a small threshold drops the faint fringe of
# almost-black pixels so that the mask hugs the garment.
_FASHION_THRESHOLD = 10


class FashionMNIST(SegmentationDataset):
    """Fashion-MNIST garments on black, with masks from thresholding the pixels.

    Items: ``image`` float32 (3, S, S) in [-1, 1] (grey repeated to 3 channels), ``mask`` int64
    (S, S) in {0, 1}: a pixel is foreground when its original 8-bit value exceeds 10, decided
    at the native 28 x 28 resolution and then resized with nearest neighbour. Files are read from
    ``root/FashionMNIST/raw/*-ubyte``.
    """

    has_masks = True

    def __init__(
        self,
        root: str | Path | None = None,
        train: bool = True,
        image_size: int = 32,
        download: bool = False,
    ) -> None:
        super().__init__(image_size)
        if not isinstance(train, bool):
            raise TypeError(f"train must be a bool, got {type(train).__name__}")
        self.root = _as_root(root)
        self.train = train
        raw = self.root / "FashionMNIST" / "raw"
        self._tv = _open_torchvision(
            lambda: torchvision.datasets.FashionMNIST(
                str(self.root), train=train, download=download
            ),
            name="Fashion-MNIST",
            root=self.root,
            folder=raw,
            download=download,
            size_hint="about 30 MB",
            manual=(
                "download the four *-ubyte.gz files from "
                "https://github.com/zalandoresearch/fashion-mnist and gunzip them into "
                f"{raw}"
            ),
        )

    def __len__(self) -> int:
        return len(self._tv.data)

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        pixels = self._tv.data[index]
        return pixels.unsqueeze(0), pixels > _FASHION_THRESHOLD


# The built-in data and its simplest form, with the ShapesDataset arguments that make each.
BUILTIN_DATASETS: dict[str, dict[str, Any]] = {
    "shapes": {"max_objects": 4, "textured": True},
    "simple-shapes": {"max_objects": 1, "textured": False},  # one flat shape, flat background
}


def builtin_dataset(
    name: str, num_images: int, image_size: int = 32, seed: int = 0, split: str = "train"
) -> ShapesDataset:
    """Return built-in dataset ``name`` (a key of :data:`BUILTIN_DATASETS`) as a ShapesDataset."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(
            f"unknown built-in dataset {name!r}: expected one of {sorted(BUILTIN_DATASETS)}"
        )
    return ShapesDataset(num_images, image_size, seed=seed, split=split, **BUILTIN_DATASETS[name])


DATASET_NAMES = ("shapes", "simple-shapes", "pets", "flowers", "celeba", "fashion-mnist")

# Every dataset also accepts the split names of the others where the meaning is clear, so that
# a training loop can ask for "train" and "test" whatever the dataset.
_SPLIT_ALIASES = {
    "shapes": {"train": "train", "test": "test", "val": "test", "valid": "test"},
    "simple-shapes": {"train": "train", "test": "test", "val": "test", "valid": "test"},
    "pets": {"train": "trainval", "trainval": "trainval", "test": "test"},
    "flowers": {"train": "train", "val": "val", "valid": "val", "test": "test"},
    "celeba": {"train": "train", "val": "valid", "valid": "valid", "test": "test"},
    "fashion-mnist": {"train": "train", "test": "test"},
}
_SHAPES_SIZES = {"train": 10_000, "test": 1_000}


def load_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    image_size: int = 64,
    download: bool = False,
) -> SegmentationDataset:
    """Return dataset ``name`` (one of ``DATASET_NAMES``) with images of size S = image_size.

    Items are dicts with ``image`` float32 (3, S, S) in [-1, 1] and ``mask`` int64 (S, S) in
    {0, 1}, or -1 everywhere for datasets without masks. ``root`` defaults to
    :func:`default_data_root`. ``split`` accepts ``"train"`` and ``"test"`` everywhere (pets map
    "train" to "trainval") and the datasets' own names ("trainval", "val", "valid").
    The built-in ``"shapes"`` and ``"simple-shapes"`` ignore ``root`` and ``download`` and have
    10 000 train / 1 000 test images.
    """
    if not isinstance(name, str) or name not in _SPLIT_ALIASES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    aliases = _SPLIT_ALIASES[name]
    if split not in aliases:
        raise ValueError(f"{name} split must be one of {sorted(aliases)}, got {split!r}")
    split = aliases[split]
    if name in BUILTIN_DATASETS:
        return builtin_dataset(name, _SHAPES_SIZES[split], image_size, split=split)
    if name == "pets":
        return OxfordPets(root, split=split, image_size=image_size, download=download)
    if name == "flowers":
        return Flowers102(root, split=split, image_size=image_size, download=download)
    if name == "celeba":
        return CelebA(root, split=split, image_size=image_size, download=download)
    return FashionMNIST(root, train=split == "train", image_size=image_size, download=download)


class InMemoryImages(Dataset):
    """The images of a dataset decoded once and held as uint8 (N, 3, S, S).

    Real datasets decode a JPEG per item; a training step that draws a random batch would spend
    most of its time there. This wrapper pays that cost once, with a progress bar, and then
    serves batches by indexing (a 64 px image takes 12 KB, so the 3680 pet images take 45 MB).
    Items are ``{"image": float32 (3, S, S) in [-1, 1]}``; values are rounded to the 256 levels
    of the original 8-bit pixels.
    """

    def __init__(self, dataset, progress: bool = True, desc: str = "decoding images") -> None:
        from tqdm.auto import tqdm

        n = len(dataset)
        if n == 0:
            raise ValueError("InMemoryImages needs a dataset with at least one image, got 0")
        first = dataset[0]["image"]
        if first.ndim != 3:
            raise ValueError(f"expected images of shape (C, H, W), got {tuple(first.shape)}")
        self.images = torch.empty((n, *first.shape), dtype=torch.uint8)
        for i in tqdm(range(n), desc=desc, disable=not progress, leave=False):
            image = first if i == 0 else dataset[i]["image"]
            self.images[i] = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        self.image_size = int(first.shape[-1])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[_check_index(index, len(self))].float() / 127.5 - 1}

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices must be in [0, {len(self)}), got {idx.tolist()}")
        return {"image": self.images[idx].float() / 127.5 - 1}


# The splits a generative model trains on: everything but the test split (Flowers-102's train
# split alone has only 10 images per class).
_TRAINING_SPLITS = {
    "pets": ("trainval",),
    "flowers": ("train", "val"),
    "celeba": ("train",),
    "fashion-mnist": ("train",),
}


def training_images(
    name: str,
    root: str | Path | None = None,
    image_size: int = 64,
    download: bool = False,
    progress: bool = True,
) -> InMemoryImages:
    """Return the training images of real dataset ``name`` decoded into memory.

    Uses every split except the test split (Pets: trainval; Flowers-102: train and val), so
    that a diffusion model is trained on images the chapters never score it on. Missing files
    raise :class:`DatasetNotFoundError` saying how to get them.
    """
    if name not in _TRAINING_SPLITS:
        raise ValueError(
            f"training_images needs a real dataset, one of {sorted(_TRAINING_SPLITS)}; got "
            f"{name!r} (the built-in data is ShapesDataset)"
        )
    parts = [load_dataset(name, root, s, image_size, download) for s in _TRAINING_SPLITS[name]]
    data = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    return InMemoryImages(data, progress=progress, desc=f"decoding {name} at {image_size} px")


class ForegroundClasses(Dataset):
    """A real dataset's foreground masks seen as two semantic classes: background and ``name``.

    Items gain ``semantic`` (int64 (S, S): 0 background, 1 foreground, -1 ignored), the key the
    probing code reads, so that a chapter written for the built-in classes runs unchanged.
    """

    def __init__(self, dataset: SegmentationDataset, name: str = "foreground") -> None:
        if not getattr(dataset, "has_masks", True):
            raise ValueError(f"{type(dataset).__name__} has no masks to turn into classes")
        self.dataset = dataset
        self.CLASS_NAMES = ("background", name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = self.dataset[index]
        return {"image": item["image"], "mask": item["mask"], "semantic": item["mask"]}

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        items = [self[i] for i in indices]
        keys = ("image", "mask", "semantic")
        return {key: torch.stack([it[key] for it in items]) for key in keys}


@dataclass(frozen=True)
class LabelledData:
    """The data of a chapter that trains on labels: ``dataset`` is the name the diffusion
    models are trained on (:class:`~fdiff.train.Recipe`), ``train``/``test`` yield ``image``
    and ``semantic``, ``class_names`` lists the semantic classes (background first)."""

    dataset: str
    train: Any
    test: Any
    class_names: tuple[str, ...]


DATASET_ENV_VAR = "FDIFF_DATASET"


def labelled_data(profile, dataset: str | None = None, root=None, download: bool = False):
    """Return the :class:`LabelledData` of a profile: by default the built-in shapes with their
    six classes in ``ci`` and ``cpu``, and Oxford-IIIT Pets (background, pet) in ``gpu``.

    ``dataset`` (else ``$FDIFF_DATASET``) overrides the choice: ``"shapes"``,
    ``"simple-shapes"``, ``"pets"`` or ``"flowers"``. The real ones are read at the profile's
    resolution from ``root`` (see :func:`load_dataset`); their test split is cut to the
    profile's ``num_test_images``.
    """
    if dataset is None:
        dataset = os.environ.get(DATASET_ENV_VAR, "").strip().lower() or None
    if dataset is None:
        dataset = "pets" if profile.name == "gpu" else "shapes"
    size = profile.image_size
    if dataset in BUILTIN_DATASETS:
        train = builtin_dataset(dataset, profile.num_train_images, size, split="train")
        test = builtin_dataset(dataset, profile.num_test_images, size, split="test")
        return LabelledData(dataset, train, test, ShapesDataset.CLASS_NAMES)
    names = {"pets": "pet", "flowers": "flower"}
    if dataset not in names:
        raise ValueError(
            f"labelled_data supports shapes, simple-shapes, pets and flowers, got {dataset!r} "
            f"(from the dataset argument or ${DATASET_ENV_VAR})"
        )
    train_split = load_dataset(dataset, root, "train", size, download)
    test_split = load_dataset(dataset, root, "test", size, download)
    if len(test_split) > profile.num_test_images:
        test_split = torch.utils.data.Subset(test_split, range(profile.num_test_images))
    train = ForegroundClasses(train_split, names[dataset])
    test = ForegroundClasses(test_split, names[dataset])
    return LabelledData(dataset, train, test, train.CLASS_NAMES)
