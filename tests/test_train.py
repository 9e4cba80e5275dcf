import dataclasses
import math

import pytest
import torch

from fdiff.checkpoints import load_checkpoint
from fdiff.schedules import NoiseSchedule
from fdiff.train import TrainConfig, denoising_loss, train
from fdiff.unet import UNet, UNetConfig

CFG = UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2)


class Images(torch.utils.data.Dataset):
    def __init__(self, n=8, size=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, size, size, generator=g) * 2 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


def _model(seed=0):
    torch.manual_seed(seed)
    return UNet(CFG)


def test_overfits_one_batch():
    data = Images(n=4)
    schedule = NoiseSchedule("linear", 100)
    model = _model()
    fixed = torch.Generator().manual_seed(0)
    t = torch.randint(0, 100, (4,), generator=fixed)
    eps = torch.randn(4, 3, 8, 8, generator=fixed)
    before = denoising_loss(model, schedule, data.x, t, eps).item()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = denoising_loss(model, schedule, data.x, t, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * before


def test_training_reduces_the_loss_and_ema_moves():
    cfg = TrainConfig(steps=60, batch_size=8, lr=2e-3, warmup_steps=5, precision="fp32")
    model = _model()
    init = [p.detach().clone() for p in model.parameters()]
    res = train(model, NoiseSchedule("linear", 100), Images(16), cfg, progress=False)
    assert len(res.losses) == 60 and res.step == 60
    assert sum(res.losses[-10:]) < 0.7 * sum(res.losses[:10])
    moved = [not torch.equal(a, b) for a, b in zip(init, res.ema.parameters())]
    assert all(moved)


def test_training_runs_in_channels_last_and_checkpoints_restore_the_values(tmp_path):
    from fdiff.checkpoints import load_model, save_model

    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, precision="fp32")
    res = train(_model(), NoiseSchedule("linear", 100), Images(), cfg, progress=False)
    convs = [p for p in res.model.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in res.ema.parameters() if p.ndim == 4)
    save_model(tmp_path / "m.safetensors", res.ema)
    loaded, _ = load_model(tmp_path / "m.safetensors")
    x, t = Images().x[:2], torch.tensor([5, 50])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), res.ema(x, t), rtol=1e-5, atol=1e-5)


def _noisy_masks_model(seed=0):
    from fdiff.factorized import FactorizedConfig, FactorizedDenoiser

    torch.manual_seed(seed)
    return FactorizedDenoiser(FactorizedConfig(CFG, mask_noise=1.0))


# The factorized model's mask noise is a draw the model makes, from the step's generator.
@pytest.mark.parametrize("precision,make", [("fp32", _model), ("bf16", _model), ("fp16", _model),
                                            ("fp32", _noisy_masks_model)])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, precision, make):
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=2, precision=precision)
    schedule, data = NoiseSchedule("linear", 100), Images()
    straight = train(make(), schedule, data, cfg, progress=False)

    def stop_at_3(step, result):
        if step == 3:
            raise KeyboardInterrupt

    ckpt = tmp_path / "run.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(make(), schedule, data, cfg, checkpoint=ckpt, progress=False, callback=stop_at_3,
              save_every=100)
    # A fresh process would rebuild the model from scratch with another seed, and its global
    # generator would be elsewhere: resume must not care.
    resumed = train(make(seed=123), schedule, data, cfg, checkpoint=ckpt, progress=False)
    assert resumed.step == 6 and resumed.losses == straight.losses
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_leaves_the_callers_global_generator_where_it_was():
    model = _noisy_masks_model()
    state = torch.get_rng_state()
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, precision="fp32")
    train(model, NoiseSchedule("linear", 100), Images(), cfg, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_snapshots_are_taken_on_schedule_and_survive_an_interruption(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=2, precision="fp32")
    schedule, data = NoiseSchedule("linear", 100), Images()
    probe = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([50, 50])

    def snap(model):
        assert not torch.is_grad_enabled() and not model.training
        return model(probe, t)

    straight = train(_model(), schedule, data, cfg, progress=False, snapshot=snap,
                     snapshot_every=2)
    assert straight.snapshot_steps == [0, 2, 4, 6] and len(straight.snapshots) == 4
    assert not torch.equal(straight.snapshots[0], straight.snapshots[-1])

    def stop_at_3(step, result):
        if step == 3:
            raise KeyboardInterrupt

    calls = []

    def snap_then_stop(model):  # interrupted while taking the step-4 snapshot
        calls.append(1)
        if len(calls) == 3:  # steps 0, 2, then 4
            raise KeyboardInterrupt
        return snap(model)

    for i, interrupted in enumerate([dict(callback=stop_at_3, snapshot=snap),
                                     dict(snapshot=snap_then_stop)]):
        ckpt = tmp_path / f"run{i}.safetensors"
        with pytest.raises(KeyboardInterrupt):
            train(_model(), schedule, data, cfg, checkpoint=ckpt, progress=False,
                  snapshot_every=2, save_every=100, **interrupted)
        resumed = train(_model(seed=5), schedule, data, cfg, checkpoint=ckpt, progress=False,
                        snapshot=snap, snapshot_every=2)
        assert resumed.snapshot_steps == straight.snapshot_steps
        for a, b in zip(straight.snapshots, resumed.snapshots):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_run_longer_than_asked_is_refused_not_returned(tmp_path):
    cfg = TrainConfig(steps=3, batch_size=4, precision="fp32")
    ckpt = tmp_path / "run.safetensors"
    train(_model(), NoiseSchedule("linear", 100), Images(), cfg, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="already trained 3 steps, more than the 1"):
        train(_model(), NoiseSchedule("linear", 100), Images(),
              dataclasses.replace(cfg, steps=1), checkpoint=ckpt, progress=False)


def test_resume_refuses_a_different_run(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=4, precision="fp32")
    ckpt = tmp_path / "run.safetensors"
    train(_model(), NoiseSchedule("linear", 100), Images(), cfg, checkpoint=ckpt, progress=False)
    other = dataclasses.replace(cfg, steps=4, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        train(_model(), NoiseSchedule("linear", 100), Images(), other, checkpoint=ckpt,
              progress=False)
    # every setting but the budget must match, also those the optimizer's state would hide
    for key, value in (("ema_decay", 0.99), ("weight_decay", 0.1), ("warmup_steps", 5),
                       ("grad_clip", 0.5), ("min_snr_gamma", 5.0)):
        other = dataclasses.replace(cfg, steps=4, **{key: value})
        with pytest.raises(ValueError, match=f"{key}="):
            train(_model(), NoiseSchedule("linear", 100), Images(), other, checkpoint=ckpt,
                  progress=False)
    longer = dataclasses.replace(cfg, steps=3)  # the budget and the save interval may change
    assert train(_model(), NoiseSchedule("linear", 100), Images(), longer, checkpoint=ckpt,
                 progress=False, save_every=1).step == 3


def test_same_seed_same_training():
    cfg = TrainConfig(steps=3, batch_size=4, precision="fp32")
    a = train(_model(), NoiseSchedule("linear", 100), Images(), cfg, progress=False)
    b = train(_model(), NoiseSchedule("linear", 100), Images(), cfg, progress=False)
    assert a.losses == b.losses
    c = train(_model(), NoiseSchedule("linear", 100), Images(),
              dataclasses.replace(cfg, seed=1), progress=False)
    assert a.losses != c.losses


def test_bad_train_config():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(steps=1, batch_size=1, precision="fp8")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        TrainConfig(steps=0, batch_size=1)
    with pytest.raises(ValueError, match="min_snr_gamma must be >= 0"):
        TrainConfig(steps=1, batch_size=1, min_snr_gamma=float("nan"))
    with pytest.raises(ValueError, match="grad_clip must be >= 0"):
        TrainConfig(steps=1, batch_size=1, grad_clip=-1.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(steps=1, batch_size=1, lr=0.0)
    with pytest.raises(ValueError, match="snapshot_every and save_every must be >= 1"):
        train(_model(), NoiseSchedule("linear", 100), Images(), TrainConfig(steps=1, batch_size=2),
              progress=False, snapshot=lambda m: torch.zeros(1), snapshot_every=0)




def test_min_snr_weighting_matches_its_formula_and_reduces_to_the_plain_loss():
    schedule = NoiseSchedule("cosine", 100)
    model = _model()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([0, 10, 60, 99])
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        plain = denoising_loss(model, schedule, x0, t, eps)
        weighted = denoising_loss(model, schedule, x0, t, eps, min_snr_gamma=5.0)
        per_image = (model(schedule.add_noise(x0, eps, t), t) - eps).pow(2).mean((1, 2, 3))
        # A gamma above every timestep's SNR leaves all weights at 1.
        huge = float(schedule.snr(torch.tensor([0])).item()) * 10
        same = denoising_loss(model, schedule, x0, t, eps, min_snr_gamma=huge)
    snr = schedule.snr(t)
    expected = (per_image * torch.minimum(snr, torch.tensor(5.0)) / snr).mean()
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(same, plain)
    assert snr[0] > 5 > snr[-1]  # the weights really differ across these timesteps
    assert weighted < plain  # low-noise timesteps are down-weighted, never up-weighted
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="min_snr_gamma must be >= 0"):
            denoising_loss(model, schedule, x0, t, eps, min_snr_gamma=bad)


def test_the_min_snr_setting_reaches_the_training_loss(monkeypatch):
    from fdiff import train as train_module

    seen = []
    real = train_module.denoising_loss

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("min_snr_gamma"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "denoising_loss", spy)
    cfg = TrainConfig(steps=2, batch_size=4, precision="fp32", min_snr_gamma=5.0)
    train(_model(), NoiseSchedule("cosine", 100), Images(), cfg, progress=False)
    assert seen == [5.0, 5.0]



def test_auto_precision_is_bf16_on_new_gpus_fp16_with_a_scaler_on_older_ones(monkeypatch):
    from fdiff.train import autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("fp16", cpu) == torch.float16 and autocast_dtype("fp32", cuda) is None
    # A T4 (7.5) emulates bf16 slowly, although torch.cuda.is_bf16_supported() says True.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, expected in (((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                 ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None, c=capability: c)
        assert autocast_dtype("auto", cuda) == expected


def test_fp16_training_scales_its_gradients_and_resumes_the_scale(tmp_path):
    cfg = TrainConfig(steps=3, batch_size=4, warmup_steps=1, precision="fp16")
    ckpt = tmp_path / "run.safetensors"
    res = train(_model(), NoiseSchedule("linear", 100), Images(), cfg, checkpoint=ckpt,
                progress=False)
    assert all(math.isfinite(v) for v in res.losses)
    _, meta = load_checkpoint(ckpt)
    assert meta["grad_scaler"]["scale"] > 0
