import pytest
import torch

from fdiff.factorized import FactorizedConfig, FactorizedDenoiser
from fdiff.features import DiffusionFeatures, capture, decoder_blocks, sample_pixels
from fdiff.schedules import NoiseSchedule
from fdiff.unet import UNet, UNetConfig

CFG = UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2)


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNet(CFG).eval()


def test_capture_records_and_always_removes_its_hooks():
    model = _unet()
    blocks = decoder_blocks(model)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with capture({"a": blocks[0], "b": blocks[-1]}) as store:
        assert _hooks(model) == 2
        model(x, t)
    assert set(store) == {"a", "b"} and _hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with capture({"a": blocks[0]}):
            raise RuntimeError("boom")
    assert _hooks(model) == 0
    with pytest.raises(ValueError, match="not divisible"):  # an error inside the model, too
        with capture({"a": blocks[0]}):
            model(torch.randn(2, 3, 7, 8), t)
    assert _hooks(model) == 0


def test_captured_blocks_are_the_decoder_features():
    model = _unet()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 4])
    _, feats = model(x, t, return_features=True)
    with capture(dict(enumerate(decoder_blocks(model)))) as store:
        model(x, t)
    for i, f in enumerate(feats):
        torch.testing.assert_close(store[i], f)


def test_feature_dimension_is_computed_and_matches_the_tensor():
    model = _unet()
    schedule = NoiseSchedule("cosine", 100)
    fx = DiffusionFeatures(model, schedule, blocks=[0, 2, 3], timesteps=[5, 50],
                           image_shape=(3, 8, 8))
    out = fx(torch.rand(3, 3, 8, 8) * 2 - 1)
    assert out.shape == (3, fx.dim, 8, 8)
    widths = model.decoder.block_channels
    assert fx.dim == 2 * (widths[0] + widths[2] + widths[3])


def test_shared_noise_makes_features_a_function_of_the_image():
    model = _unet()
    schedule = NoiseSchedule("cosine", 100)
    fx = DiffusionFeatures(model, schedule, blocks=[1], timesteps=[30], image_shape=(3, 8, 8))
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    full = fx(x)
    torch.testing.assert_close(fx(x[2:3]), full[2:3])  # alone or in a batch: the same
    other = DiffusionFeatures(model, schedule, [1], [30], (3, 8, 8), noise_seed=1)
    assert not torch.allclose(other(x), full)


def test_factorized_models_expose_their_mask_generator_blocks():
    torch.manual_seed(0)
    model = FactorizedDenoiser(FactorizedConfig(CFG, num_regions=2))
    fx = DiffusionFeatures(model, NoiseSchedule("cosine", 100), [0, 1], [10], (3, 8, 8))
    assert fx(torch.zeros(2, 3, 8, 8)).shape == (2, fx.dim, 8, 8)
    mask_generator = set(model.mask_generator.modules())
    blocks = decoder_blocks(model)
    assert blocks and all(b in mask_generator for b in blocks)
    assert not any(b in set(model.decoder.modules()) for b in blocks)


def test_bad_arguments():
    model, schedule = _unet(), NoiseSchedule("cosine", 100)
    with pytest.raises(ValueError, match="blocks"):
        DiffusionFeatures(model, schedule, [99], [1], (3, 8, 8))
    with pytest.raises(ValueError, match="timesteps"):
        DiffusionFeatures(model, schedule, [0], [100], (3, 8, 8))
    fx = DiffusionFeatures(model, schedule, [0], [1], (3, 8, 8))
    with pytest.raises(ValueError, match="images must be"):
        fx(torch.zeros(1, 3, 16, 16))
    with pytest.raises(TypeError, match="no decoder"):
        decoder_blocks(torch.nn.Linear(2, 2))


def test_sample_pixels_keeps_a_subset_and_drops_ignored_labels():
    data = [{"image": torch.full((1, 2, 2), float(i)), "semantic": torch.tensor([[0, 1], [1, -1]])}
            for i in range(3)]

    def feats(x):
        return x.expand(-1, 2, -1, -1) * 1.0

    X, y = sample_pixels(feats, data, [0, 1, 2], progress=False)
    assert X.shape == (9, 2) and (y >= 0).all()  # 3 labelled pixels per image
    X2, y2 = sample_pixels(feats, data, [0, 1, 2], pixels_per_image=2, progress=False)
    assert X2.shape == (6, 2)
    assert sorted(X2[:, 0].tolist()) == [0, 0, 1, 1, 2, 2]  # two pixels from every image
