"""Data by name, whatever its source: a built-in world or a real dataset.

Every dataset of the package yields dicts with ``image`` float32 (3, S, S) in [-1, 1] and
``mask`` int64 (S, S) (1 foreground, 0 background, -1 ignored). This module holds what works
on any of them: :func:`stack_images`, :class:`InMemoryImages` (decode once, train fast),
:class:`ForegroundClasses` (a foreground mask as two semantic classes), the training images of a
name (:func:`training_data`), and the labelled data a chapter uses in each profile
(:func:`labelled_data`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .checks import check_index
from .datasets import REAL_DATASETS, TRAINING_SPLITS, load_dataset
from .shapes import SHAPE_NAMES
from .worlds import WORLDS, world

__all__ = [
    "DATASET_NAMES",
    "from_uint8",
    "stack_images",
    "InMemoryImages",
    "ForegroundClasses",
    "training_data",
    "LabelledData",
    "labelled_data",
    "profile_dataset",
]

DATASET_NAMES = (*WORLDS, *REAL_DATASETS)


def from_uint8(images: Tensor) -> Tensor:
    """Return 8-bit images (uint8 in [0, 255]) as fdiff's float32 images in [-1, 1].

    The conversion fdiff never guesses: integer images given anywhere else are refused.
    """
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"from_uint8 takes a uint8 tensor, got {getattr(images, 'dtype', images)}")
    return images.float() / 127.5 - 1.0


def stack_images(dataset, indices: Sequence[int]) -> Tensor:
    """Return the images of ``dataset`` at ``indices`` stacked (B, C, H, W).

    Uses ``dataset.batch`` when it exists (one render for the built-in worlds); items may be
    dicts with an ``image`` or bare image tensors.
    """
    if hasattr(dataset, "batch"):
        items = dataset.batch(list(indices))
        return items["image"] if isinstance(items, dict) else items
    items = [dataset[i] for i in indices]
    return torch.stack([it["image"] if isinstance(it, dict) else it for it in items])


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
        return {"image": self.images[check_index(index, len(self))].float() / 127.5 - 1}

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices must be in [0, {len(self)}), got {idx.tolist()}")
        return {"image": self.images[idx].float() / 127.5 - 1}


def training_data(
    name: str,
    image_size: int,
    num_images: int | None = None,
    seed: int = 0,
    root: str | Path | None = None,
    download: bool = False,
    progress: bool = True,
):
    """Return the images a generative model of ``name`` trains on.

    A built-in world: its first ``num_images`` training scenes (rendered on demand). A real
    dataset: every split but the test split (Pets: trainval; Flowers-102: train and val),
    decoded into memory, so that a model is never trained on the images the chapters score;
    missing files raise :class:`~fdiff.datasets.DatasetNotFoundError` saying how to get them.
    """
    if name in WORLDS:
        if num_images is None:
            raise ValueError(f"the built-in world {name!r} needs num_images")
        return world(name, num_images, image_size, seed=seed, split="train")
    if name not in TRAINING_SPLITS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {list(DATASET_NAMES)}")
    parts = [load_dataset(name, root, s, image_size, download) for s in TRAINING_SPLITS[name]]
    data = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    return InMemoryImages(data, progress=progress, desc=f"decoding {name} at {image_size} px")


class ForegroundClasses(Dataset):
    """A real dataset's foreground masks seen as two semantic classes: background and ``name``.

    Items gain ``semantic`` (int64 (S, S): 0 background, 1 foreground, -1 ignored), the key the
    probing code reads, so that a chapter written for the built-in classes runs unchanged.
    """

    def __init__(self, dataset, name: str = "foreground") -> None:
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
    models are trained on (the ``data.name`` of their runs), ``train``/``test`` yield ``image``
    and ``semantic``, ``class_names`` lists the semantic classes (background first)."""

    dataset: str
    train: Any
    test: Any
    class_names: tuple[str, ...]


DATASET_ENV_VAR = "FDIFF_DATASET"
_FOREGROUND_NAMES = {"pets": "pet", "flowers": "flower"}


def profile_dataset(profile, dataset: str | None = None) -> str:
    """The dataset a chapter runs on: ``dataset`` if given, else ``$FDIFF_DATASET``, else the
    built-in shapes in ``ci`` and ``cpu`` and Oxford-IIIT Pets in ``gpu`` and ``paper``."""
    if dataset is None:
        dataset = os.environ.get(DATASET_ENV_VAR, "").strip().lower() or None
    if dataset is None:
        dataset = "pets" if profile.real_data else "shapes"
    return dataset


def labelled_data(profile, dataset: str | None = None, root=None, download: bool = False):
    """Return the :class:`LabelledData` of a profile: by default the built-in shapes with their
    six classes in ``ci`` and ``cpu``, and Oxford-IIIT Pets (background, pet) in ``gpu`` and
    ``paper``.

    ``dataset`` (else ``$FDIFF_DATASET``) overrides the choice: a built-in world or a real
    dataset (:data:`DATASET_NAMES`). The real ones are read at the profile's resolution from
    ``root`` (see :func:`~fdiff.datasets.load_dataset`); their test split is cut to the
    profile's ``num_test_images``.
    """
    dataset = profile_dataset(profile, dataset)
    size = profile.image_size
    if dataset in WORLDS:
        train = world(dataset, profile.num_train_images, size, split="train")
        test = world(dataset, profile.num_test_images, size, split="test")
        return LabelledData(dataset, train, test, SHAPE_NAMES)
    if dataset not in _FOREGROUND_NAMES:
        raise ValueError(
            f"labelled_data supports {', '.join(DATASET_NAMES)}, got {dataset!r} "
            f"(from the dataset argument or ${DATASET_ENV_VAR})"
        )
    train_split = load_dataset(dataset, root, "train", size, download)
    test_split = load_dataset(dataset, root, "test", size, download)
    if len(test_split) > profile.num_test_images:
        test_split = torch.utils.data.Subset(test_split, range(profile.num_test_images))
    train = ForegroundClasses(train_split, _FOREGROUND_NAMES[dataset])
    test = ForegroundClasses(test_split, _FOREGROUND_NAMES[dataset])
    return LabelledData(dataset, train, test, train.CLASS_NAMES)
