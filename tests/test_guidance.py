"""Classifier-free guidance: the conditioned U-Net, condition dropout, the guided denoiser."""

import dataclasses

import pytest
import torch

from fdiff.annotate import Conditioned
from fdiff.guidance import Guided, GuidedConfig, GuidedUNet, drop_condition, start_from
from fdiff.schedules import NoiseSchedule
from fdiff.seeding import make_generator
from fdiff.train import TrainConfig, train
from fdiff.unet import UNet, UNetConfig

UNET = UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2)


def _model(condition="class", seed=0, **kw):
    torch.manual_seed(seed)
    annotator = {"annotator": "x"} if condition in ("self", "layout") else {}
    return GuidedUNet(GuidedConfig(UNET, condition=condition, num_classes=3, **annotator, **kw))


def _cond(condition, n, gen):
    if condition == "layout":
        fg = (torch.rand(n, 1, 8, 8, generator=gen) > 0.5).float()
        return torch.cat([fg, 1 - fg], 1)
    return torch.randint(3, (n,), generator=gen)


@pytest.mark.parametrize("condition", ["class", "layout"])
def test_guidance_scale_zero_is_the_null_prediction_and_one_the_conditional(condition):
    model = _model(condition).eval()
    gen = make_generator(1)
    x, t = torch.randn(4, 3, 8, 8, generator=gen), torch.tensor([3, 50, 400, 999])
    cond = _cond(condition, 4, gen)
    with torch.no_grad():
        eps_null, eps_cond = model(x, t, None), model(x, t, cond)
        assert (eps_null - eps_cond).abs().max() > 1e-3  # the condition matters
        torch.testing.assert_close(Guided(model, cond, 0.0)(x, t), eps_null, rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(Guided(model, cond, 1.0)(x, t), eps_cond, rtol=1e-5,
                                   atol=1e-5)
        w3 = Guided(model, cond, 3.0)(x, t)
        torch.testing.assert_close(w3, eps_null + 3 * (eps_cond - eps_null), rtol=1e-4, atol=1e-4)


def test_the_guided_denoiser_runs_both_inputs_as_one_batch():
    model = _model().eval()
    sizes = []
    model.unet.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    with torch.no_grad():
        Guided(model, torch.tensor([0, 2]), 2.0)(torch.randn(2, 3, 8, 8), torch.tensor([5, 5]))
    assert sizes == [4]


def test_the_drop_rate_is_p_and_follows_the_generator():
    n, p = 20_000, 0.1
    ids = torch.randint(3, (n,), generator=make_generator(0))
    dropped = drop_condition(ids, p, make_generator(5))
    rate = (dropped == -1).float().mean().item()
    assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(dropped[dropped >= 0], ids[dropped >= 0])  # kept ones unchanged
    assert torch.equal(dropped, drop_condition(ids, p, make_generator(5)))
    assert not torch.equal(dropped, drop_condition(ids, p, make_generator(6)))
    layouts = torch.ones(n, 2, 2, 2)
    zeroed = drop_condition(layouts, p, make_generator(5)).sum((1, 2, 3)) == 0
    assert torch.equal(zeroed, dropped == -1)  # the same draws for layouts
    assert torch.equal(drop_condition(ids, 0.0, None), ids)


def test_training_mode_drops_conditions_with_the_steps_generator():
    model = _model().train()
    x, t, cond = torch.randn(64, 3, 8, 8), torch.full((64,), 100), torch.randint(3, (64,))
    with torch.no_grad():
        got = model(x, t, cond, generator=make_generator(3))
        want = model.eval()(x, t, drop_condition(cond, 0.1, make_generator(3)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Images(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.x = torch.rand(n, 3, 8, 8, generator=make_generator(9)) * 2 - 1

    def __len__(self):
        return len(self.x)

    def batch(self, indices):
        return {"image": self.x[list(indices)]}


@pytest.mark.parametrize("condition", ["class", "layout"])
def test_resume_with_conditions_is_bit_exact(tmp_path, condition):
    data = _Images()
    if condition == "class":
        cond = torch.arange(8) % 3
    else:
        fg = (torch.rand(8, 1, 8, 8, generator=make_generator(2)) > 0.5)
        cond = (torch.cat([fg, ~fg], 1).to(torch.uint8) * 255)
    data = Conditioned(data, cond)
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=2, precision="fp32")
    schedule = NoiseSchedule("linear", 100)
    # cond_drop 0.5 makes the drops matter in 6 steps of 4 images
    straight = train(_model(condition, cond_drop=0.5), schedule, data, cfg, progress=False)

    def stop_at_3(step, result):
        if step == 3:
            raise KeyboardInterrupt

    ckpt = tmp_path / "run.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(_model(condition, cond_drop=0.5), schedule, data, cfg, checkpoint=ckpt,
              progress=False, callback=stop_at_3, save_every=100)
    resumed = train(_model(condition, seed=7, cond_drop=0.5), schedule, data, cfg,
                    checkpoint=ckpt, progress=False)
    assert resumed.losses == straight.losses
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = train(_model(condition, cond_drop=0.0), schedule, data, cfg, progress=False)
    assert other.losses != straight.losses  # the drops changed the training


@pytest.mark.parametrize("condition", ["class", "layout", "none"])
def test_a_guided_model_started_from_a_unet_predicts_what_it_predicts(condition):
    torch.manual_seed(4)
    base = UNet(UNET).eval()
    model = start_from(_model(condition), base).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    cond = None if condition == "none" else _cond(condition, 2, make_generator(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond), base(x, t), rtol=1e-5, atol=1e-5)
        if cond is not None:
            torch.testing.assert_close(model(x, t, None), base(x, t), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        start_from(_model(condition), UNet(dataclasses.replace(UNET, base_channels=8)))


def test_bad_conditions_get_clear_errors():
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"in \[0, 3\) or -1"):
        _model()(x, t, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="int64 class ids"):
        _model()(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"float layouts of shape \(2, 2, 8, 8\)"):
        _model("layout")(x, t, torch.ones(2, 3, 8, 8))
    with pytest.raises(ValueError, match="unconditioned"):
        _model("none")(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cannot be guided"):
        Guided(_model("none"), torch.tensor([0, 1]), 2.0)
    with pytest.raises(ValueError, match=">= 0"):
        Guided(_model(), torch.tensor([0, 1]), -1.0)
    with pytest.raises(ValueError, match="needs an annotator"):
        GuidedConfig(UNET, condition="self")
    with pytest.raises(ValueError, match="condition must be one of"):
        GuidedConfig(UNET, condition="labels")
    with pytest.raises(ValueError, match="cond_drop"):
        GuidedConfig(UNET, cond_drop=1.5)
    with pytest.raises(ValueError, match=r"feature_blocks\[1\] must be an int >= 0"):
        GuidedConfig(UNET, feature_blocks=(0, -1))
    with pytest.raises(ValueError, match="names a block twice"):
        GuidedConfig(UNET, feature_blocks=(1, 1))


def test_a_guided_model_saves_and_loads(tmp_path):
    from fdiff.checkpoints import load_model, save_model

    model = _model("layout").eval()
    save_model(tmp_path / "g.safetensors", model)
    loaded, meta = load_model(tmp_path / "g.safetensors")
    assert isinstance(loaded, GuidedUNet) and loaded.config == model.config
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    cond = _cond("layout", 2, make_generator(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond), model(x, t, cond))


@pytest.mark.parametrize("name", ["guided_self", "guided_self-deep", "guided_split-deep-k20",
                                  "guided_layout", "guided_class-longtail"])
def test_guided_runs_train_from_their_base_and_keep_their_annotation(tmp_path, monkeypatch, name):
    from fdiff.annotate import image_classes
    from fdiff.runs import load_run, resolve_run

    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path))
    model, meta = load_run(name, "ci", progress=False)
    run = resolve_run(name, "ci")
    assert isinstance(model, GuidedUNet) and model.config == run.model
    assert meta["ddpm_simple-shapes_run"] == resolve_run("ddpm_simple-shapes", "ci").digest()
    n = run.data.num_images
    tensors = meta["tensors"]
    if name.startswith(("guided_self", "guided_split")):
        base = load_run("ddpm_simple-shapes", "ci", progress=False)[0]
        widths = base.decoder.block_channels  # the deep runs cluster the deepest block alone
        k = run.model.num_classes
        assert tensors["cluster_ids"].shape == (n,)
        assert tensors["cluster_centroids"].shape == (
            k, widths[0] if "deep" in name else sum(widths))
        assert tensors["cluster_ids"].max() < k
    if name == "guided_split-deep-k20":  # every cluster holds one class: 4 per class
        classes = image_classes(run.data.training_images(progress=False), progress=False)
        ids = tensors["cluster_ids"]
        assert all(len(classes[ids == c].unique()) == 1 for c in ids.unique())
        assert (ids // 4 == classes).all()
    if name == "guided_layout":
        assert meta["factorized_simple-shapes-replicate_run"]
    if name == "guided_class-longtail":
        kept = tensors["train_indices"]
        classes = image_classes(run.data.training_images(progress=False), progress=False)
        counts = torch.bincount(classes[kept], minlength=5).float()
        share = counts / torch.bincount(classes, minlength=5).float()
        assert share[:3].tolist() == [1.0, 1.0, 1.0] and share[3:].max() < 0.3
