"""Tests of fdiff.datasets: the real-dataset wrappers, on tiny stand-ins written into
``tmp_path``; every download function is patched to fail, so nothing touches the network."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.utils
from standins import _hand_trimap, check_item, make_flowers, make_pets, no_network, skip_md5

from fdiff.datasets import (
    REAL_DATASETS,
    DatasetNotFoundError,
    Flowers102,
    OxfordPets,
    default_data_root,
    flower_segmim_to_mask,
    load_dataset,
    pet_trimap_to_mask,
)

__all__ = ["no_network", "skip_md5"]  # fixtures used by name


def test_trimap_rule():
    trimap = np.array([[1, 2, 3], [2, 2, 1]], dtype=np.uint8)
    expected = torch.tensor([[1, 0, 1], [0, 0, 1]])
    assert torch.equal(pet_trimap_to_mask(trimap), expected)
    with pytest.raises(ValueError, match="H, W"):
        pet_trimap_to_mask(np.ones((2, 2, 2)))


def test_pets(tmp_path):
    root = make_pets(tmp_path)
    ds = OxfordPets(root, split="trainval", image_size=16)
    assert len(ds) == 3 and ds.has_masks
    first = ds[0]
    check_item(first, 16, {0, 1})
    assert torch.equal(first["mask"], torch.from_numpy(_hand_trimap(16) != 2).long())
    check_item(ds[1], 16, {0, 1})
    assert ds[1]["mask"].sum() > 0
    test = OxfordPets(root, split="test", image_size=32)
    assert len(test) == 2
    check_item(test[1], 32, {0, 1})
    with pytest.raises(ValueError, match="trainval"):
        OxfordPets(root, split="val")


def test_flowers_with_masks(tmp_path, skip_md5):
    root = make_flowers(tmp_path)
    ds = Flowers102(root, split="train", image_size=16)
    assert len(ds) == 2 and ds.has_masks
    expected = torch.zeros(16, 16, dtype=torch.long)
    expected[3:12, 5:13] = 1  # nearest neighbour samples rows and columns 0, 8, 16, ...
    # JPEG blurs the painted edges by a pixel or so, which must not reach the samples.
    assert (ds[0]["mask"] != expected).sum() <= 2
    check_item(ds[1], 16, {0, 1})
    assert len(Flowers102(root, split="test", image_size=8)) == 2


def test_flowers_without_masks(tmp_path, skip_md5):
    root = make_flowers(tmp_path, with_masks=False)
    ds = Flowers102(root, split="val", image_size=16)
    assert not ds.has_masks
    item = ds[0]
    check_item(item, 16, {-1})
    assert (item["mask"] == -1).all()


def test_segmim_rule():
    seg = np.zeros((2, 3, 3), np.uint8)
    seg[..., 2] = 254
    seg[0, 0] = (10, 20, 240)  # JPEG-shifted background
    seg[0, 1] = (30, 30, 120)  # a dark blue petal
    seg[1, 2] = (250, 250, 250)
    assert flower_segmim_to_mask(seg).tolist() == [[0, 1, 0], [0, 0, 1]]


@pytest.mark.parametrize(
    "make, name, folder",
    [
        (lambda root: OxfordPets(root), "Oxford-IIIT Pets", "oxford-iiit-pet"),
        (lambda root: Flowers102(root), "Oxford Flowers 102", "flowers-102"),
    ],
)
def test_missing_files_raise_helpful_error(tmp_path, make, name, folder):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        make(missing)
    message = str(info.value)
    assert name in message and folder in message and str(missing) in message
    assert "download=True" in message
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize(
    "make",
    [
        lambda root: OxfordPets(root, download=True),
        lambda root: Flowers102(root, download=True),
    ],
)
def test_download_without_network_raises_helpful_error(tmp_path, no_network, make):
    with pytest.raises(DatasetNotFoundError) as info:
        make(tmp_path / "cache")
    message = str(info.value)
    assert "failed" in message and "internet" in message
    assert str(tmp_path / "cache") in message


def test_flower_masks_download_without_network(tmp_path, skip_md5, no_network):
    root = make_flowers(tmp_path, with_masks=False)
    with pytest.raises(DatasetNotFoundError, match="102segmentations"):
        Flowers102(root, download=True)


def test_flower_masks_download_whole_or_not_at_all(tmp_path, skip_md5, monkeypatch):
    root = make_flowers(tmp_path / "a", with_masks=False)
    folder = root / "flowers-102"
    masks = make_flowers(tmp_path / "b") / "flowers-102" / "segmim"

    def truncated(url, download_root, extract_root=None, **kwargs):
        (Path(download_root) / "102segmentations.tgz").write_bytes(b"\x1f\x8b")
        (Path(extract_root) / "segmim").mkdir(parents=True)  # half extracted
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", truncated)
    with pytest.raises(DatasetNotFoundError, match="EOFError"):
        Flowers102(root, download=True)
    # nothing left that a later run would trust
    assert not (folder / "segmim").exists() and not (folder / "102segmentations.tgz").exists()
    assert not (folder / "segmim.partial").exists()

    def complete(url, download_root, extract_root=None, **kwargs):
        shutil.copytree(masks, Path(extract_root) / "segmim")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", complete)
    ds = Flowers102(root, split="train", image_size=16, download=True)
    assert ds.has_masks and ds[0]["mask"].sum() > 0
    assert not (folder / "segmim.partial").exists()


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("FDIFF_DATA", raising=False)
    assert default_data_root() == Path.home() / ".cache" / "fdiff" / "datasets"
    monkeypatch.setenv("FDIFF_DATA", str(tmp_path / "data"))
    assert default_data_root() == tmp_path / "data"


def test_load_dataset(tmp_path, monkeypatch, skip_md5):
    make_pets(tmp_path)
    make_flowers(tmp_path)
    pets = load_dataset("pets", tmp_path, "train", 16)
    assert isinstance(pets, OxfordPets) and pets.split == "trainval" and len(pets) == 3
    flowers = load_dataset("flowers", tmp_path, "valid", 32)
    assert isinstance(flowers, Flowers102) and flowers.split == "val"
    check_item(flowers[0], 32, {0, 1})
    # Without a root the cache folder (here redirected) is searched.
    monkeypatch.setenv("FDIFF_DATA", str(tmp_path / "empty"))
    with pytest.raises(DatasetNotFoundError, match="empty"):
        load_dataset("pets", split="test", image_size=16)
    with pytest.raises(ValueError, match="pets, flowers"):
        load_dataset("mnist", tmp_path, "train", 32)
    with pytest.raises(ValueError, match="split"):
        load_dataset("pets", tmp_path, "everything", 32)
    assert set(REAL_DATASETS) == {"pets", "flowers"}


def test_wrappers_validate_image_size(tmp_path):
    make_pets(tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        OxfordPets(tmp_path, image_size=4)
    with pytest.raises(TypeError, match="image_size"):
        OxfordPets(tmp_path, image_size=16.0)
