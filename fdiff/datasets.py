"""Real datasets with foreground masks, read through ``torchvision.datasets``.

Oxford-IIIT Pets (a pet against its background, masks from the trimaps) and Oxford Flowers 102
(a flower against foliage, masks from a separate archive). Every item is a dict with one
convention: ``image`` float32 (3, S, S) in [-1, 1] and ``mask`` int64 (S, S) with 1 for
foreground, 0 for background, or -1 everywhere ("ignore") when the masks are absent
(``has_masks`` False). Files are read from :func:`default_data_root` unless a root is given;
nothing is downloaded unless ``download=True``, and a missing dataset raises
:class:`DatasetNotFoundError` saying where to put which files.
"""

from __future__ import annotations

import errno
import http.client
import os
import shutil
import socket
import tarfile
import urllib.error
from collections.abc import Callable, Sequence
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

from .checks import check_index, check_int

__all__ = [
    "DatasetNotFoundError",
    "SegmentationDataset",
    "OxfordPets",
    "Flowers102",
    "REAL_DATASETS",
    "default_data_root",
    "load_dataset",
    "TRAINING_SPLITS",
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



class SegmentationDataset(Dataset):
    """Base class of every fdiff dataset: items are ``{"image", "mask"}`` dicts.

    ``image``: float32 (3, S, S) in [-1, 1]; ``mask``: int64 (S, S), 1 foreground, 0 background,
    or -1 everywhere when ``has_masks`` is False. Subclasses backed by files implement
    ``__len__`` and ``_load``; images are resized so that their shorter side is S (bilinear,
    antialiased) and centre-cropped to S x S, masks the same way with nearest neighbour.
    """

    has_masks: bool = True

    def __init__(self, image_size: int) -> None:
        self.image_size = check_int(image_size, "image_size", 8)

    @property
    def labels(self) -> Tensor | None:
        """The image-level class of every item (N,) int64 in [0, C), or None when the dataset
        has none."""
        return None

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> tuple[Tensor, Tensor | None]:
        """Return the raw image (C, H, W) uint8 and its mask (H, W) bool, or None if absent."""
        raise NotImplementedError

    def _files(self, index: int) -> list[Path]:
        """The files item ``index`` is read from (named when one of them cannot be read)."""
        return []

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = check_index(index, len(self))
        try:
            image, mask = self._load(index)
        except (OSError, ValueError, SyntaxError) as err:  # PIL: truncated or not an image
            files = ", ".join(map(str, self._files(index))) or "its files"
            raise OSError(
                f"could not read item {index} of {type(self).__name__} ({files}): {err}; the file "
                f"is damaged or incomplete: fetch it again"
            ) from err
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

# Failures of a download that mean the network is not there (or did not answer).
_NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror,
                   http.client.HTTPException)


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
    """Build a torchvision dataset; say what went wrong when it cannot be built: files that are
    missing, a folder that cannot be written, a package that is missing, or a download that
    failed for want of a network (or for another reason, named)."""
    try:
        return factory()
    except ImportError as err:
        raise ImportError(
            f"reading {name} needs the Python package {err.name!r}: pip install {err.name}"
        ) from err
    except (RuntimeError, OSError, EOFError, tarfile.TarError) as err:  # a truncated archive, too
        if isinstance(err, PermissionError) or getattr(err, "errno", None) in (errno.EROFS,
                                                                               errno.EACCES):
            raise PermissionError(
                f"cannot {'write into' if download else 'read'} {folder} for {name} ({err}): "
                f"choose a folder you can write with root= or $FDIFF_DATA"
            ) from err
        if download and isinstance(err, _NETWORK_ERRORS):
            raise DatasetNotFoundError(
                f"Downloading {name} into {root} failed ({type(err).__name__}: {err}): there is "
                f"no internet connection, or the server did not answer. To install it by hand, "
                f"{manual} (expected folder: {folder})."
            ) from err
        if download:
            raise DatasetNotFoundError(
                f"Downloading {name} into {root} failed ({type(err).__name__}: {err}); what was "
                f"fetched may be incomplete. Run again, or install it by hand: {manual} "
                f"(expected folder: {folder})."
            ) from err
        raise DatasetNotFoundError(
            f"{name} was not found (or is incomplete) in {folder}. Pass download=True (the "
            f"training command's --download; needs internet, {size_hint}), or {manual}."
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

    def __init__(self, root: str | Path | None = None, split: str = "trainval",
                 image_size: int = 64, download: bool = False) -> None:
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

    @property
    def labels(self) -> Tensor:
        """The breed of every image (N,) in [0, 37); ``self.label_names`` names them."""
        return torch.tensor(self._tv._labels, dtype=torch.int64)

    @property
    def label_names(self) -> list[str]:
        return list(self._tv.classes)

    def _files(self, index: int) -> list[Path]:
        return [self._tv._images[index], self._tv._segs[index]]

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

    def __init__(self, root: str | Path | None = None, split: str = "train",
                 image_size: int = 64, download: bool = False) -> None:
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

    @property
    def labels(self) -> Tensor:
        """The species of every image (N,) in [0, 102)."""
        return torch.tensor(self._tv._labels, dtype=torch.int64)

    def _files(self, index: int) -> list[Path]:
        image = Path(self._tv._image_files[index])
        return [image, self._segmim_folder / image.name.replace("image_", "segmim_", 1)]

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

# Each dataset accepts "train" and "test" as well as its own split names, so that a training
# loop can ask for the same two splits whatever the dataset.
_SPLIT_ALIASES = {
    "pets": {"train": "trainval", "trainval": "trainval", "test": "test"},
    "flowers": {"train": "train", "val": "val", "valid": "val", "test": "test"},
}
_CLASSES = {"pets": OxfordPets, "flowers": Flowers102}
REAL_DATASETS = tuple(_SPLIT_ALIASES)


def load_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    image_size: int = 64,
    download: bool = False,
) -> SegmentationDataset:
    """Return real dataset ``name`` (one of :data:`REAL_DATASETS`) at S = ``image_size``.

    Items are dicts with ``image`` float32 (3, S, S) in [-1, 1] and ``mask`` int64 (S, S) in
    {0, 1}, or -1 everywhere without masks. ``root`` defaults to :func:`default_data_root`.
    ``split`` accepts ``"train"`` and ``"test"`` everywhere (pets map "train" to "trainval")
    and the datasets' own names ("trainval", "val", "valid").
    """
    if not isinstance(name, str) or name not in _SPLIT_ALIASES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(REAL_DATASETS)}")
    aliases = _SPLIT_ALIASES[name]
    if split not in aliases:
        raise ValueError(f"{name} split must be one of {sorted(aliases)}, got {split!r}")
    return _CLASSES[name](root, split=aliases[split], image_size=image_size, download=download)


# The splits a generative model trains on: everything but the test split (Flowers-102's train
# split alone has only 10 images per class).
TRAINING_SPLITS = {"pets": ("trainval",), "flowers": ("train", "val")}
