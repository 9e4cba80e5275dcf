"""Tests of fdiff.worlds: the built-in procedural worlds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fdiff.worlds import WORLDS, ShapesDataset, world


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
    assert ShapesDataset(1).has_masks


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
    simple = world("simple-shapes", 40, 32, split="test")
    assert (simple.max_objects, simple.textured) == (1, False)
    assert {"shapes", "simple-shapes"} <= set(WORLDS)
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
    with pytest.raises(ValueError, match="unknown built-in world 'flat'.*simple-shapes"):
        world("flat", 4)
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


# -- Object scenes: the factorized denoiser's world ----------------------------------------


@pytest.fixture(scope="module")
def object_scenes():
    return {name: world(name, 200, 32, split="test").batch(range(200))
            for name in ("object", "object-flat", "object-shared", "objects")}


def test_object_scenes_keep_the_item_contract_and_are_deterministic(object_scenes):
    for name, batch in object_scenes.items():
        assert batch["image"].shape == (200, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert -1 <= batch["image"].min() and batch["image"].max() <= 1, name
        assert torch.equal(batch["mask"], (batch["instance"] > 0).long())
        assert torch.equal(batch["mask"], (batch["semantic"] > 0).long())
        assert set(batch["semantic"].unique().tolist()) == set(range(6)), name
    again = world("object", 200, 32, split="test")
    assert torch.equal(again[17]["image"], object_scenes["object"]["image"][17])
    train = world("object", 50, 32, split="train").batch(range(50))["image"].flatten(1)
    test = object_scenes["object"]["image"][:50].flatten(1)
    assert torch.cdist(train, test).min() > 1.0  # disjoint splits


def test_one_object_per_scene_large_and_often_crossing_the_frame(object_scenes):
    batch = object_scenes["object"]
    assert batch["instance"].amax((1, 2)).eq(1).all()  # exactly one object in every scene
    area = batch["mask"].float().mean((1, 2))
    assert 0.2 < area.mean() < 0.35 and area.min() > 0.05
    frame = torch.zeros(32, 32, dtype=torch.bool)
    frame[0] = frame[-1] = frame[:, 0] = frame[:, -1] = True
    crosses = batch["mask"][:, frame].any(1).float().mean()
    assert 0.3 < crosses < 0.7
    # ...but it holds less of the frame than the ground does, in nearly every scene.
    assert (batch["mask"][:, frame].float().mean(1) < 0.5).float().mean() > 0.95
    several = object_scenes["objects"]["instance"].amax((1, 2))
    assert several.min() >= 1 and several.max() == 4 and (several > 1).float().mean() > 0.5


def test_the_variants_change_one_factor_and_keep_the_scene(object_scenes):
    main, flat, shared = (object_scenes[k] for k in ("object", "object-flat", "object-shared"))
    for key in ("mask", "semantic", "instance"):
        assert torch.equal(main[key], flat[key]) and torch.equal(main[key], shared[key])
    from fdiff.metrics import near_edges

    away = ~near_edges(main["mask"])  # leave the antialiased outline out
    inside = main["mask"].bool() & away

    def spread(batch, where):  # mean per-image colour spread over a region
        return torch.stack([batch["image"][i][:, where[i]].std(1).mean()
                            for i in range(200) if where[i].sum() > 20]).mean()

    # flat: one colour plus pixel noise in each region; the others carry texture or shading
    outside = ~main["mask"].bool() & away
    assert spread(flat, outside) < 0.05 and spread(flat, inside) < 0.05
    assert spread(main, outside) > 0.15

    def roughness(batch, where):  # mean change from a pixel to its right neighbour
        both = where[:, :, 1:] & where[:, :, :-1]
        step = (batch["image"][..., 1:] - batch["image"][..., :-1]).abs().mean(1)
        return step[both].mean()

    # Shading varies smoothly; the shared variant's objects are as rough as the ground.
    assert roughness(shared, inside) > 1.25 * roughness(main, inside)
    assert abs(roughness(shared, inside) - roughness(main, outside)) < 0.3 * roughness(main,
                                                                                       outside)


def test_colour_alone_does_not_find_the_object(object_scenes):
    from fdiff.baselines import colour_kmeans
    from fdiff.metrics import foreground_scores

    batch = object_scenes["object"]
    best = foreground_scores(colour_kmeans(batch["image"], 2), batch["mask"], per_image=True)
    assert best["iou"] < 0.55  # the best of two colour clusters, per image
    flat = object_scenes["object-flat"]
    assert foreground_scores(colour_kmeans(flat["image"], 2), flat["mask"],
                             per_image=True)["iou"] > 0.85
