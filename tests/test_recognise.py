"""Tests of fdiff.recognise: the check that a generated image is one recognisable flat shape."""

from __future__ import annotations

import pytest
import torch

from fdiff.data import ShapesDataset, builtin_dataset
from fdiff.recognise import (
    ShapeClassifier,
    fit_shape_classifier,
    recognise_shapes,
    two_colour_split,
)


def _two_colours(figure: torch.Tensor, fg=(0.8, -0.2, 0.1), bg=(-0.5, 0.3, 0.6)) -> torch.Tensor:
    """(B, H, W) bool -> (B, 3, H, W) image: colour fg on the figure, bg elsewhere."""
    fg_t, bg_t = torch.tensor(fg).view(1, 3, 1, 1), torch.tensor(bg).view(1, 3, 1, 1)
    return torch.where(figure[:, None], fg_t, bg_t)


def test_two_colour_split_finds_the_smaller_flat_region():
    figure = torch.zeros(3, 16, 16, dtype=torch.bool)
    figure[0, 4:8, 4:10] = True  # a small figure
    figure[1, :, :12] = True  # a region larger than half: the other one is the figure
    figure[2, 2:5, 2:5] = True
    found, residual = two_colour_split(_two_colours(figure))
    assert torch.equal(found[0], figure[0])
    assert torch.equal(found[1], ~figure[1])
    assert torch.equal(found[2], figure[2])
    assert residual.max() < 1e-5
    # Noise raises the residual by its standard deviation, and leaves the split alone.
    gen = torch.Generator().manual_seed(0)
    noisy = _two_colours(figure) + 0.05 * torch.randn(3, 3, 16, 16, generator=gen)
    found, residual = two_colour_split(noisy)
    assert torch.equal(found[0], figure[0])
    assert torch.allclose(residual, torch.full((3,), 0.05), atol=0.01)


def test_two_colour_split_of_one_colour_has_no_figure():
    found, residual = two_colour_split(torch.full((2, 3, 8, 8), 0.3))
    assert not found.any() and residual.max() < 1e-6


def test_two_colour_split_refuses_bad_input():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        two_colour_split(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="floating point"):
        two_colour_split(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must be a"):
        ShapeClassifier(5)(torch.zeros(1, 1, 8, 8))


@pytest.fixture(scope="module")
def classifier():
    data = builtin_dataset("simple-shapes", 600, 16)
    return fit_shape_classifier(data, num_images=600, steps=150, batch_size=64)


def test_the_shape_classifier_learns_the_shapes(classifier):
    model, accuracy = classifier
    assert model.num_classes == len(ShapesDataset.CLASS_NAMES) - 1
    assert accuracy > 0.6  # five classes: chance is 0.2
    assert not any(p.requires_grad for p in model.parameters())


def test_fitting_the_classifier_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    fit_shape_classifier(builtin_dataset("simple-shapes", 20, 8), num_images=20, steps=1)
    assert torch.equal(torch.rand(3), expected)


def test_the_classifier_needs_one_object_per_image():
    with pytest.raises(ValueError, match="one object per image"):
        fit_shape_classifier(ShapesDataset(20, 16), num_images=20)
    with pytest.raises(ValueError, match="at least 10"):
        fit_shape_classifier(builtin_dataset("simple-shapes", 20, 16), num_images=5)


def test_data_is_recognised_and_noise_or_two_pieces_are_not(classifier):
    model, _ = classifier
    held_out = builtin_dataset("simple-shapes", 100, 16, split="test").batch(range(100))
    # A classifier this small and quick is rarely sure: ask for a lower confidence.
    report = recognise_shapes(held_out["image"], model, min_confidence=0.5)
    assert report.rate > 0.6
    truth = held_out["semantic"].flatten(1).amax(1) - 1
    assert (report.label == truth)[report.ok].float().mean() > 0.6  # chance: 0.2
    assert report.class_counts(model.num_classes).sum() == report.ok.sum()
    noise = torch.randn(20, 3, 16, 16, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    assert recognise_shapes(noise, model).rate == 0
    # A flat image with two separate squares fails the one-piece check whatever the classifier.
    figure = torch.zeros(1, 16, 16, dtype=torch.bool)
    figure[0, 2:6, 2:6] = True
    figure[0, 10:14, 10:14] = True
    two = recognise_shapes(_two_colours(figure), model)
    assert two.piece.item() == pytest.approx(0.5) and not two.ok.item()
    flat = recognise_shapes(torch.zeros(1, 3, 16, 16), model)  # nothing to recognise
    assert flat.area.item() == 0 and not flat.ok.item()
