"""Tests of fdiff.recognise: the check that a generated image is one recognisable flat shape."""

from __future__ import annotations

import pytest
import torch

from fdiff.recognise import fit_shapes, recognise_shapes, two_colour_split
from fdiff.worlds import world


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


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        two_colour_split(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="must be float images in"):
        two_colour_split(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        fit_shapes(torch.zeros(1, 8, 8))


@pytest.fixture(scope="module")
def held_out():
    return world("simple-shapes", 30, 32, split="test").batch(range(30))


def test_the_data_s_own_shapes_fit_and_are_named(held_out):
    fit, label = fit_shapes(held_out["mask"].bool())
    truth = held_out["semantic"].flatten(1).amax(1)
    assert fit.min() > 0.85 and fit.median() > 0.93
    assert (label == truth).float().mean() > 0.9


def test_a_blob_fits_worse_than_a_drawn_disk():
    yy, xx = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    angle = torch.atan2(yy - 16, xx - 16)
    radius = ((yy - 16) ** 2 + (xx - 16) ** 2).sqrt()
    disk = radius < 7
    blob = radius < 7 * (1 + 0.3 * torch.sin(angle) + 0.25 * torch.sin(2 * angle + 1))
    fit, label = fit_shapes(torch.stack([disk, blob]))
    assert fit[0] > 0.95 and label[0] == 1  # disk
    assert fit[1] < 0.85
    empty_fit, empty_label = fit_shapes(torch.zeros(1, 8, 8, dtype=torch.bool))
    assert empty_fit.item() == 0 and empty_label.item() == 0


def test_data_is_recognised_and_noise_or_two_pieces_are_not(held_out):
    report = recognise_shapes(held_out["image"])
    assert report.rate > 0.85
    truth = held_out["semantic"].flatten(1).amax(1)
    assert (report.label == truth)[report.ok].float().mean() > 0.9
    counts = report.class_counts()
    assert counts.sum() == report.ok.sum() and counts[0] == 0
    # Every shape class of the data is recognised somewhere.
    assert (truth.unique() > 0).all() and (counts[1:] > 0).all()
    noise = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    assert recognise_shapes(noise).rate == 0
    # A flat image with two separate squares fails the one-piece check.
    figure = torch.zeros(1, 16, 16, dtype=torch.bool)
    figure[0, 2:6, 2:6] = True
    figure[0, 10:14, 10:14] = True
    two = recognise_shapes(_two_colours(figure))
    assert two.piece.item() == pytest.approx(0.5) and not two.ok.item()
    flat = recognise_shapes(torch.zeros(1, 3, 16, 16))  # nothing to recognise
    assert flat.area.item() == 0 and not flat.ok.item()


def test_the_residual_is_measured_against_the_final_clusters():
    # A middle grey between black and white: the first cut puts it with one side, and the
    # residual must use that side's mean after the move, not the mean before it.
    image = torch.full((1, 3, 1, 5), -1.0)
    image[..., 3:] = 1.0
    image[..., 2] = 0.1
    for iterations in (0, 1, 10):
        figure, residual = two_colour_split(image, iterations=iterations)
        pixels = image[0].flatten(1).T
        chosen = torch.stack([pixels[figure.view(-1)].mean(0) if f else
                              pixels[~figure.view(-1)].mean(0) for f in figure.view(-1)])
        expected = ((pixels - chosen) ** 2).mean().sqrt()
        assert residual.item() == pytest.approx(expected.item(), abs=1e-6)
    with pytest.raises(ValueError, match="iterations must be an int >= 0"):
        two_colour_split(image, iterations=-1)
