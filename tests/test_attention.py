"""Attention capture, AttentionCut's score and graph cut, and the saliency and CorLoc metrics."""

import itertools

import numpy as np
import pytest
import torch

from fdiff import NoiseSchedule, UNet, UNetConfig
from fdiff.attention import attend, attention_maps, attention_modules, capture_attention
from fdiff.attention_cut import CutConfig, attention_cut, cut_energy, foreground_score, graph_cut
from fdiff.metrics import box_iou, corloc, largest_component_box, saliency_scores


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_heads=2)).eval()


def test_the_captured_maps_reproduce_every_attention_modules_output(unet):
    modules = attention_modules(unet)
    assert len(modules) >= 2  # encoder, middle and decoder at the lowest resolution
    inputs, outputs = {}, {}

    def keep(mod, args, out, name):
        inputs[name], outputs[name] = args[0], out

    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: keep(mod, a, out, n))
             for n, m in modules.items()]
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    with torch.no_grad():
        plain = unet(x, t)
        with capture_attention(modules) as maps:
            hooked = unet(x, t)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(hooked, plain)  # capturing changes nothing
    for name, probs in maps.items():
        n = inputs[name].shape[-1] * inputs[name].shape[-2]
        assert probs.shape == (2, 2, n, n)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, n))
        torch.testing.assert_close(attend(modules[name], inputs[name], probs), outputs[name],
                                   rtol=1e-4, atol=1e-5)
    assert all(not m._forward_hooks for m in modules.values())  # the hooks came off


def test_hooks_come_off_after_an_error(unet):
    modules = attention_modules(unet)
    with pytest.raises(RuntimeError), capture_attention(modules):
        raise RuntimeError("in the middle of a forward pass")
    assert all(not m._forward_hooks for m in modules.values())


def test_attention_maps_average_heads_and_check_layer_names(unet):
    schedule = NoiseSchedule("cosine", 100)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    maps = attention_maps(unet, schedule, images, t=10)
    assert set(maps) == set(attention_modules(unet))
    a = next(iter(maps.values()))
    assert a.shape == (3, 64, 64) and torch.allclose(a.sum(-1), torch.ones(3, 64))  # 8 x 8 tokens
    torch.testing.assert_close(attention_maps(unet, schedule, images, t=10)[next(iter(maps))], a)
    with pytest.raises(ValueError, match="no attention layer"):
        attention_maps(unet, schedule, images, t=10, layers=["nowhere"])


def _two_blocks(side=4):
    """Attention over a side x side grid: the centre 2x2 tokens attend only to each other, the
    ring tokens only to the ring."""
    n = side * side
    inner = torch.zeros(side, side, dtype=torch.bool)
    inner[1:-1, 1:-1] = True
    inner = inner.flatten()
    attn = torch.zeros(n, n)
    attn[inner[:, None] & inner[None]] = 1
    attn[~inner[:, None] & ~inner[None]] = 1
    return (attn / attn.sum(-1, keepdim=True))[None], inner.view(side, side)


def test_the_border_prior_scores_tokens_that_share_no_attention_with_the_border():
    attn, inner = _two_blocks()
    images = torch.zeros(1, 3, 4, 4)
    score = foreground_score(attn, images, "border")
    assert score.shape == (1, 4, 4)
    assert torch.equal(score[0] > 0.5, inner)
    centre = foreground_score(attn, images, "centre")
    assert centre[0][inner].min() > centre[0][~inner].max()


def test_the_colour_prior_needs_no_attention():
    images = -torch.ones(1, 3, 8, 8)
    images[:, :, 3:5, 3:5] = 1
    score = foreground_score(None, images, "colour")
    assert torch.equal(score[0] == 1, images[0, 0] == 1) and score.min() == 0
    with pytest.raises(ValueError, match="prior"):
        foreground_score(None, images, "left")
    with pytest.raises(ValueError, match="attention maps"):
        foreground_score(None, images, "border")


def test_the_cut_is_the_exact_minimum_of_its_energy():
    g = np.random.default_rng(0)
    for trial in range(4):
        score = torch.from_numpy(g.uniform(0.05, 0.95, (3, 3)))
        image = torch.from_numpy(g.uniform(-1, 1, (3, 3, 3)))
        weight = [0.0, 0.5, 2.0, 5.0][trial]
        mask = graph_cut(score, image, weight)
        best = min(cut_energy(np.array(m).reshape(3, 3), score.numpy(), image.numpy(), weight)
                   for m in itertools.product([0, 1], repeat=9))
        assert cut_energy(mask.numpy(), score.numpy(), image.numpy(), weight) == \
            pytest.approx(best)


def test_without_pairwise_terms_the_cut_thresholds_and_with_them_it_smooths():
    score = torch.full((5, 5), 0.2)
    score[1:4, 1:4] = 0.8
    score[2, 2] = 0.4  # a doubtful pixel inside a confident figure
    image = torch.zeros(3, 5, 5)  # no contrast: every neighbour pair weighs the same
    assert torch.equal(graph_cut(score, image, 0.0), score > 0.5)
    smooth = graph_cut(score, image, 0.5)  # at 1.0 the 12 boundary edges outweigh the figure
    assert bool(smooth[2, 2]) and int(smooth.sum()) == 9


def test_attention_cut_runs_end_to_end(unet):
    schedule = NoiseSchedule("cosine", 100)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    masks, scores = attention_cut(unet, schedule, images, CutConfig(t=10, weight=0.5))
    assert masks.shape == scores.shape == (2, 16, 16) and masks.dtype == torch.bool
    with pytest.raises(ValueError, match="prior"):
        CutConfig(prior="left")


def test_saliency_scores_by_hand():
    gt = torch.zeros(1, 2, 4, dtype=torch.long)
    gt[0, 0, :2] = 1  # two foreground pixels of eight
    pred = torch.zeros(1, 2, 4, dtype=torch.bool)
    pred[0, 0, 1:3] = True  # one right, one wrong
    s = saliency_scores(pred, gt)
    assert s["iou"] == pytest.approx(1 / 3)
    assert s["accuracy"] == pytest.approx(6 / 8)
    assert s["mae"] == pytest.approx(2 / 8)
    # precision 1/2, recall 1/2: F = 1.3 * 0.25 / (0.3 * 0.5 + 0.5) = 0.5
    assert s["max_fbeta"] == pytest.approx(0.5)
    soft = torch.tensor([[[0.9, 0.6, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    s = saliency_scores(soft, gt)
    assert s["max_fbeta"] == pytest.approx(1.0)  # thresholds between 0.2 and 0.6 are exact
    assert s["mae"] == pytest.approx((0.1 + 0.4 + 0.2) / 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        saliency_scores(soft * 2, gt)


def test_corloc_by_hand():
    inst = torch.zeros(2, 8, 8, dtype=torch.long)
    inst[:, 1:4, 1:4] = 1
    inst[:, 5:8, 5:8] = 2
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 5:8, 5:8] = True  # the second object exactly
    masks[0, 0, 0] = True  # a stray pixel: not the largest component
    masks[1, 1:8, 1:8] = True  # one box over both: IoU 9/49 with each
    assert largest_component_box(masks[0]) == (5, 5, 7, 7)
    assert box_iou((1, 1, 3, 3), (1, 1, 7, 7)) == pytest.approx(9 / 49)
    assert corloc(masks, inst) == pytest.approx(0.5)
    assert largest_component_box(torch.zeros(4, 4)) is None
