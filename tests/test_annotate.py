"""Self-annotation: features, k-means self-labels, their scores, class subsets, layouts."""

import math

import pytest
import torch
from standins import make_flowers, make_pets, skip_md5  # noqa: F401  (skip_md5: a fixture)

from fdiff.annotate import (
    Conditioned,
    Selected,
    augment_views,
    class_subset,
    cluster_purity,
    cluster_scores,
    image_classes,
    majority_class,
    pooled_features,
    segment_layouts,
    self_annotate,
    silhouette,
    split_by_class,
    training_labels,
)
from fdiff.runs import DataSpec
from fdiff.schedules import NoiseSchedule
from fdiff.seeding import make_generator
from fdiff.worlds import world


def test_kmeans_self_labels_find_well_separated_groups():
    gen = make_generator(0)
    centres = torch.eye(4, 16) * 10
    labels = torch.arange(200) % 4
    feats = centres[labels] + torch.randn(200, 16, generator=gen)
    # features are L2-normalised first: scaling an image's features changes nothing
    feats = feats * torch.rand(200, 1, generator=gen).add(0.5)
    found = self_annotate(feats, 4, seed=0)
    scores = cluster_scores(found.ids, labels)
    assert scores["nmi"] == pytest.approx(1.0) and scores["ari"] == pytest.approx(1.0)
    assert scores["purity"] == 1.0
    assert torch.equal(found.assign(feats), found.ids)
    assert found.k == 4 and found.centroids.shape == (4, 16)


def test_split_by_class_clusters_each_class_apart_and_never_mixes_them():
    gen = make_generator(0)
    # two classes whose features overlap completely: self-labels would mix them, the split
    # cannot, and it shares k = 5 as 3 + 2 clusters numbered class by class
    classes = torch.arange(300) % 2
    feats = torch.randn(300, 8, generator=gen)
    split = split_by_class(feats, classes, 5, seed=0)
    assert split.k == 5 and split.centroids.shape == (5, 8) and split.ids.shape == (300,)
    assert cluster_purity(split.ids, classes, 5).min() == 1.0
    assert set(split.ids[classes == 0].tolist()) == {0, 1, 2}
    assert set(split.ids[classes == 1].tolist()) == {3, 4}
    assert cluster_scores(self_annotate(feats, 5).ids, classes)["purity"] < 0.8
    # within a class it is the class's own k-means
    alone = self_annotate(feats[classes == 1], 2, seed=0)
    assert torch.equal(split.ids[classes == 1] - 3, alone.ids)
    with pytest.raises(ValueError, match="one cluster per class"):
        split_by_class(feats, classes, 1)
    with pytest.raises(ValueError, match="one class per feature"):
        split_by_class(feats, classes[:10], 4)


def test_cluster_scores_by_hand():
    labels = torch.tensor([0, 0, 1, 1])
    one = cluster_scores(torch.tensor([0, 0, 0, 0]), labels)
    assert one["nmi"] == pytest.approx(0.0) and one["ari"] == pytest.approx(0.0)
    assert one["purity"] == 0.5
    # clusters {0,1} {2} {3}: I(ids; labels) = 1 bit (log 2), H(labels) = log 2,
    # H(ids) = 1.5 bits: NMI = 2 I / (H + H) = 2 / 2.5 = 0.8
    split = cluster_scores(torch.tensor([0, 0, 1, 2]), labels)
    assert split["nmi"] == pytest.approx(0.8) and split["purity"] == 1.0
    # pairs: 6; same-label pairs 2, same-cluster pairs 1, both 1; expected index 2*1/6 = 1/3,
    # ARI = (1 - 1/3) / ((2 + 1)/2 - 1/3) = (2/3) / (7/6) = 4/7
    assert split["ari"] == pytest.approx(4 / 7)
    with pytest.raises(ValueError, match="one length"):
        cluster_scores(torch.tensor([0, 1]), labels)


def test_majority_class():
    ids = torch.tensor([0, 0, 0, 2, 2])
    labels = torch.tensor([1, 1, 0, 3, 3])
    assert majority_class(ids, labels, k=3).tolist() == [1, -1, 3]
    # cluster 0 holds two of its three images in label 1; cluster 1 is empty; cluster 2 is pure
    assert cluster_purity(ids, labels, k=3).tolist() == pytest.approx([2 / 3, 0.0, 1.0])


def test_class_subset_keeps_each_class_at_its_share():
    classes = torch.arange(20_000) % 2
    kept = class_subset(classes, (1.0, 0.1), seed=0)
    counts = torch.bincount(classes[kept], minlength=2)
    assert counts[0] == 10_000
    assert abs(counts[1].item() / 10_000 - 0.1) < 4 * math.sqrt(0.09 / 10_000)
    assert torch.equal(kept, class_subset(classes, (1.0, 0.1), seed=0))
    with pytest.raises(ValueError, match="2 classes"):
        class_subset(torch.tensor([0, 2]), (1.0, 0.5))


def test_image_classes_of_simple_shapes_are_their_objects_class():
    data = world("simple-shapes", 12, 16)
    classes = image_classes(data, batch_size=5, progress=False)
    sem = data.batch(list(range(12)))["semantic"]
    assert torch.equal(classes, sem.flatten(1).max(1).values - 1)
    assert set(classes.tolist()) <= set(range(5))


def _transforms(image):
    """The 48 views augment_views can make of one image (C, H, W)."""
    import itertools

    out = []
    for order in itertools.permutations(range(image.shape[0])):
        for mirrored in (image[list(order)], image[list(order)].flip(-1)):
            out += [torch.rot90(mirrored, q, (1, 2)) for q in range(4)]
    return out


def test_augment_views_are_recoloured_mirrored_and_turned_images():
    images = torch.rand(64, 3, 6, 6, generator=make_generator(0)) * 2 - 1
    before = images.clone()
    views = augment_views(images, make_generator(1))
    assert views.shape == images.shape and torch.equal(images, before)  # the input is kept
    torch.testing.assert_close(views, augment_views(images, make_generator(1)))
    which = []
    for image, view in zip(images, views):
        hits = [i for i, v in enumerate(_transforms(image)) if torch.equal(v, view)]
        assert len(hits) == 1  # exactly one of the 48 views of its own image
        which.append(hits[0])
    assert len(set(which)) > 20  # the draws vary between images
    assert any(i % 4 for i in which) and any((i // 4) % 2 for i in which)  # turns and mirrors
    with pytest.raises(ValueError, match="square images"):
        augment_views(torch.zeros(2, 3, 4, 6), make_generator(0))


def test_agreement_of_invariant_features_is_one_and_of_pixels_less():
    images = torch.rand(200, 3, 6, 6, generator=make_generator(2))
    images[:100, 0] += 2  # two groups of images, told apart by how bright they are
    views = augment_views(images, make_generator(3))

    def sorted_values(x):  # unchanged by any reordering of an image's values
        return x.flatten(1).sort(1).values

    labels = self_annotate(sorted_values(images), 2)
    assert labels.agreement(sorted_values(images)) == 1.0
    assert labels.agreement(sorted_values(views)) == 1.0
    by_pixels = self_annotate(images.flatten(1), 2)
    assert by_pixels.agreement(images.flatten(1)) == 1.0
    assert by_pixels.agreement(views.flatten(1)) < 0.9  # the bright channel moved
    with pytest.raises(ValueError, match="features of the 200 clustered images"):
        labels.agreement(sorted_values(images[:10]))


def test_silhouette_of_separate_groups_is_high_and_of_random_ids_near_zero():
    gen = make_generator(4)
    truth = torch.arange(300) % 3
    feats = torch.eye(3, 8)[truth] * 5 + 0.3 * torch.randn(300, 8, generator=gen)
    assert silhouette(feats, truth) > 0.8
    shuffled = truth[torch.randperm(300, generator=gen)]
    assert abs(silhouette(feats, shuffled)) < 0.1
    assert silhouette(feats, truth, sample_size=100) == silhouette(feats, truth, sample_size=100)
    with pytest.raises(ValueError, match="two clusters"):
        silhouette(feats, torch.zeros(300, dtype=torch.long))
    with pytest.raises(ValueError, match="one cluster id per feature vector"):
        silhouette(feats, truth[:10])


def test_pooled_features_are_the_decoder_blocks_means(tiny_unet):
    schedule = NoiseSchedule("cosine", 100)
    images = torch.rand(5, 3, 8, 8, generator=make_generator(0)) * 2 - 1
    feats = pooled_features(tiny_unet, schedule, images, t=20, batch_size=2, progress=False)
    assert feats.shape == (5, sum(tiny_unet.decoder.block_channels))
    # one noise for all images: an image's features do not depend on its batch
    alone = pooled_features(tiny_unet, schedule, images[3:4], t=20, progress=False)
    torch.testing.assert_close(alone[0], feats[3], rtol=1e-4, atol=1e-5)
    later = pooled_features(tiny_unet, schedule, images, t=60, progress=False)
    assert not torch.allclose(later, feats)


def test_pooled_features_of_chosen_blocks_are_those_blocks_columns(tiny_unet):
    schedule = NoiseSchedule("cosine", 100)
    images = torch.rand(4, 3, 8, 8, generator=make_generator(1)) * 2 - 1
    widths = list(tiny_unet.decoder.block_channels)
    starts = [sum(widths[:i]) for i in range(len(widths))]
    every = pooled_features(tiny_unet, schedule, images, t=20, progress=False)
    for blocks in ((0,), (len(widths) - 1, 0)):
        picked = pooled_features(tiny_unet, schedule, images, t=20, progress=False,
                                 blocks=blocks)
        expected = torch.cat([every[:, starts[b]:starts[b] + widths[b]] for b in blocks], 1)
        torch.testing.assert_close(picked, expected)
    with pytest.raises(ValueError, match=f"this decoder has {len(widths)} blocks"):
        pooled_features(tiny_unet, schedule, images, t=20, progress=False,
                        blocks=(len(widths),))


def test_layouts_of_a_factorized_model_are_figure_and_ground():
    from fdiff.factorized import FactorizedConfig, FactorizedDenoiser
    from fdiff.unet import UNetConfig

    torch.manual_seed(0)
    model = FactorizedDenoiser(FactorizedConfig(UNetConfig(base_channels=16, channel_mults=(1, 2),
                                                           num_heads=2))).eval()
    images = world("simple-shapes", 6, 16)
    layouts = segment_layouts(model, NoiseSchedule("cosine", 100), images, t=30, batch_size=4,
                              progress=False)
    assert layouts.shape == (6, 2, 16, 16) and layouts.dtype == torch.uint8
    assert torch.equal(layouts[:, 0].int() + layouts[:, 1].int(),
                       torch.full((6, 16, 16), 255, dtype=torch.int32))


def test_conditioned_and_selected_datasets():
    data = world("simple-shapes", 10, 16)
    picked = Selected(data, torch.tensor([7, 2]))
    assert len(picked) == 2
    torch.testing.assert_close(picked.batch([1])["image"][0], data[2]["image"])
    cond = Conditioned(picked, torch.tensor([4, 1]))
    item = cond[0]
    assert item["cond"].item() == 4
    torch.testing.assert_close(item["image"], data[7]["image"])
    lay = Conditioned(data, torch.full((10, 2, 16, 16), 255, dtype=torch.uint8))
    assert lay.batch([0, 1])["cond"].dtype == torch.float32
    assert lay.batch([0])["cond"].max() == 1.0
    with pytest.raises(ValueError, match="one condition per image"):
        Conditioned(data, torch.tensor([1, 2]))
    with pytest.raises(IndexError):
        Selected(data, torch.tensor([10]))


@pytest.mark.usefixtures("skip_md5")
def test_training_labels_of_a_world_and_of_the_real_datasets_stand_ins(tmp_path):
    spec = DataSpec("simple-shapes", 16, 20)
    assert torch.equal(training_labels(spec, progress=False),
                       image_classes(world("simple-shapes", 20, 16), progress=False))
    # Pets: the breed, in the order of trainval.txt (Abyssinian 1, beagle 2, Bengal 3)
    pets = make_pets(tmp_path / "pets")
    assert training_labels(DataSpec("pets", 16, None), root=pets).tolist() == [0, 1, 2]
    # Flowers-102: the species of the train split (images 1, 2), then of val (3, 4)
    flowers = make_flowers(tmp_path / "flowers")
    labels = training_labels(DataSpec("flowers", 16, None), root=flowers)
    assert labels.tolist() == [1, 2, 0, 1]  # imagelabels.mat: i % 3 + 1, one-based
