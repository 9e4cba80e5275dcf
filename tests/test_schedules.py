import pytest
import torch
from diffusers import DDPMScheduler

from fdiff.schedules import NoiseSchedule, cosine_betas, linear_betas


@pytest.mark.parametrize(
    "kind, diffusers_name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]
)
def test_alpha_bar_matches_diffusers(kind, diffusers_name):
    ours = NoiseSchedule(kind, 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name)
    torch.testing.assert_close(ours.betas, ref.betas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.alpha_bar, ref.alphas_cumprod, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_add_noise_matches_diffusers(kind):
    name = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[kind]
    ours = NoiseSchedule(kind, 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(8, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t))


def test_schedules_are_float64_and_monotone():
    for betas in (linear_betas(1000), cosine_betas(1000)):
        assert betas.dtype == torch.float64
        assert (betas > 0).all() and (betas < 1).all()
    s = NoiseSchedule("cosine", 1000)
    assert s.alpha_bar.dtype == torch.float32
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all()  # strictly more noise as t grows
    assert s.alpha_bar[0] > 0.999 and s.alpha_bar[-1] < 1e-3


def test_short_linear_chain_keeps_total_noise():
    # Rescaled endpoints: a 100-step chain reaches about the same final alpha_bar regime.
    assert NoiseSchedule("linear", 100).alpha_bar[-1] < 1e-3
    # Very short chains would rescale beta past 1; capped, alpha_bar stays in (0, 1].
    for steps in (10, 20):
        s = NoiseSchedule("linear", steps)
        assert s.betas.max() <= 0.999 and (s.alpha_bar > 0).all() and s.alpha_bar.isfinite().all()


def test_conversions_are_inverse():
    s = NoiseSchedule("cosine", 1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(16, 3, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(16, 3, 4, 4, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    xt = s.add_noise(x0, eps, t)
    torch.testing.assert_close(s.eps_to_x0(xt, eps, t), x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(s.x0_to_eps(xt, x0, t)[t < 990], eps[t < 990], atol=1e-3, rtol=1e-3)
    v = s.velocity(x0, eps, t)
    torch.testing.assert_close(s.v_to_eps(xt, v, t), eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.v_to_x0(xt, v, t), x0, atol=1e-4, rtol=1e-4)


def test_add_noise_variance_is_preserved():
    # Var[x_t] = ab Var[x0] + (1 - ab): unit-variance data stays unit variance. Pixels of +-1
    # with even odds have variance 1 and stay in the images' range [-1, 1].
    s = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 2, (4000, 1, 1, 1), generator=g).float() * 2 - 1
    eps = torch.randn(4000, 1, 1, 1, generator=g)
    for tv in (0, 300, 999):
        xt = s.add_noise(x0, eps, torch.full((4000,), tv))
        assert abs(xt.var().item() - 1) < 0.08


def test_add_noise_follows_input_device_and_dtype():
    s = NoiseSchedule("linear", 100)
    x0 = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    out = s.add_noise(x0, torch.ones_like(x0), torch.tensor([0, 99]))
    assert out.dtype == torch.float64 and out.device == x0.device
    # x0 = 0 and eps = 1 leave sqrt(1 - alpha_bar_t) at every pixel
    expected = (1 - s.alpha_bar[[0, 99]].double()).sqrt()
    torch.testing.assert_close(out[:, 0, 0, 0], expected)
    assert (out == out[:, :1, :1, :1]).all()


def test_bad_inputs_raise_clear_errors():
    s = NoiseSchedule("linear", 100)
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(TypeError, match="int64"):
        s.add_noise(x, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        s.add_noise(x, x, torch.tensor([0, 100]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        s.add_noise(x, x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="same shape"):
        s.add_noise(x, x[:, :1], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule("sigmoid")
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule("linear", 1)


def test_same_noise_t_finds_the_step_with_the_nearest_alpha_bar():
    linear, cosine = NoiseSchedule("linear", 1000), NoiseSchedule("cosine", 1000)
    t = cosine.same_noise_t(linear, 30)
    gaps = (cosine.alpha_bar - linear.alpha_bar[30]).abs()
    assert gaps[t] == gaps.min() and t == 63  # the paper's t = 30 (linear) is t = 63 (cosine)
    assert linear.same_noise_t(linear, 30) == 30
    with pytest.raises(ValueError, match="t must be"):
        cosine.same_noise_t(linear, 1000)


def test_a_step_out_of_1000_on_shorter_chains():
    from fdiff.schedules import step_of

    assert step_of(150, 1000) == 150 and step_of(150, 100) == 15 and step_of(155, 100) == 16
    assert step_of(1000, 100) == 99 and step_of(0, 20) == 0
