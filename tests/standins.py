"""Tiny stand-ins for the real datasets, written in the folder layouts torchvision expects, and
fixtures that make every download fail as it would without internet."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.flowers102
import torchvision.datasets.oxford_iiit_pet
import torchvision.datasets.utils
from PIL import Image

RNG = np.random.default_rng(0)


def _save_rgb(path: Path, height: int, width: int, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def _hand_trimap(size: int) -> np.ndarray:
    trimap = np.full((size, size), 2, dtype=np.uint8)
    trimap[4:12, 3:10] = 3
    trimap[5:11, 4:9] = 1
    return trimap


def make_pets(root: Path) -> Path:
    base = root / "oxford-iiit-pet"
    names = {"trainval": ["Abyssinian_1", "beagle_2", "Bengal_3"], "test": ["pug_4", "Sphynx_5"]}
    (base / "annotations" / "trimaps").mkdir(parents=True)
    for split, ids in names.items():
        lines = [f"{name} {k + 1} {1 + name[0].islower()} 1" for k, name in enumerate(ids)]
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
        for k, name in enumerate(ids):
            # The first image is square at the test size, so resizing leaves it untouched and
            # the mask can be compared pixel for pixel; the others are not square.
            h, w = (16, 16) if k == 0 else (30, 44)
            _save_rgb(base / "images" / f"{name}.jpg", h, w)
            trimap = _hand_trimap(16) if k == 0 else np.full((h, w), 2, np.uint8)
            if k > 0:
                trimap[8:20, 10:30] = 1
            Image.fromarray(trimap, mode="L").save(base / "annotations" / "trimaps" / f"{name}.png")
    return root


def make_flowers(root: Path, with_masks: bool = True) -> Path:
    from scipy.io import savemat

    base = root / "flowers-102"
    n = 6
    for i in range(1, n + 1):
        h, w = (128, 128) if i == 1 else (48, 40)
        _save_rgb(base / "jpg" / f"image_{i:05d}.jpg", h, w)
        if with_masks:
            # Like the real masks: the photo with its background painted blue, saved as JPEG.
            seg = np.zeros((h, w, 3), np.uint8)
            seg[..., 2] = 254
            seg[20:92, 36:100] = (200, 40, 30)
            (base / "segmim").mkdir(parents=True, exist_ok=True)
            Image.fromarray(seg).save(base / "segmim" / f"segmim_{i:05d}.jpg", quality=90)
    savemat(base / "imagelabels.mat", {"labels": np.arange(1, n + 1) % 3 + 1})
    savemat(base / "setid.mat", {"trnid": [1, 2], "valid": [3, 4], "tstid": [5, 6]})
    return root


@pytest.fixture
def skip_md5(monkeypatch):
    """Let torchvision accept the stand-in files, whose md5 differs from the real ones."""

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.flowers102, "check_integrity", exists)


@pytest.fixture
def no_network(monkeypatch):
    """Make every download path fail as it would without internet."""

    def fail(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fail)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fail)
    monkeypatch.setattr(torchvision.datasets.oxford_iiit_pet, "download_and_extract_archive", fail)
    monkeypatch.setattr(torchvision.datasets.flowers102, "download_and_extract_archive", fail)
    monkeypatch.setattr(torchvision.datasets.flowers102, "download_url", fail)


def check_item(item: dict, size: int, mask_values: set[int]) -> None:
    assert set(item) == {"image", "mask"}
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["mask"].shape == (size, size) and item["mask"].dtype == torch.int64
    assert set(item["mask"].unique().tolist()) <= mask_values
