import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from fdiff.samplers import (
    ddim_invert,
    ddim_step,
    ddim_timesteps,
    ddpm_step,
    generate,
    regenerate,
    sample,
)
from fdiff.schedules import NoiseSchedule
from fdiff.seeding import per_sample_generators


def _inputs(seed=0, shape=(4, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("t", [999, 500, 1, 0])
def test_ddpm_step_matches_diffusers(t):
    ours = NoiseSchedule("linear", 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    ref.set_timesteps(1000)
    # diffusers accumulates alpha_bar in float32, ours in float64 (test_schedules bounds the
    # difference); with an identical schedule the steps must agree to rounding.
    ref.alphas_cumprod = ours.alpha_bar.clone()
    xt, eps = _inputs()
    expected = ref.step(eps, t, xt, generator=torch.Generator().manual_seed(7)).prev_sample
    tt = torch.full((4,), t)
    got, _ = ddpm_step(ours, eps, tt, xt, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("kind, name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_ddim_step_matches_diffusers(eta, kind, name):
    ours = NoiseSchedule(kind, 1000)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule=name, clip_sample=True,
                        set_alpha_to_one=True)
    ref.set_timesteps(50)
    assert ref.timesteps.tolist() == ddim_timesteps(1000, 50)
    xt, eps = _inputs(1)
    noise = torch.randn(xt.shape, generator=torch.Generator().manual_seed(3))
    for t in (980, 500, 0):
        expected = ref.step(eps, t, xt, eta=eta, variance_noise=noise).prev_sample
        tt, tp = torch.full((4,), t), torch.full((4,), t - 20 if t else -1)
        got, _ = ddim_step(ours, eps, tt, tp, xt, eta=eta, noise=noise)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_ddim_with_eta_one_has_ddpm_variance():
    # With consecutive timesteps, DDIM(eta=1) is the DDPM posterior (Song et al. 2021, sec. 4.1).
    s = NoiseSchedule("cosine", 1000)
    xt, eps = _inputs(2)
    noise = torch.randn(xt.shape, generator=torch.Generator().manual_seed(4))
    t = torch.full((4,), 400)
    a, _ = ddpm_step(s, eps, t, xt, noise=noise, clip_x0=False)
    b, _ = ddim_step(s, eps, t, t - 1, xt, eta=1.0, noise=noise, clip_x0=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class PointOracle(torch.nn.Module):
    """The exact eps-predictor for a data distribution that is a single image x*."""

    def __init__(self, schedule, x_star):
        super().__init__()
        self.s, self.x_star = schedule, x_star
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, xt, t):
        return self.s.x0_to_eps(xt, self.x_star.expand_as(xt), t)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_samplers_recover_a_point_distribution(method):
    s = NoiseSchedule("linear", 100)
    x_star = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    steps = dict(num_steps=10) if method == "ddim" else {}
    out = generate(PointOracle(s, x_star), s, (3, 3, 4, 4), method=method, **steps,
                   generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x_star.expand(3, -1, -1, -1), atol=1e-3, rtol=0)


def test_sample_yields_the_whole_trajectory():
    s = NoiseSchedule("linear", 100)
    model = PointOracle(s, torch.zeros(1, 3, 4, 4))
    ddim = list(sample(model, s, (2, 3, 4, 4), method="ddim", num_steps=10))
    ddpm = list(sample(model, s, (2, 3, 4, 4), method="ddpm"))
    assert [st.t for st in ddim] == [80, 70, 60, 50, 40, 30, 20, 10, 0, -1]
    assert [st.t for st in ddpm] == list(range(98, -2, -1))
    assert all(st.xt.shape == (2, 3, 4, 4) and st.x0.shape == (2, 3, 4, 4) for st in ddim)


def test_same_seed_same_samples_and_independent_of_batch_size(tiny_unet):
    s = NoiseSchedule("linear", 50)
    kw = dict(method="ddpm")
    a = generate(tiny_unet, s, (4, 3, 8, 8), generator=per_sample_generators(5, 4), **kw)
    b = generate(tiny_unet, s, (4, 3, 8, 8), generator=per_sample_generators(5, 4), **kw)
    c = generate(tiny_unet, s, (2, 3, 8, 8), generator=per_sample_generators(5, 2), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[:2], c, rtol=1e-5, atol=1e-5)
    d = generate(tiny_unet, s, (4, 3, 8, 8), generator=per_sample_generators(6, 4), **kw)
    assert (a - d).abs().mean() > 0.1


def test_ddim_inversion_reconstructs_with_exact_model():
    s = NoiseSchedule("cosine", 1000)
    x_star = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    model = PointOracle(s, x_star)
    traj = list(ddim_invert(model, s, x_star, num_steps=20))
    assert [st.t for st in traj] == list(range(0, 1000, 50))
    xT = traj[-1].xt
    rec = generate(model, s, xT.shape, method="ddim", num_steps=20, xT=xT, clip_x0=False)
    torch.testing.assert_close(rec, x_star, atol=1e-3, rtol=0)


def test_sampler_bad_inputs():
    s = NoiseSchedule("linear", 100)
    model = PointOracle(s, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="method"):
        next(sample(model, s, (1, 3, 4, 4), method="euler"))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        next(sample(model, s, (3, 4, 4)))
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(100, 0)
    with pytest.raises(ValueError, match="num_steps"):
        next(sample(model, s, (1, 3, 4, 4), num_steps=0))  # not silently the default 50
    with pytest.raises(ValueError, match="generators"):
        next(sample(model, s, (3, 3, 4, 4), generator=per_sample_generators(0, 2)))
    with pytest.raises(ValueError, match="t_start must be an int in"):
        next(sample(model, s, (1, 3, 4, 4), xT=torch.zeros(1, 3, 4, 4), t_start=100))
    with pytest.raises(ValueError, match="t_start needs xT"):
        next(sample(model, s, (1, 3, 4, 4), t_start=10))


def test_a_late_start_takes_the_remaining_steps():
    s = NoiseSchedule("linear", 100)
    model = PointOracle(s, torch.zeros(1, 3, 4, 4))
    xt = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ddim = list(sample(model, s, xt.shape, method="ddim", num_steps=10, xT=xt, t_start=45))
    ddpm = list(sample(model, s, xt.shape, method="ddpm", xT=xt, t_start=45))
    assert [st.t for st in ddim] == [40, 30, 20, 10, 0, -1]
    assert [st.t for st in ddpm] == list(range(44, -2, -1))
    # Starting at the first step of the full run is the full run.
    for method in ("ddpm", "ddim"):
        steps = dict(num_steps=10) if method == "ddim" else {}
        full = generate(model, s, xt.shape, method=method, **steps, xT=xt,
                        generator=torch.Generator().manual_seed(1))
        start = 99 if method == "ddpm" else 90
        late = generate(model, s, xt.shape, method=method, **steps, xT=xt, t_start=start,
                        generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(late, full, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_regenerate_rebuilds_what_the_model_knows(method):
    s = NoiseSchedule("cosine", 1000)
    x_star = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    model = PointOracle(s, x_star)
    steps = dict(num_steps=20) if method == "ddim" else {}
    # The exact model of a one-image distribution rebuilds that image from any step...
    for t_start in (100, 600, 999):
        out = regenerate(model, s, x_star, t_start, generator=torch.Generator().manual_seed(2),
                         method=method, **steps)
        torch.testing.assert_close(out, x_star, atol=1e-3, rtol=0)
    # ...and turns any other image into it: regeneration shows the model, not the input.
    other = torch.zeros_like(x_star)
    out = regenerate(model, s, other, 600, generator=torch.Generator().manual_seed(2),
                     method=method, **steps)
    torch.testing.assert_close(out, x_star, atol=1e-3, rtol=0)


def test_regenerate_passes_its_generator_to_the_reverse_process(tiny_unet):
    s = NoiseSchedule("linear", 50)
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = []
    for global_seed in (1, 2):  # the global generator must not matter
        torch.manual_seed(global_seed)
        with torch.no_grad():
            out.append(regenerate(tiny_unet, s, x0, 30, generator=torch.Generator().manual_seed(3),
                                  method="ddpm"))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_generators_drive_a_gpu_model_to_the_cpu_samples(tiny_unet):
    s = NoiseSchedule("linear", 50)
    kw = dict(method="ddim", num_steps=10, eta=1.0)
    with torch.no_grad():
        cpu = generate(tiny_unet, s, (3, 3, 8, 8), generator=per_sample_generators(4, 3), **kw)
        gpu = generate(tiny_unet.cuda(), s, (3, 3, 8, 8), generator=per_sample_generators(4, 3),
                       **kw)
    tiny_unet.cpu()
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-3)


def test_ddpm_refuses_ddim_settings():
    s = NoiseSchedule("linear", 20)
    model = PointOracle(s, torch.zeros(1, 3, 4, 4))
    for kw in (dict(num_steps=10), dict(eta=1.0)):
        with pytest.raises(ValueError, match="method='ddim'"):
            generate(model, s, (1, 3, 4, 4), method="ddpm", **kw)


def test_float64_images_meet_float32_weights(tiny_unet):
    s = NoiseSchedule("linear", 50)
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        single = regenerate(tiny_unet, s, x0, 30, noise=noise, num_steps=5)
        double = regenerate(tiny_unet, s, x0.double(), 30, noise=noise.double(), num_steps=5)
    torch.testing.assert_close(double.float(), single, atol=1e-5, rtol=0)


def test_ddim_inversion_stops_on_its_grid_and_checks_t_end(tiny_unet):
    s = NoiseSchedule("linear", 100)
    x0 = torch.zeros(1, 3, 8, 8)
    steps = [st.t for st in ddim_invert(tiny_unet, s, x0, num_steps=10, t_end=45)]
    assert steps == [0, 10, 20, 30, 40]  # 45 is off the grid: the last step is 40
    for bad in (-5, 100):
        with pytest.raises(ValueError, match=r"t_end must be an int in \[0, 99\]"):
            next(ddim_invert(tiny_unet, s, x0, num_steps=10, t_end=bad))
    with pytest.raises(TypeError, match="t_end must be an int, got float 4.5"):
        next(ddim_invert(tiny_unet, s, x0, num_steps=10, t_end=4.5))
