"""Tests of fdiff.data: the procedural shapes and the real-dataset wrappers.

The real datasets are replaced by tiny stand-ins written into ``tmp_path`` in the folder layouts
torchvision expects, and every download function is patched to fail, so nothing touches the
network.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import urllib.request
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.celeba
import torchvision.datasets.flowers102
import torchvision.datasets.mnist
import torchvision.datasets.oxford_iiit_pet
import torchvision.datasets.utils
from PIL import Image

from fdiff.data import (
    DATASET_NAMES,
    CelebA,
    DatasetNotFoundError,
    FashionMNIST,
    Flowers102,
    ForegroundClasses,
    InMemoryImages,
    OxfordPets,
    SegmentationDataset,
    ShapesDataset,
    default_data_root,
    flower_segmim_to_mask,
    labelled_data,
    load_dataset,
    pet_trimap_to_mask,
    training_images,
)

# --------------------------------------------------------------------------------------------
# ShapesDataset
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes200() -> dict[str, torch.Tensor]:
    return ShapesDataset(200, image_size=32, seed=0).batch(range(200))


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_shapes_item_shapes_dtypes_ranges(size):
    ds = ShapesDataset(4, image_size=size)
    assert len(ds) == 4
    item = ds[3]
    assert set(item) == {"image", "mask", "semantic", "instance"}
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    for key in ("mask", "semantic", "instance"):
        assert item[key].shape == (size, size) and item[key].dtype == torch.int64
    assert set(item["mask"].unique().tolist()) <= {0, 1}
    assert item["semantic"].min() >= 0 and item["semantic"].max() < ds.num_classes
    assert item["instance"].min() >= 0 and item["instance"].max() <= ds.max_objects


def test_shapes_class_names():
    assert ShapesDataset.CLASS_NAMES[0] == "background"
    assert len(ShapesDataset.CLASS_NAMES) >= 5
    assert ShapesDataset(1).num_classes == len(ShapesDataset.CLASS_NAMES)
    assert isinstance(ShapesDataset(1), SegmentationDataset) and ShapesDataset(1).has_masks


def test_shapes_deterministic_by_seed():
    a, b = ShapesDataset(8, seed=3), ShapesDataset(8, seed=3)
    for i in range(8):
        for key, value in a[i].items():
            assert torch.equal(value, b[i][key])
    c = ShapesDataset(8, seed=4)
    assert not torch.equal(a.batch(range(8))["image"], c.batch(range(8))["image"])


def test_shapes_train_and_test_are_disjoint():
    train = ShapesDataset(30, split="train").batch(range(30))["image"].flatten(1)
    test = ShapesDataset(30, split="test").batch(range(30))["image"].flatten(1)
    # No test image equals (or nearly equals) any train image.
    assert torch.cdist(train, test).min() > 1.0


def test_shapes_item_independent_of_access_order():
    ds_a, ds_b = ShapesDataset(10, seed=1), ShapesDataset(10, seed=1)
    forward = {i: ds_a[i] for i in range(10)}
    backward = {i: ds_b[i] for i in reversed(range(10))}
    for i in range(10):
        assert torch.equal(forward[i]["image"], backward[i]["image"])
        assert torch.equal(forward[i]["instance"], backward[i]["instance"])
    # A longer dataset with the same seed has the same first items.
    assert torch.equal(ShapesDataset(1000, seed=1)[7]["image"], forward[7]["image"])


def test_shapes_batch_equals_stacked_items():
    ds = ShapesDataset(12, image_size=16, seed=2)
    idx = [5, 0, 11, 5]
    batch = ds.batch(idx)
    for key in ("image", "mask", "semantic", "instance"):
        assert torch.equal(batch[key], torch.stack([ds[i][key] for i in idx]))
    from_tensor = ds.batch(torch.tensor(idx))
    assert torch.equal(from_tensor["image"], batch["image"])
    assert ds.batch([])["image"].shape == (0, 3, 16, 16)


def test_shapes_labels_consistent(shapes200):
    mask, semantic, instance = shapes200["mask"], shapes200["semantic"], shapes200["instance"]
    assert torch.equal(mask, (semantic > 0).long())
    assert torch.equal(mask, (instance > 0).long())
    assert (mask.float().mean((1, 2)) > 0).all(), "every image shows at least one object"
    # Each visible instance has one class, and lies inside its unoccluded shape.
    ds = ShapesDataset(200, image_size=32, seed=0)
    for i in range(20):
        layers = ds.layers(i)
        assert layers["masks"].dtype == torch.bool and layers["masks"].shape[1:] == (32, 32)
        for k in instance[i].unique().tolist():
            if k == 0:
                continue
            region = instance[i] == k
            assert semantic[i][region].unique().tolist() == [layers["classes"][k - 1].item()]
            assert not (region & ~layers["masks"][k - 1]).any()


def test_shapes_object_counts_and_classes(shapes200):
    ds = ShapesDataset(200, image_size=32, seed=0)
    counts = {len(ds.layers(i)["classes"]) for i in range(50)}
    assert len(counts) >= 2 and counts <= set(range(1, ds.max_objects + 1))
    seen = set(shapes200["semantic"].unique().tolist())
    assert seen == set(range(ds.num_classes))


def test_shapes_max_objects_one():
    batch = ShapesDataset(20, max_objects=1).batch(range(20))
    assert set(batch["instance"].unique().tolist()) == {0, 1}


def test_simple_shapes_are_the_same_scenes_without_their_patterns():
    from fdiff.data import BUILTIN_DATASETS, builtin_dataset

    simple = builtin_dataset("simple-shapes", 40, 32, split="test")
    assert (simple.max_objects, simple.textured) == (1, False)
    assert set(BUILTIN_DATASETS) == {"shapes", "simple-shapes"}
    textured = ShapesDataset(40, 32, split="test", max_objects=1)
    a, b = simple.batch(range(40)), textured.batch(range(40))
    for key in ("mask", "semantic", "instance"):
        assert torch.equal(a[key], b[key])  # same shapes, places and classes
    # Inside the object and on the background, away from the antialiased edge, each image is
    # one colour plus the pixel noise (std 0.02 in [0, 1], 0.04 in [-1, 1]).
    mask = a["mask"].bool()
    m = a["mask"][:, None].float()
    pool = torch.nn.functional.max_pool2d
    edge = (pool(m, 3, 1, 1) != -pool(-m, 3, 1, 1))[:, 0]
    for i in range(40):
        for region in (mask[i] & ~edge[i], ~mask[i] & ~edge[i]):
            pixels = a["image"][i][:, region]
            if pixels.shape[1] > 4:  # a thin ring may have no pixel away from its edges
                assert pixels.std(dim=1).max() < 0.06
    # The textured version is not flat: its background spread is much larger.
    spread = b["image"][:, :, ~mask[0]].std(dim=2).mean()
    assert spread > 0.1
    assert load_dataset("simple-shapes", split="valid", image_size=16).textured is False
    with pytest.raises(ValueError, match="unknown built-in dataset 'flat'.*simple-shapes"):
        builtin_dataset("flat", 4)
    with pytest.raises(TypeError, match="textured must be True or False"):
        ShapesDataset(4, textured="no")


def test_shapes_occlusion_happens(shapes200):
    ds = ShapesDataset(200, image_size=32, seed=0)
    occluded = 0
    for i in range(60):
        full = ds.layers(i)["masks"]
        visible = torch.stack([(shapes200["instance"][i] == k + 1) for k in range(len(full))])
        occluded += int((visible.sum((1, 2)) < full.sum((1, 2))).any())
    assert occluded >= 5


def test_shapes_geometry_independent_of_size():
    small, large = ShapesDataset(20, image_size=32), ShapesDataset(20, image_size=64)
    frac_small = small.batch(range(20))["mask"].float().mean((1, 2))
    frac_large = large.batch(range(20))["mask"].float().mean((1, 2))
    assert (frac_small - frac_large).abs().max() < 0.05


def test_shapes_foreground_fraction(shapes200):
    frac = shapes200["mask"].float().mean().item()
    assert 0.15 < frac < 0.5


def test_shapes_not_solved_by_colour_clustering():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    batch = ShapesDataset(100, image_size=32, split="test").batch(range(100))
    # One thread: on a small busy machine OpenMP workers for 1024 points cost far more than
    # they save.
    with threadpoolctl.threadpool_limits(1):
        ious = [
            _best_kmeans_iou(sklearn_cluster, image, mask)
            for image, mask in zip(batch["image"], batch["mask"], strict=True)
        ]
    assert np.mean(ious) < 0.6


def _best_kmeans_iou(sklearn_cluster, image: torch.Tensor, mask: torch.Tensor) -> float:
    pixels = image.reshape(3, -1).T.numpy()
    fg = mask.reshape(-1).numpy().astype(bool)
    km = sklearn_cluster.KMeans(n_clusters=2, n_init=3, random_state=0)
    labels = km.fit_predict(pixels)
    # Either cluster may play the foreground: keep the better match.
    return max(((labels == c) & fg).sum() / ((labels == c) | fg).sum() for c in (0, 1))


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="num_images"):
        ShapesDataset(0)
    with pytest.raises(TypeError, match="num_images"):
        ShapesDataset(2.5)
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(4, image_size=7)
    with pytest.raises(ValueError, match="max_objects"):
        ShapesDataset(4, max_objects=0)
    with pytest.raises(ValueError, match="max_objects"):
        ShapesDataset(4, max_objects=9)
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(4, split="val")
    with pytest.raises(ValueError, match="seed"):
        ShapesDataset(4, seed=-1)
    ds = ShapesDataset(4)
    for bad in (4, -1, 100):
        with pytest.raises(IndexError):
            ds[bad]
    with pytest.raises(IndexError):
        ds.batch([0, 4])
    with pytest.raises(TypeError):
        ds["0"]
    with pytest.raises(ValueError, match="one-dimensional"):
        ds.batch(torch.zeros(2, 2, dtype=torch.long))


def test_shapes_in_dataloader():
    loader = torch.utils.data.DataLoader(ShapesDataset(6, image_size=16), batch_size=4)
    first = next(iter(loader))
    assert first["image"].shape == (4, 3, 16, 16) and first["mask"].shape == (4, 16, 16)


# --------------------------------------------------------------------------------------------
# Stand-ins for the real datasets
# --------------------------------------------------------------------------------------------

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


def make_celeba(root: Path) -> Path:
    base = root / "celeba"
    splits = [0, 0, 0, 1, 1, 2, 2]
    names = [f"{i:06d}.jpg" for i in range(1, len(splits) + 1)]
    for name in names:
        _save_rgb(base / "img_align_celeba" / name, 218, 178)
    rows = lambda values: "\n".join(f"{n} {v}" for n, v in zip(names, values, strict=True))
    (base / "list_eval_partition.txt").write_text(rows(splits) + "\n")
    (base / "identity_CelebA.txt").write_text(rows(range(len(names))) + "\n")
    count = f"{len(names)}\n"
    (base / "list_attr_celeba.txt").write_text(count + "Smiling Young\n" + rows(["1 -1"] * 7))
    (base / "list_bbox_celeba.txt").write_text(
        count + "image_id x_1 y_1 width height\n" + rows(["95 71 226 313"] * 7)
    )
    landmarks = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y"
    landmarks += " leftmouth_x leftmouth_y rightmouth_x rightmouth_y\n"
    (base / "list_landmarks_align_celeba.txt").write_text(
        count + landmarks + rows(["69 109 106 113 77 142 73 152 108 154"] * 7)
    )
    return root


def _write_idx(path: Path, array: np.ndarray) -> None:
    # idx format: magic (0, 0, dtype 0x08 = uint8, ndim), then big-endian int32 dims, then data.
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fashion_pixels(n: int) -> np.ndarray:
    pixels = np.zeros((n, 28, 28), np.uint8)
    pixels[:, 6:22, 8:20] = 200
    pixels[:, 5, 8:20] = 6  # a faint fringe, below the threshold
    pixels[:, 22, 8:20] = 40
    return pixels


def make_fashion(root: Path) -> Path:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 5), ("t10k", 3)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", fashion_pixels(n))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


@pytest.fixture
def skip_md5(monkeypatch):
    """Let torchvision accept the stand-in files, whose md5 differs from the real ones."""

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.flowers102, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.celeba, "check_integrity", exists)


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
    monkeypatch.setattr(torchvision.datasets.celeba, "download_file_from_google_drive", fail)
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fail)


def check_item(item: dict, size: int, mask_values: set[int]) -> None:
    assert set(item) == {"image", "mask"}
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["mask"].shape == (size, size) and item["mask"].dtype == torch.int64
    assert set(item["mask"].unique().tolist()) <= mask_values


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------


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


def test_celeba(tmp_path, skip_md5):
    root = make_celeba(tmp_path)
    ds = CelebA(root, split="train", image_size=32)
    assert len(ds) == 3 and not ds.has_masks
    item = ds[2]
    check_item(item, 32, {-1})
    assert len(CelebA(root, split="valid", image_size=16)) == 2
    assert len(CelebA(root, split="test", image_size=16)) == 2


def test_fashion_mnist(tmp_path):
    root = make_fashion(tmp_path)
    ds = FashionMNIST(root, train=True, image_size=28)
    assert len(ds) == 5 and ds.has_masks
    item = ds[0]
    check_item(item, 28, {0, 1})
    assert torch.equal(item["mask"], torch.from_numpy(fashion_pixels(1)[0] > 10).long())
    # Grey images become three equal channels.
    assert torch.equal(item["image"][0], item["image"][1])
    assert torch.equal(item["image"][0], item["image"][2])
    test = FashionMNIST(root, train=False, image_size=32)
    assert len(test) == 3
    check_item(test[2], 32, {0, 1})
    with pytest.raises(IndexError):
        test[3]


@pytest.mark.parametrize(
    "make, name, folder",
    [
        (lambda root: OxfordPets(root), "Oxford-IIIT Pets", "oxford-iiit-pet"),
        (lambda root: Flowers102(root), "Oxford Flowers 102", "flowers-102"),
        (lambda root: CelebA(root), "CelebA", "celeba"),
        (lambda root: FashionMNIST(root), "Fashion-MNIST", "FashionMNIST"),
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
        lambda root: CelebA(root, download=True),
        lambda root: FashionMNIST(root, download=True),
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
    make_fashion(tmp_path)
    pets = load_dataset("pets", tmp_path, "train", 16)
    assert isinstance(pets, OxfordPets) and pets.split == "trainval" and len(pets) == 3
    fashion = load_dataset("fashion-mnist", tmp_path, "test", 32)
    assert isinstance(fashion, FashionMNIST) and not fashion.train
    check_item(fashion[0], 32, {0, 1})
    shapes = load_dataset("shapes", split="test", image_size=16)
    assert isinstance(shapes, ShapesDataset) and shapes.split == "test"
    # Without a root the cache folder (here redirected) is searched.
    monkeypatch.setenv("FDIFF_DATA", str(tmp_path / "empty"))
    with pytest.raises(DatasetNotFoundError, match="empty"):
        load_dataset("celeba", split="valid", image_size=16)
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("mnist", tmp_path, "train", 32)
    with pytest.raises(ValueError, match="split"):
        load_dataset("pets", tmp_path, "everything", 32)
    assert set(DATASET_NAMES) >= {"pets", "flowers", "celeba", "fashion-mnist"}


def test_wrappers_validate_image_size(tmp_path):
    make_fashion(tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        FashionMNIST(tmp_path, image_size=4)
    with pytest.raises(TypeError, match="train"):
        FashionMNIST(tmp_path, train="yes")


# --------------------------------------------------------------------------------------------
# Training on real images
# --------------------------------------------------------------------------------------------


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


def test_training_images_use_every_split_but_test(tmp_path, skip_md5):
    make_pets(tmp_path)
    make_flowers(tmp_path)
    pets = training_images("pets", tmp_path, image_size=16, progress=False)
    assert len(pets) == 3  # trainval
    torch.testing.assert_close(
        pets[0]["image"], OxfordPets(tmp_path, image_size=16)[0]["image"], atol=0.5 / 127.5,
        rtol=0)
    flowers = training_images("flowers", tmp_path, image_size=16, progress=False)
    assert len(flowers) == 4  # train + val, not the 2 test images
    with pytest.raises(ValueError, match="real dataset"):
        training_images("shapes")
    with pytest.raises(DatasetNotFoundError, match="download=True"):
        training_images("pets", tmp_path / "nowhere", progress=False)


def test_the_training_command_trains_a_factorized_model_on_stand_in_pets(tmp_path, monkeypatch):
    from fdiff.checkpoints import load_model, read_manifest
    from fdiff.train import main

    root = make_pets(tmp_path / "data")
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ckpt"
    main(["--model", "factorized", "--profile", "ci", "--dataset", "pets", "--data-root",
          str(root), "--steps", "2", "--name", "pets_test", "--out-dir", str(out)])
    entry = read_manifest(out)["pets_test"]
    assert entry["dataset"] == "pets" and entry["steps"] == 2
    model, meta = load_model(out / "pets_test.safetensors")
    probe = meta["tensors"]["snapshot_images"]  # the test split's two images
    expected = torch.stack([OxfordPets(root, "test", 16)[i]["image"] for i in range(2)])
    torch.testing.assert_close(probe, expected)
    assert meta["dataset"] == "pets" and model.config.num_regions == 2


def test_the_training_command_says_where_a_missing_dataset_should_be(tmp_path, monkeypatch):
    from fdiff.train import main

    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetNotFoundError, match="oxford-iiit-pet"):
        main(["--profile", "ci", "--dataset", "pets", "--data-root", str(tmp_path / "none"),
              "--steps", "1", "--name", "x", "--out-dir", str(tmp_path)])


def test_labelled_data_follows_the_profile(tmp_path, monkeypatch):
    from fdiff.profiles import get_profile

    monkeypatch.delenv("FDIFF_DATASET", raising=False)

    ci = get_profile("ci")
    shapes = labelled_data(ci)
    assert shapes.dataset == "shapes" and shapes.class_names == ShapesDataset.CLASS_NAMES
    assert len(shapes.train) == ci.num_train_images and len(shapes.test) == ci.num_test_images
    assert set(shapes.test.batch([0, 1])) >= {"image", "semantic"}
    simple = labelled_data(ci, dataset="simple-shapes")
    assert simple.dataset == "simple-shapes" and simple.class_names == ShapesDataset.CLASS_NAMES
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
    with pytest.raises(ValueError, match="shapes, pets and flowers"):
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
    make_celeba(tmp_path)
    with pytest.raises(ValueError, match="no masks"):
        ForegroundClasses(CelebA(tmp_path, image_size=16))


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
