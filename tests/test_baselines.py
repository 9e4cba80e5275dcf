import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from fdiff.baselines import colour_kmeans, feature_kmeans, grabcut, kmeans


def _blobs(seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 6.0]])
    truth = torch.arange(3).repeat_interleave(40)
    return centres[truth] + 0.3 * torch.randn(120, 2, generator=g), truth


def test_kmeans_recovers_separated_clusters():
    x, truth = _blobs()
    labels = kmeans(x, 3)
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) == 1.0


def test_kmeans_matches_sklearn_inertia():
    from sklearn.cluster import KMeans

    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(1))
    labels = kmeans(x, 4, restarts=5)
    ours = sum(float(((x[labels == j] - x[labels == j].mean(0)) ** 2).sum()) for j in range(4))
    ref = KMeans(n_clusters=4, n_init=5, random_state=0).fit(x.numpy()).inertia_
    assert ours <= ref * 1.05


def test_kmeans_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        kmeans(torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        kmeans(torch.zeros(3), 2)


def _square_scene():
    img = torch.full((1, 3, 16, 16), -0.8)
    img[:, 0, 5:11, 5:11] = 0.9  # a red square on a dark background
    truth = torch.zeros(1, 16, 16, dtype=torch.long)
    truth[:, 5:11, 5:11] = 1
    return img, truth


def test_colour_kmeans_and_grabcut_find_a_plain_square():
    img, truth = _square_scene()
    for labels in (colour_kmeans(img, 2), grabcut(img, margin=2)):
        assert labels.shape == (1, 16, 16)
        assert adjusted_rand_score(truth.flatten().numpy(), labels.flatten().numpy()) == 1.0
    with pytest.raises(ValueError, match="margin"):
        grabcut(img, margin=8)


def test_feature_kmeans_upsamples_labels():
    feats = torch.zeros(1, 4, 4, 4)
    feats[:, 0] = 1
    feats[:, 1, :2] = 5  # top half points elsewhere
    labels = feature_kmeans(feats, 2, size=16)
    assert labels.shape == (1, 16, 16)
    assert (labels[0, :8] == labels[0, 0, 0]).all() and (labels[0, 8:] != labels[0, 0, 0]).all()
