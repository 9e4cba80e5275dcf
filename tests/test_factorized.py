import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fdiff.checkpoints import load_model, save_model
from fdiff.factorized import (
    FactorizedConfig,
    FactorizedDenoiser,
    UnsharedDenoiser,
    factorized_denoiser,
    masks_over_t,
    snapshot_timesteps,
)
from fdiff.schedules import NoiseSchedule
from fdiff.seeding import make_generator
from fdiff.segmentation import generate_with_masks, segment, segment_dataset
from fdiff.train import denoising_loss
from fdiff.unet import UNetConfig, count_parameters

UCFG = UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2)


def _model(k=2, seed=0, **kw):
    torch.manual_seed(seed)
    return factorized_denoiser(FactorizedConfig(UCFG, num_regions=k, **kw))


def _xt(b=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.randint(0, 100, (b,), generator=g)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_masks_are_a_partition_of_unity(k):
    eps, masks = _model(k)(*_xt(), return_masks=True)
    assert eps.shape == (2, 3, 8, 8) and masks.shape == (2, k, 8, 8)
    assert (masks >= 0).all()
    torch.testing.assert_close(masks.sum(1), torch.ones(2, 8, 8))


def test_output_is_the_mask_weighted_sum_of_region_predictions():
    model = _model(3)
    xt, t = _xt()
    emb = model.time_embed(t)
    skips = model.encoder(xt, emb)
    h = model.middle(skips[-1], emb)
    masks = model.mask_generator(h, skips, emb).softmax(1)
    # Region k by hand: the shared decoder on skips multiplied by mask k, unmasked h_mid.
    by_hand = []
    for k in range(3):
        m = masks[:, k : k + 1]
        masked = [s * torch.nn.functional.adaptive_avg_pool2d(m, s.shape[-2:]) for s in skips]
        by_hand.append(model.decoder(h, masked, emb))
    expected = sum(masks[:, k : k + 1] * by_hand[k] for k in range(3))
    torch.testing.assert_close(model(xt, t), expected, atol=1e-5, rtol=1e-5)


def test_parameter_count_does_not_grow_with_k():
    def without_mask_head(m):
        return count_parameters(m) - count_parameters(m.mask_generator.conv_out)

    counts = {k: without_mask_head(_model(k)) for k in (2, 3, 4)}
    assert len(set(counts.values())) == 1, counts
    unshared = _model(3, shared_decoder=False)
    # K decoders instead of one: K - 1 more than the shared model.
    assert len(unshared.decoders) == 3
    decoder = count_parameters(unshared.decoders[1])
    assert without_mask_head(unshared) == counts[3] + 2 * decoder


def test_gradients_reach_the_mask_generator_and_every_parameter():
    model = _model(2)
    xt, t = _xt()
    model(xt, t).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert model.mask_generator.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["concat", "mask_mid"])
def test_ablation_variants_run_and_keep_the_contract(mode):
    eps, masks = _model(2, mode=mode)(*_xt(), return_masks=True)
    assert eps.shape == (2, 3, 8, 8)
    torch.testing.assert_close(masks.sum(1), torch.ones(2, 8, 8))


def test_unshared_decoders_match_a_per_region_loop():
    model = _model(2, shared_decoder=False).eval()
    xt, t = _xt()
    eps, masks = model(xt, t, return_masks=True)
    assert len(model.decoders) == 2
    # Region k is decoded by decoder k alone, from the skips multiplied by mask k.
    emb = model.time_embed(t)
    skips = model.encoder(xt, emb)
    h = model.middle(skips[-1], emb)
    expected = 0
    for k, decoder in enumerate(model.decoders):
        m = masks[:, k : k + 1]
        masked = [s * F.avg_pool2d(m, m.shape[-1] // s.shape[-1]) for s in skips]
        expected = expected + m * decoder(h, masked, emb)
    torch.testing.assert_close(eps, expected, atol=1e-5, rtol=1e-4)


def test_mask_noise_randomises_training_masks_only_and_draws_from_the_generator():
    noisy, plain = _model(2, mask_noise=1.0), _model(2)
    xt, t = _xt(b=4)
    state = torch.get_rng_state()
    _, m1 = noisy(xt, t, return_masks=True, generator=torch.Generator().manual_seed(0))
    _, m2 = noisy(xt, t, return_masks=True, generator=torch.Generator().manual_seed(1))
    _, m1_again = noisy(xt, t, return_masks=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn from the global generator
    assert not torch.equal(m1, m2) and torch.equal(m1, m1_again)
    torch.testing.assert_close(m1.sum(1), torch.ones(4, 8, 8))
    # Untrained logits are small, so the noise decides: many pixels are nearly one-hot.
    _, m_plain = plain(xt, t, return_masks=True)
    decided = [(m.max(1).values > 0.8).float().mean() for m in (m1, m_plain)]
    assert decided[0] > 0.3 > decided[1]
    with pytest.raises(ValueError, match="pass generator="):
        noisy(xt, t)
    noisy.eval()
    plain.eval()
    torch.testing.assert_close(noisy(xt, t, return_masks=True)[1],
                               plain(xt, t, return_masks=True)[1], rtol=0, atol=0)


def test_each_variant_has_its_class_and_a_class_builds_only_its_variant():
    assert type(_model(2, mode="concat")).__name__ == "ConcatDenoiser"
    assert type(_model(2, mode="mask_mid")).__name__ == "MaskMidDenoiser"
    assert type(_model(2, shared_decoder=False)) is UnsharedDenoiser
    assert type(_model(2)) is FactorizedDenoiser
    with pytest.raises(TypeError, match="use factorized_denoiser"):
        FactorizedDenoiser(FactorizedConfig(UCFG, mode="concat"))
    with pytest.raises(ValueError, match="not a variant"):
        FactorizedConfig(UCFG, mode="concat", shared_decoder=False)


def test_tiny_model_overfits_a_batch_and_its_masks_are_not_uniform():
    # Two images whose halves differ: the model must learn to denoise them, masks must move.
    torch.manual_seed(0)
    x0 = -torch.ones(4, 3, 8, 8)
    x0[:, :, :, 4:] = 1
    x0[2:, 0] *= -1
    schedule = NoiseSchedule("cosine", 100)
    model = _model(2)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 100, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    before = denoising_loss(model, schedule, x0, t, eps).item()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = denoising_loss(model, schedule, x0, t, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * before
    _, masks = model(schedule.add_noise(x0, eps, t), t, return_masks=True)
    assert masks.std() > 0.05  # not the uniform 1/K everywhere


def test_segment_noises_then_reads_masks():
    model = _model(2)
    schedule = NoiseSchedule("cosine", 100)
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    a = segment(model, schedule, x0, t=3, generator=torch.Generator().manual_seed(1))
    b = segment(model, schedule, x0, t=3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 2, 8, 8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # exactly: the generator's noise added at t, one forward pass, its masks
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    tt = torch.full((3,), 3)
    with torch.no_grad():
        _, expected = model(schedule.add_noise(x0, noise, tt), tt, return_masks=True)
    torch.testing.assert_close(a, expected)
    other = segment(model, schedule, x0, t=3, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, other)
    # Without a generator or noise: the noise of seed 0, the same on every call.
    torch.testing.assert_close(segment(model, schedule, x0, t=3),
                               segment(model, schedule, x0, t=3, generator=make_generator(0)))


def test_masks_over_t_is_segment_at_each_t():
    model = _model(3, seed=4)
    schedule = NoiseSchedule("cosine", 100)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ts = (1, 30, 90)
    masks = masks_over_t(model, schedule, x0, ts, noise)
    assert masks.shape == (2, 3, 3, 8, 8)
    for i, t in enumerate(ts):
        torch.testing.assert_close(masks[:, i], segment(model, schedule, x0, t, noise=noise))
    with pytest.raises(ValueError, match=r"t must be an int in \[0, 100\), got 100"):
        masks_over_t(model, schedule, x0, (100,), noise)
    assert snapshot_timesteps(1000) == (10, 30, 60, 120, 250, 500)


class _Images(torch.utils.data.Dataset):
    def __init__(self, n):
        self.x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


def test_segment_dataset_noise_depends_only_on_the_image_index():
    model = _model(2, seed=5)
    schedule = NoiseSchedule("cosine", 100)
    data = _Images(5)
    a = segment_dataset(model, schedule, data, t=20, batch_size=2, progress=False)
    b = segment_dataset(model, schedule, data, t=20, batch_size=5, progress=False)
    assert a.shape == (5, 2, 8, 8)
    torch.testing.assert_close(a, b)
    c = segment_dataset(model, schedule, data, t=20, num_images=3, progress=False)
    torch.testing.assert_close(c, a[:3])
    d = segment_dataset(model, schedule, data, t=20, seed=1, progress=False)
    assert not torch.equal(a, d)


def test_generate_with_masks_reads_the_masks_of_the_step_nearest_t_mask():
    from fdiff.samplers import generate

    model = _model(2, seed=6)
    schedule = NoiseSchedule("cosine", 100)
    xT = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    images, masks = generate_with_masks(model, schedule, xT.shape, t_mask=30, num_steps=10, xT=xT)
    torch.testing.assert_close(images, generate(model, schedule, xT.shape, num_steps=10, xT=xT))
    assert masks.shape == (2, 2, 8, 8)
    # With 10 DDIM steps of T = 100 the visited timesteps are 80, 70, ..., 0; 30 is one of them.
    from fdiff.samplers import sample

    x30 = next(st.xt for st in sample(model, schedule, xT.shape, num_steps=10, xT=xT) if st.t == 30)
    _, expected = model(x30, torch.full((2,), 30), return_masks=True)
    torch.testing.assert_close(masks, expected)


def test_save_load_round_trip(tmp_path):
    model = _model(3, mode="mask_mid", mask_width=0.5, mask_attention=False)
    extra = {"snapshot_masks": torch.arange(6, dtype=torch.uint8).view(1, 2, 3)}
    path = save_model(tmp_path / "f.safetensors", model, tensors=extra)
    loaded, meta = load_model(path)
    assert meta["kind"] == "factorized" and loaded.config == model.config
    torch.testing.assert_close(meta["tensors"]["snapshot_masks"], extra["snapshot_masks"])
    xt, t = _xt()
    torch.testing.assert_close(loaded(xt, t), model(xt, t), rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="num_regions"):
        FactorizedConfig(UCFG, num_regions=1)
    with pytest.raises(ValueError, match="num_regions"):
        FactorizedConfig(UCFG, num_regions=2.0)
    with pytest.raises(ValueError, match="mode"):
        FactorizedConfig(UCFG, mode="add")
    with pytest.raises(ValueError, match="mask_noise"):
        FactorizedConfig(UCFG, mask_noise=-1.0)
    with pytest.raises(ValueError, match="mask_width must be a number in"):
        FactorizedConfig(UCFG, mask_width=0)
    model = _model(2)
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 3, 7, 7), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="num_regions"):  # replace() validates again
        dataclasses.replace(model.config, num_regions=1)


def test_the_mask_generator_is_a_decoder_half_at_a_chosen_width():
    # The paper's is the second half of a standard U-Net: the U-Net's widths and attention.
    full = FactorizedConfig(UCFG, mask_width=1.0, mask_attention=True)
    assert full.mask_config() == dataclasses.replace(UCFG, out_channels=2)
    model = factorized_denoiser(full)
    assert sum(p.numel() for p in model.mask_generator.parameters()) > sum(
        p.numel() for p in model.decoder.parameters()) * 0.9
    assert any(type(m).__name__ == "Attention" for m in model.mask_generator.modules())
    # The default is narrower, without attention: half of 24 is 12, which GroupNorm(8) cannot
    # split, so it gets 16.
    cfg = FactorizedConfig(UNetConfig(base_channels=24, channel_mults=(1, 2), num_heads=2))
    assert (cfg.mask_width, cfg.mask_attention) == (0.5, False)
    assert cfg.mask_config().base_channels == 16 and cfg.mask_config().attn_levels == ()
    narrow = factorized_denoiser(cfg)
    assert not any(type(m).__name__ == "Attention" for m in narrow.mask_generator.modules())
    # Attention at a width the heads cannot split is named.
    heads = UNetConfig(base_channels=32, channel_mults=(1, 2), num_heads=32)
    with pytest.raises(ValueError, match="mask_width=0.25 gives the mask generator the base"):
        FactorizedConfig(heads, mask_width=0.25, mask_attention=True)
    narrow_heads = FactorizedConfig(heads, mask_width=0.25, mask_attention=False)
    assert narrow_heads.mask_config().num_heads == 1


def test_float64_images_segment_as_float32_ones():
    model = _model(2).eval()
    s = NoiseSchedule("cosine", 100)
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        single = segment(model, s, x0, 10, noise=noise)
        double = segment(model, s, x0.double(), 10, noise=noise.double())
    torch.testing.assert_close(double, single, atol=1e-5, rtol=0)


def test_uniform_mask_gap_compares_the_model_with_its_masks_made_uniform():
    from fdiff.segmentation import uniform_mask_gap

    model = _model(2, seed=3).eval()
    schedule = NoiseSchedule("cosine", 100)
    x0 = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    out = uniform_mask_gap(model, schedule, x0, 20, noise=noise, batch_size=2)
    tt = torch.full((5,), 20)
    xt = schedule.add_noise(x0, noise, tt)
    with torch.no_grad():
        own = (model(xt, tt) - noise).pow(2).mean().item()
        # uniform masks: every region's decoder sees the skips / K, as one plain decoder run
        emb = model.time_embed(tt)
        skips = model.encoder(xt, emb)
        h = model.middle(skips[-1], emb)
        single = model.decoder(h, [s / 2 for s in skips], emb)
        flat = (single - noise).pow(2).mean().item()
    assert out["loss"] == pytest.approx(own, rel=1e-5)
    assert out["uniform_loss"] == pytest.approx(flat, rel=1e-4)
    assert out["gap"] == pytest.approx(flat / own - 1, rel=1e-3, abs=1e-6)
    with pytest.raises(ValueError, match="masks must have shape"):
        model(xt, tt, masks=torch.full((5, 3, 8, 8), 1 / 3))
    with pytest.raises(ValueError, match="noise must have x0's shape"):
        uniform_mask_gap(model, schedule, x0, 20, noise=noise[:4])


def test_single_region_gap_is_zero_for_a_collapsed_model_whose_uniform_gap_is_not():
    """One region holding every pixel makes the model a plain U-Net run on the full skips; for
    a model that has collapsed into one region, that is what it already is."""
    from fdiff.segmentation import single_region_gap, uniform_mask_gap

    model = _model(2, seed=3).eval()
    schedule = NoiseSchedule("cosine", 100)
    x0 = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    tt = torch.full((5,), 20)
    xt = schedule.add_noise(x0, noise, tt)
    with torch.no_grad():  # the plain decoder run on the full skips
        emb = model.time_embed(tt)
        skips = model.encoder(xt, emb)
        plain = model.decoder(model.middle(skips[-1], emb), skips, emb)
    plain_loss = (plain - noise).pow(2).mean().item()
    out = single_region_gap(model, schedule, x0, 20, noise=noise, batch_size=2)
    assert out["single_loss"] == pytest.approx(plain_loss, rel=1e-4)  # either region: the same
    # Collapse the model: its mask generator gives region 1 every pixel.
    def collapsed(h, skips, emb, generator=None):
        m = torch.zeros(h.shape[0], 2, *x0.shape[-2:])
        m[:, 1] = 1
        return m

    model.masks = collapsed
    out = single_region_gap(model, schedule, x0, 20, noise=noise)
    assert out["gap"] == pytest.approx(0, abs=1e-5)
    uniform = uniform_mask_gap(model, schedule, x0, 20, noise=noise)["gap"]
    assert abs(uniform) > 1e-3  # halving the skips costs even a model without a partition
