import pytest
import torch

from fdiff.probing import PixelMLP, ProbeConfig, ProbeEnsemble, predict_images, vote


def _separable(n=600, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    X = torch.randn(n, d, generator=g) * 0.3
    X[:, 0] += 4 * y  # classes far apart along the first feature
    return X, y


def test_pixel_mlp_is_the_papers_layout():
    net = PixelMLP(10, 4)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear"]
    assert net(torch.randn(5, 10)).shape == (5, 4)


def test_probe_reaches_100_percent_on_separable_features():
    X, y = _separable()
    ens = ProbeEnsemble(5, 3, ProbeConfig(ensemble_size=3, max_epochs=40, batch_size=64))
    ens.fit(X, y)
    Xt, yt = _separable(seed=1)
    labels, unc = ens.predict(Xt)
    assert (labels == yt).all()
    assert (unc == 0).all()
    assert len(ens.members) == 3 and all(1 <= e <= 40 for e in ens.epochs)


def test_early_stopping_stops_on_unlearnable_labels():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(500, 4, generator=g), torch.randint(0, 2, (500,), generator=g)
    ens = ProbeEnsemble(4, 2, ProbeConfig(ensemble_size=1, max_epochs=50, patience=2)).fit(X, y)
    assert ens.epochs[0] < 50


def test_vote_majority_and_disagreement_by_hand():
    # 3 members, 3 pixels, 2 classes: votes (0,0,0), (1,1,0), (1,0,1)
    logits = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
        [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
        [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
    ])
    labels, unc = vote(logits)
    assert labels.tolist() == [0, 1, 1]
    torch.testing.assert_close(unc, torch.tensor([0.0, 1 / 3, 1 / 3]))
    # a tie between two members goes to the smaller class
    labels, unc = vote(torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]]))
    assert labels.tolist() == [0] and unc.tolist() == [0.5]


def test_predict_images_streams_feature_maps():
    X, y = _separable(d=2)
    ens = ProbeEnsemble(2, 3, ProbeConfig(ensemble_size=2, max_epochs=30, batch_size=64)).fit(X, y)
    images = torch.zeros(3, 1, 4, 4)
    images[1] += 1
    images[2] += 2

    def feats(x):  # feature 0 = 4 * class, feature 1 = 0
        return torch.cat([4 * x, torch.zeros_like(x)], dim=1)

    labels, unc = predict_images(feats, ens, images, batch_size=2)
    assert labels.shape == (3, 4, 4) and unc.shape == (3, 4, 4)
    assert [int(labels[i].unique()) for i in range(3)] == [0, 1, 2]


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_classes"):
        ProbeEnsemble(3, 1)
    ens = ProbeEnsemble(3, 2)
    with pytest.raises(ValueError, match=r"X \(N, 3\)"):
        ens.fit(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        ens.fit(torch.zeros(4, 3), torch.full((4,), 2))
    with pytest.raises(RuntimeError, match="fit"):
        ens.predict(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="val_fraction"):
        ProbeConfig(val_fraction=1.0)


def test_fitting_leaves_the_callers_generator_alone():
    X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    y = (X[:, 0] > 0).long()
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    first = ProbeEnsemble(4, 2, ProbeConfig(ensemble_size=2, max_epochs=2)).fit(X, y)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    # ...and the members still start from their own seeds.
    torch.manual_seed(4)
    second = ProbeEnsemble(4, 2, ProbeConfig(ensemble_size=2, max_epochs=2)).fit(X, y)
    for a, b in zip(first.members, second.members):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
