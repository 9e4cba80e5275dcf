"""Bad input to the public API raises a clear error that says what was expected."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from fdiff.baselines import colour_kmeans, feature_kmeans, grabcut, kmeans
from fdiff.checkpoints import save_model
from fdiff.metrics import adjusted_rand_index, frechet_distance, miou
from fdiff.probing import ProbeConfig, ProbeEnsemble, vote
from fdiff.profiles import describe_profile, get_profile
from fdiff.samplers import ddim_invert, sample
from fdiff.schedules import NoiseSchedule
from fdiff.unet import UNet, UNetConfig
from fdiff.viz import pca_rgb, show_images


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), groups=4)
    return UNet(cfg).eval(), NoiseSchedule("cosine", 100)


def test_profiles(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown profile 'tpu': expected one of \['ci'"):
        get_profile("tpu")
    monkeypatch.setenv("FDIFF_PROFILE", " CI ")
    assert get_profile().name == "ci"
    monkeypatch.setenv("FDIFF_PROFILE", "laptop")
    with pytest.raises(ValueError, match=re.escape("(set FDIFF_PROFILE=ci|cpu|gpu|paper)")):
        get_profile()
    assert "ci" in describe_profile(get_profile("ci"))


def test_unet_config_and_timesteps(tiny):
    with pytest.raises(ValueError, match="positive ints"):
        UNetConfig(channel_mults=())
    with pytest.raises(ValueError, match="positive ints"):
        UNetConfig(channel_mults=(0, 1))
    with pytest.raises(ValueError, match="num_heads=3"):
        UNetConfig(base_channels=16, num_heads=3)
    model, _ = tiny
    with pytest.raises(ValueError, match=r"t must have shape \(2,\), one timestep per image"):
        model(torch.zeros(2, 3, 8, 8), torch.zeros(3, dtype=torch.int64))


def test_samplers(tiny):
    model, schedule = tiny
    with pytest.raises(ValueError, match=r"x0 must have shape \(B, C, H, W\), got \(3, 8, 8\)"):
        next(ddim_invert(model, schedule, torch.zeros(3, 8, 8)))
    with pytest.raises(ValueError, match=r"xT must have the given shape \(2, 3, 8, 8\)"):
        next(sample(model, schedule, (2, 3, 8, 8), xT=torch.zeros(1, 3, 8, 8)))
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        next(sample(model, schedule, (1, 3, 8, 8), eta=-0.5))
    with pytest.raises(ValueError, match="method must be 'ddpm' or 'ddim'"):
        next(sample(model, schedule, (1, 3, 8, 8), method="euler"))


def test_baselines():
    with pytest.raises(ValueError, match=r"x must be \(N, D\)"):
        kmeans(torch.zeros(4), 2)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, N=3\], got 5"):
        kmeans(torch.zeros(3, 2), 5)
    with pytest.raises(ValueError, match=r"images must be \(B, C, H, W\), got \(3, 4, 4\)"):
        colour_kmeans(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\), got \(1, 1, 8, 8\)"):
        grabcut(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"margin must be in \[1, 3\], got 4"):
        grabcut(torch.zeros(1, 3, 8, 8), margin=4)
    with pytest.raises(ValueError, match=r"features must be \(B, D, h, w\)"):
        feature_kmeans(torch.zeros(5, 4, 4))


def test_checkpoints_refuse_other_modules(tmp_path):
    with pytest.raises(TypeError, match="cannot save a Linear: expected a model built from"):
        save_model(tmp_path / "m.safetensors", nn.Linear(2, 2))


def test_metrics():
    with pytest.raises(ValueError, match="expected two flat labelings of equal length"):
        adjusted_rand_index(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="need at least two samples per set, got 1 and 4"):
        frechet_distance(torch.zeros(1, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"expected \(N, D\) and \(M, D\) features"):
        frechet_distance(torch.zeros(4, 2), torch.zeros(4, 3))
    pred = torch.zeros(1, 2, 2, dtype=torch.int64)
    pred[0, 0, 0] = -1
    with pytest.raises(ValueError, match="labels >= 0, got a minimum of -1"):
        miou(pred, torch.zeros(1, 2, 2, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="integer label maps"):
        miou(pred.float(), torch.zeros(1, 2, 2, dtype=torch.int64), 2)


def test_probing():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0, "):
        ProbeConfig(ensemble_size=0)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1"):
        ProbeConfig(val_fraction=1)
    with pytest.raises(ValueError, match=r"logits must be \(members, N, C\), got \(3, 2\)"):
        vote(torch.zeros(3, 2))
    probe = ProbeEnsemble(4, 3, ProbeConfig(ensemble_size=1, max_epochs=1))
    # the message names both ends of the labels given, here the bad maximum
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got 0\.\.5"):
        probe.fit(torch.zeros(4, 4), torch.tensor([0, 1, 0, 5]))
    with pytest.raises(ValueError, match=r"expected X \(N, 4\) and y \(N,\)"):
        probe.fit(torch.zeros(4, 5), torch.zeros(4, dtype=torch.int64))


def test_viz():
    with pytest.raises(ValueError, match=r"expected images of shape \(N, C, H, W\)"):
        show_images(torch.zeros(3, 4, 4, 4, 4))
    with pytest.raises(ValueError, match=r"features must be \(B, D, H, W\), got \(5, 4, 4\)"):
        pca_rgb(torch.zeros(5, 4, 4))
