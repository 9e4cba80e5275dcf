"""Tests of fdiff.data: data by name, in-memory images, the labelled data of each profile."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from standins import make_flowers, make_pets, skip_md5

from fdiff.data import (
    ForegroundClasses,
    InMemoryImages,
    labelled_data,
    training_data,
)
from fdiff.datasets import DatasetNotFoundError, OxfordPets
from fdiff.shapes import SHAPE_NAMES
from fdiff.worlds import ShapesDataset

__all__ = ["skip_md5"]  # a fixture used by name


def test_in_memory_images_keep_the_images_to_8_bits():
    shapes = ShapesDataset(5, 16, split="test")
    cached = InMemoryImages(shapes, progress=False)
    assert len(cached) == 5 and cached.image_size == 16 and cached.images.dtype == torch.uint8
    original = shapes.batch(range(5))["image"]
    assert (cached.batch([0, 1, 2, 3, 4])["image"] - original).abs().max() <= 0.5 / 127.5 + 1e-6
    torch.testing.assert_close(cached[3]["image"], cached.batch([3])["image"][0])
    with pytest.raises(IndexError):
        cached.batch([5])
    with pytest.raises(ValueError, match="at least one image"):
        InMemoryImages(torch.utils.data.Subset(shapes, []), progress=False)


def test_training_data_of_a_world_or_of_every_split_but_test(tmp_path, skip_md5):
    shapes = training_data("shapes", 16, num_images=7)
    assert len(shapes) == 7 and shapes.split == "train" and shapes.image_size == 16
    make_pets(tmp_path)
    make_flowers(tmp_path)
    pets = training_data("pets", 16, root=tmp_path, progress=False)
    assert len(pets) == 3  # trainval
    torch.testing.assert_close(
        pets[0]["image"], OxfordPets(tmp_path, image_size=16)[0]["image"], atol=0.5 / 127.5,
        rtol=0)
    flowers = training_data("flowers", 16, root=tmp_path, progress=False)
    assert len(flowers) == 4  # train + val, not the 2 test images
    with pytest.raises(ValueError, match="needs num_images"):
        training_data("shapes", 16)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        training_data("imagenet", 16)
    with pytest.raises(DatasetNotFoundError, match="download=True"):
        training_data("pets", 16, root=tmp_path / "nowhere", progress=False)


def test_the_training_command_trains_a_factorized_model_on_stand_in_pets(tmp_path, monkeypatch):
    from fdiff.checkpoints import load_model, read_manifest
    from fdiff.cli import main

    root = make_pets(tmp_path / "data")
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ckpt"
    main(["factorized_pets", "--profile", "ci", "--data-root", str(root), "--set", "steps=2",
          "--out-dir", str(out)])
    entry = read_manifest(out)["factorized_pets"]
    assert entry["run"]["data"]["name"] == "pets" and entry["run"]["train"]["steps"] == 2
    model, meta = load_model(out / "factorized_pets.safetensors")
    probe = meta["tensors"]["snapshot_images"]  # the test split's two images
    expected = torch.stack([OxfordPets(root, "test", 16)[i]["image"] for i in range(2)])
    torch.testing.assert_close(probe, expected)
    assert meta["run"] == entry["run"] and model.config.num_regions == 2


def test_the_training_command_says_where_a_missing_dataset_should_be(tmp_path, monkeypatch):
    from fdiff.cli import main

    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetNotFoundError, match="oxford-iiit-pet"):
        main(["ddpm_shapes", "--profile", "ci", "--dataset", "pets", "--data-root",
              str(tmp_path / "none"), "--set", "steps=1", "--out-dir", str(tmp_path)])


def test_labelled_data_follows_the_profile(tmp_path, monkeypatch):
    from fdiff.profiles import get_profile

    monkeypatch.delenv("FDIFF_DATASET", raising=False)

    ci = get_profile("ci")
    shapes = labelled_data(ci)
    assert shapes.dataset == "shapes" and shapes.class_names == SHAPE_NAMES
    assert len(shapes.train) == ci.num_train_images and len(shapes.test) == ci.num_test_images
    assert set(shapes.test.batch([0, 1])) >= {"image", "semantic"}
    simple = labelled_data(ci, dataset="simple-shapes")
    assert simple.dataset == "simple-shapes" and simple.class_names == SHAPE_NAMES
    assert simple.train.max_objects == 1 and not simple.test.textured
    # gpu: Oxford-IIIT Pets, whose foreground masks become the classes (background, pet)
    root = make_pets(tmp_path)
    pets = labelled_data(get_profile("gpu"), root=root)
    assert pets.dataset == "pets" and pets.class_names == ("background", "pet")
    assert (len(pets.train), len(pets.test)) == (3, 2)
    batch = pets.test.batch([0, 1])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["semantic"].dtype == torch.int64
    truth = OxfordPets(root, "test", 64)[1]["mask"]
    assert torch.equal(batch["semantic"][1], truth) and torch.equal(pets.test[1]["semantic"], truth)
    with pytest.raises(ValueError, match="shapes, simple-shapes, object, .*, pets, flowers"):
        labelled_data(ci, dataset="celeba")
    # the environment chooses too; the test split is cut to the profile's size
    monkeypatch.setenv("FDIFF_DATASET", "pets")
    small = dataclasses.replace(ci, num_test_images=1)
    chosen = labelled_data(small, root=root)
    assert chosen.dataset == "pets" and len(chosen.test) == 1 and len(chosen.train) == 3
    monkeypatch.setenv("FDIFF_DATASET", "imagenet")
    with pytest.raises(ValueError, match="FDIFF_DATASET"):
        labelled_data(ci)
    monkeypatch.delenv("FDIFF_DATASET")
    with pytest.raises(DatasetNotFoundError, match="download=True"):
        labelled_data(get_profile("gpu"), root=tmp_path / "nowhere")


def test_foreground_classes_need_masks(tmp_path, skip_md5):
    from fdiff.datasets import Flowers102

    make_flowers(tmp_path, with_masks=False)
    with pytest.raises(ValueError, match="no masks"):
        ForegroundClasses(Flowers102(tmp_path, image_size=16))


def test_pixel_probing_reads_the_foreground_classes_of_a_real_dataset(tmp_path):
    from fdiff.features import sample_pixels
    from fdiff.probing import ProbeConfig, ProbeEnsemble, predict_images
    from fdiff.profiles import get_profile

    pets = labelled_data(get_profile("ci"), dataset="pets", root=make_pets(tmp_path))
    X, y = sample_pixels(lambda images: images, pets.train, [0, 1, 2], progress=False)
    assert X.shape == (3 * 16 * 16, 3) and set(y.tolist()) == {0, 1}
    # every pixel of the three images, labelled by its trimap's foreground class
    truth = pets.train.batch([0, 1, 2])["semantic"].flatten()
    assert torch.equal(torch.bincount(y, minlength=2), torch.bincount(truth, minlength=2))
    probe = ProbeEnsemble(3, 2, ProbeConfig(ensemble_size=2, max_epochs=2)).fit(X, y)
    batch = pets.test.batch([0, 1])
    pred, unc = predict_images(lambda images: images, probe, batch["image"])
    assert pred.shape == unc.shape == batch["semantic"].shape
    # The stand-in photos are noise, so no score is expected: the plumbing is what is tested.
    assert pred.dtype == torch.int64 and unc.is_floating_point()
    assert set(pred.unique().tolist()) <= {0, 1} and 0 <= unc.min() <= unc.max() <= 1
