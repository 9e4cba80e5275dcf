"""The book's tensors stay on the CPU while its models run on a GPU: every function that takes
images runs them on the model's device and returns its results where the images were.

These tests need CUDA; without it they are skipped (run them on a GPU machine, e.g. Colab).
"""

import copy

import pytest
import torch

from fdiff.factorized import (
    FactorizedConfig,
    FactorizedDenoiser,
    masks_over_t,
)
from fdiff.features import DiffusionFeatures
from fdiff.samplers import ddim_invert, generate, regenerate
from fdiff.schedules import NoiseSchedule
from fdiff.seeding import per_sample_generators
from fdiff.segmentation import generate_with_masks, segment
from fdiff.train import denoising_loss
from fdiff.unet import UNet, UNetConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

CFG = UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2)


def _pair(model):
    """The same weights on the CPU and on the GPU, in eval mode."""
    torch.manual_seed(0)
    model = model.eval()
    return model, copy.deepcopy(model).cuda()


def _close(gpu_result, cpu_result):
    assert gpu_result.device.type == "cpu"
    torch.testing.assert_close(gpu_result, cpu_result, atol=2e-3, rtol=2e-3)


def test_samplers_take_cpu_images_to_a_gpu_model_and_back():
    cpu, gpu = _pair(UNet(CFG))
    s = NoiseSchedule("cosine", 100)
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        _close(generate(gpu, s, x0.shape, num_steps=10, generator=per_sample_generators(1, 2)),
               generate(cpu, s, x0.shape, num_steps=10, generator=per_sample_generators(1, 2)))
        _close(list(ddim_invert(gpu, s, x0, 10))[-1].xt, list(ddim_invert(cpu, s, x0, 10))[-1].xt)
        _close(regenerate(gpu, s, x0, 40, generator=torch.Generator().manual_seed(2)),
               regenerate(cpu, s, x0, 40, generator=torch.Generator().manual_seed(2)))
        t, eps = torch.tensor([5, 50]), torch.randn(x0.shape)
        _close(denoising_loss(gpu, s, x0, t, eps).cpu(), denoising_loss(cpu, s, x0, t, eps))


def test_segmentation_and_features_take_cpu_images_to_a_gpu_model_and_back():
    cpu, gpu = _pair(FactorizedDenoiser(FactorizedConfig(CFG)))
    s = NoiseSchedule("cosine", 100)
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    _close(segment(gpu, s, x0, 3, noise=noise), segment(cpu, s, x0, 3, noise=noise))
    _close(masks_over_t(gpu, s, x0, [3, 30], noise), masks_over_t(cpu, s, x0, [3, 30], noise))
    gpu_out, cpu_out = (
        generate_with_masks(m, s, x0.shape, t_mask=3, num_steps=10, eta=1.0,
                            generator=per_sample_generators(1, 2))
        for m in (gpu, cpu)
    )
    for a, b in zip(gpu_out, cpu_out):
        _close(a, b)
    feats = [DiffusionFeatures(m, s, [0, 1], [5, 20], (3, 8, 8))(x0) for m in (gpu, cpu)]
    _close(*feats)


def test_load_run_puts_the_model_on_the_asked_device(tmp_path, monkeypatch):
    from fdiff.runs import load_run

    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path))
    model, _ = load_run("ddpm_simple-shapes", profile="ci", progress=False)
    assert next(model.parameters()).device.type == "cuda"
    model, _ = load_run("ddpm_simple-shapes", profile="ci", progress=False, device="cpu")
    assert next(model.parameters()).device.type == "cpu"


def test_the_schedule_follows_its_inputs_device():
    s = NoiseSchedule("cosine", 100)
    x0, eps, t = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 90])
    on_gpu = s.add_noise(x0.cuda(), eps.cuda(), t.cuda())
    assert on_gpu.device.type == "cuda"
    _close(on_gpu.cpu(), s.add_noise(x0, eps, t))
    assert s.eps_to_x0(on_gpu, eps.cuda(), t.cuda()).device.type == "cuda"


def test_a_closure_runs_where_it_is_told():
    cpu, gpu = _pair(UNet(CFG))
    s = NoiseSchedule("cosine", 100)
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def on_gpu(x, t):  # a closure has no parameters that tell its device
        return gpu(x, t)

    with torch.no_grad():
        _close(list(ddim_invert(on_gpu, s, x0, 10, device="cuda"))[-1].xt,
               list(ddim_invert(cpu, s, x0, 10))[-1].xt)
        _close(generate(on_gpu, s, x0.shape, num_steps=10, device="cuda",
                        generator=per_sample_generators(1, 2)),
               generate(cpu, s, x0.shape, num_steps=10, generator=per_sample_generators(1, 2)))
