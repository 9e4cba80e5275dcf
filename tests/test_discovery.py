"""DiffusionSeg's two stages on a tiny model: synthetic pairs and features along DDIM inversion."""

import pytest
import torch

from fdiff import NoiseSchedule, UNet, UNetConfig
from fdiff.attention_cut import CutConfig
from fdiff.discovery import InversionFeatures, Pairs, load_pairs, save_pairs, synthesize
from fdiff.features import decoder_blocks
from fdiff.samplers import ddim_invert


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_heads=2)).eval()
    return model, NoiseSchedule("cosine", 100)


def test_inversion_features_read_the_inverted_images(tiny):
    model, schedule = tiny
    blocks = list(range(len(decoder_blocks(model))))
    fx = InversionFeatures(model, schedule, blocks, [0, 20], (3, 16, 16), num_steps=10)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    feats = fx(x)
    assert feats.shape == (2, fx.dim, 16, 16)
    # At t = 20 the features are the model's on the image inverted to step 20.
    inverted = [s.xt for s in ddim_invert(model, schedule, x, 10, t_end=20)][-1]
    one = InversionFeatures(model, schedule, blocks, [20], (3, 16, 16), num_steps=10)
    from fdiff.features import capture
    with torch.no_grad(), capture(one.modules) as store:
        model(inverted, torch.full((2,), 20))
    last = store[f"block{blocks[-1]}"]
    torch.testing.assert_close(one(x)[:, -last.shape[1]:], last)
    with pytest.raises(ValueError, match="DDIM grid"):
        InversionFeatures(model, schedule, blocks, [15], (3, 16, 16), num_steps=10)


def test_synthesis_keeps_masks_that_are_neither_empty_nor_full(tiny, tmp_path):
    model, schedule = tiny
    out = synthesize(model, schedule, 6, (3, 16, 16), CutConfig(t=10, weight=0.5),
                     num_steps=5, batch_size=4, min_area=0.0, max_area=1.0, progress=False)
    assert len(out["image"]) == 6 and out["kept"].all()
    strict = synthesize(model, schedule, 6, (3, 16, 16), CutConfig(t=10, weight=0.5),
                        num_steps=5, batch_size=4, min_area=0.3, max_area=0.6, progress=False)
    torch.testing.assert_close(strict["area"], out["area"])  # the same samples, seed by seed
    keep = (out["area"] >= 0.3) & (out["area"] <= 0.6)
    assert torch.equal(strict["kept"], keep) and len(strict["image"]) == int(keep.sum())
    path = save_pairs(tmp_path / "pairs.safetensors", out, t=10)
    back, meta = load_pairs(path)
    assert meta["t"] == 10 and torch.equal(back["mask"], out["mask"])
    torch.testing.assert_close(back["image"], out["image"], atol=1e-3, rtol=1e-3)
    pairs = Pairs(back["image"], back["mask"])
    assert len(pairs) == 6 and set(pairs[0]) == {"image", "mask"}
    with pytest.raises(ValueError, match="masks"):
        Pairs(back["image"], back["mask"][:, :4])
