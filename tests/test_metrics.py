import math

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from fdiff.metrics import (
    adjusted_rand_index,
    decidedness,
    fg_ari,
    foreground_scores,
    hungarian_miou,
    mask_stats,
    miou,
)


def _labels(seed, k, shape=(3, 8, 8)):
    return torch.randint(0, k, shape, generator=torch.Generator().manual_seed(seed))


def test_foreground_scores_by_hand():
    fg = torch.tensor([[[1, 1, 0, 0]]])
    pred = torch.tensor([[[0, 1, 1, 1]]])  # region 1 covers fg pixel 2 and two bg pixels
    s = foreground_scores(pred, fg)
    # region 0: IoU 1/2; region 1: IoU 1/4 -> region 0 is foreground
    assert s["region"] == 0
    assert math.isclose(s["iou"], 0.5)
    assert math.isclose(s["accuracy"], 3 / 4)
    assert math.isclose(s["dice"], 2 / 3)


def test_perfect_and_permuted_predictions():
    fg = _labels(0, 2)
    for pred in (fg, 1 - fg):  # region ids carry no meaning
        s = foreground_scores(pred, fg)
        assert s["iou"] == 1.0 and s["accuracy"] == 1.0 and s["dice"] == 1.0
    assert foreground_scores(fg, fg, per_image=True)["iou"] == 1.0


def test_ignored_pixels_do_not_count():
    fg = torch.tensor([[[1, 0, -1, -1]]])
    pred = torch.tensor([[[1, 0, 0, 1]]])
    assert foreground_scores(pred, fg)["iou"] == 1.0


def test_hungarian_miou_is_permutation_invariant_and_exact():
    target = _labels(1, 4)
    perm = torch.tensor([2, 0, 3, 1])
    assert hungarian_miou(perm[target], target) == pytest.approx(1.0)
    pred = _labels(2, 4)
    assert hungarian_miou(perm[pred], target) == pytest.approx(hungarian_miou(pred, target))
    # Fewer regions than classes: the unmatched class scores 0.
    merged = target.clamp(max=2)
    n2, n3 = int((target == 2).sum()), int((target == 3).sum())
    expected = (1 + 1 + max(n2, n3) / (n2 + n3) + 0) / 4
    assert hungarian_miou(merged, target) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_ari_matches_scikit_learn(seed):
    a, b = _labels(seed, 3, (200,)), _labels(seed + 10, 4, (200,))
    assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a.numpy(), b.numpy()))
    assert adjusted_rand_index(a, (a + 1) % 3) == pytest.approx(1.0)


def test_fg_ari_ignores_background():
    inst = torch.tensor([[[0, 0, 1, 1, 2, 2]]])
    pred = torch.tensor([[[5, 3, 0, 0, 1, 1]]])  # background labels differ: must not matter
    assert fg_ari(pred, inst) == pytest.approx(1.0)
    assert fg_ari(pred.clamp(max=0), inst) == pytest.approx(0.0)


def test_mask_stats_detects_collapse_and_uniform_masks():
    uniform = torch.full((2, 3, 4, 4), 1 / 3)
    s = mask_stats(uniform)
    assert s["entropy_ratio"] == pytest.approx(1.0)
    collapsed = torch.zeros(2, 3, 4, 4)
    collapsed[:, 0] = 1
    c = mask_stats(collapsed)
    assert c["largest_area"] == 1.0 and c["entropy"] == pytest.approx(0.0, abs=1e-6)
    half = torch.zeros(2, 2, 4, 4)
    half[:, 0, :, :2] = 1
    half[:, 1, :, 2:] = 1
    assert mask_stats(half)["areas"] == [0.5, 0.5]


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        foreground_scores(
            torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long)
        )
    with pytest.raises(TypeError, match="argmax"):
        hungarian_miou(torch.rand(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        mask_stats(torch.rand(4, 4, 4))
    # Labels outside the stated number of classes would be counted as another class.
    zeros = torch.zeros(1, 1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"target labels must lie in \[-1, 2\)"):
        miou(zeros, torch.tensor([[[0, 0, 2, 2]]]), 2)
    with pytest.raises(ValueError, match=r"pred labels must lie in \[0, 2\)"):
        miou(torch.tensor([[[0, 1, 2, 0]]]), zeros, 2)
    with pytest.raises(ValueError, match="target labels"):
        hungarian_miou(torch.tensor([[[0, 1, 2, 0]]]), torch.tensor([[[0, 1, 2, 0]]]), 2)


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    from fdiff.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g)
    b = torch.randn(20000, 3, generator=g) * 2 + torch.tensor([1.0, 0.0, 0.0])
    # N(0, I) vs N(m, 4I): |m|^2 + 3 * (1 + 4 - 2 * 2) = 1 + 3
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(a, b[:, :2])
    # one feature: N(0, 1) vs N(1, 4) gives 1 + (1 + 4 - 2 * 2) = 2
    assert frechet_distance(a[:, :1], b[:, :1]) == pytest.approx(2.0, rel=0.05)


def test_miou_by_hand():
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, -1, -1]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 2, 0, 0]]])
    mean, per = miou(pred, target, num_classes=4)
    # class 0: inter 1, union 2; class 1: inter 2, union 3; class 2: 2/2; class 3 absent
    assert per[:3] == pytest.approx([0.5, 2 / 3, 1.0]) and math.isnan(per[3])
    assert mean == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)


def test_merge_regions_by_hand():
    from fdiff.metrics import merge_regions

    # four regions; the truth's foreground is the right half. Region 1 is mostly foreground,
    # region 2 half and half (stays background), region 3 all foreground.
    pred = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 3], [0, 0, 1, 3]]])
    fg = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]])
    expected = torch.tensor([[[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]]])
    assert torch.equal(merge_regions(pred, fg), expected)
    # a second image with other ids is merged on its own
    two = merge_regions(torch.stack([pred[0], 3 - pred[0]]), torch.cat([fg, fg]))
    assert torch.equal(two, torch.cat([expected, expected]))
    # two regions that are exactly foreground and background merge to the truth
    assert torch.equal(merge_regions(1 - fg, fg), fg)


def test_merge_regions_has_the_best_accuracy_of_any_reading():
    import itertools

    from fdiff.metrics import merge_regions

    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (4, 6, 6), generator=g)
    fg = torch.randint(0, 2, (4, 6, 6), generator=g)
    merged = merge_regions(pred, fg)
    for i in range(4):
        best = (merged[i] == fg[i]).float().mean()
        for reading in itertools.product([0, 1], repeat=3):  # every region -> class assignment
            other = torch.tensor(reading)[pred[i]]
            assert (other == fg[i]).float().mean() <= best + 1e-9


def test_near_edges_by_hand():
    from fdiff.metrics import near_edges

    labels = torch.zeros(1, 7, 7, dtype=torch.long)
    labels[0, 3, 3] = 1  # one pixel: it and its 8 neighbours are next to a change
    inner = near_edges(labels, border=False)
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[2:5, 2:5] = True
    assert torch.equal(inner[0], expected)
    with_border = near_edges(labels)
    assert with_border[0, 0].all() and with_border[0, :, -1].all()
    assert with_border[0].sum() == 9 + 24  # the 3x3 block and the 24 border pixels
    assert not near_edges(torch.zeros(2, 5, 5, dtype=torch.long), border=False).any()
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        near_edges(torch.zeros(5, 5))


def test_image_frame_by_hand():
    from fdiff.metrics import image_frame

    frame = image_frame(4, 5)
    assert frame.shape == (4, 5) and frame.dtype == torch.bool
    assert frame.sum() == 4 * 5 - 2 * 3  # all but the 2x3 inside
    assert not frame[1:3, 1:4].any() and frame[0].all() and frame[:, -1].all()
    assert image_frame(6, thickness=2).sum() == 36 - 4
    with pytest.raises(ValueError, match="thickness"):
        image_frame(4, thickness=2)


def test_decidedness_by_hand():
    from fdiff.metrics import decidedness

    masks = torch.tensor([[0.5, 1.0, 0.75], [0.5, 0.0, 0.25]]).view(1, 2, 1, 3)
    torch.testing.assert_close(decidedness(masks)[0, 0], torch.tensor([0.0, 1.0, 0.5]))
    uniform3 = torch.full((1, 3, 2, 2), 1 / 3)
    torch.testing.assert_close(decidedness(uniform3), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="K >= 2"):
        decidedness(torch.ones(1, 1, 2, 2))


def test_images_without_foreground_are_left_out_and_a_set_without_any_is_refused():
    fg = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[-1, -1, -1, -1]]])
    pred = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[0, 1, 0, 1]]])
    # Only the first image has a foreground, and it is found exactly.
    assert foreground_scores(pred, fg, per_image=True) == {"accuracy": 1.0, "iou": 1.0, "dice": 1.0}
    with pytest.raises(ValueError, match="no foreground pixel"):
        foreground_scores(pred[1:], fg[1:])
    with pytest.raises(ValueError, match="no foreground pixel"):
        foreground_scores(pred[1:], fg[1:], per_image=True)


def test_mask_measures_read_uint8_masks_as_probabilities():
    soft = torch.softmax(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), 1)
    stored = (soft * 255).round().to(torch.uint8)  # as training snapshots keep them
    torch.testing.assert_close(decidedness(stored), decidedness(stored.float() / 255))
    assert mask_stats(stored)["entropy"] == pytest.approx(mask_stats(soft)["entropy"], abs=0.02)
    logits = torch.randn(2, 3, 4, 4) * 5
    for measure in (mask_stats, decidedness):
        with pytest.raises(ValueError, match="not logits"):
            measure(logits)
        with pytest.raises(TypeError, match="uint8"):
            measure(stored.long())


def test_border_foreground_takes_the_region_that_holds_less_of_the_frame():
    from fdiff.metrics import border_foreground, image_frame

    pred = torch.zeros(3, 6, 6, dtype=torch.int64)
    pred[0, 2:4, 2:4] = 1  # region 1 is inside: it is the foreground
    pred[1] = 1
    pred[1, 1:5, 1:5] = 0  # region 0 is inside now, region 1 the frame
    pred[2, :, :3] = 1  # both touch the frame equally: the smaller region wins
    pred[2, :, 5] = 0
    pred[2, 0, 3:5] = 0
    out = border_foreground(pred)
    assert torch.equal(out[0], (pred[0] == 1).long())
    assert torch.equal(out[1], (pred[1] == 0).long())
    on_frame = [(pred[2][image_frame(6)] == j).float().mean() for j in (0, 1)]
    area = [(pred[2] == j).float().mean() for j in (0, 1)]
    smaller = int(torch.tensor(area).argmin())
    assert on_frame[0] == on_frame[1] and torch.equal(out[2], (pred[2] == smaller).long())
    # A partition of one region found no figure: its image is all background, whatever the label.
    one = torch.full((2, 6, 6), 1, dtype=torch.int64)
    one[1] = 0
    assert border_foreground(one).sum() == 0
    with pytest.raises(ValueError, match="integer label map"):
        border_foreground(pred.float())


def test_edge_strength_marks_the_pixels_before_a_step():
    from fdiff.metrics import edge_strength

    img = torch.zeros(1, 3, 4, 4)
    img[:, 1, :, 2:] = 1.0  # a vertical step between columns 1 and 2, in one channel only
    e = edge_strength(img)
    assert e.shape == (1, 4, 4)
    assert e[0, :, 1].tolist() == [1.0] * 4
    assert e[0, :, [0, 2, 3]].abs().sum() == 0


def test_pixel_correlation_is_pearson_per_image_averaged():
    from fdiff.metrics import pixel_correlation

    a = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]])
    b = torch.tensor([[[0.0, 2.0], [4.0, 6.0]], [[0.0, 1.0], [2.0, 3.0]]])
    # image 0: b = 2a, r = 1; image 1: a is constant, counted as 0
    assert pixel_correlation(a, b) == pytest.approx(0.5)
    assert pixel_correlation(a[:1], -b[:1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="one shape"):
        pixel_correlation(a, b[:, :1])


def test_foreground_scores_can_score_a_region_chosen_elsewhere():
    from fdiff.metrics import foreground_scores

    fg = torch.tensor([[[0, 1], [1, 1]]])
    pred = torch.tensor([[[0, 1], [1, 0]]])  # region 1 is the better match: IoU 2/3
    assert foreground_scores(pred, fg)["region"] == 1
    forced = foreground_scores(pred, fg, region=0)  # region 0: 1 of 4 pixels, IoU 1/4
    assert forced["region"] == 0 and forced["iou"] == pytest.approx(0.25)
    assert foreground_scores(pred, fg, region=3)["iou"] == 0.0  # a region absent from pred
    with pytest.raises(ValueError, match="region must be"):
        foreground_scores(pred, fg, per_image=True, region=1)
