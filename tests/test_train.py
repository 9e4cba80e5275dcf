import dataclasses

import pytest
import torch

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


def _dropout_model(seed=0):
    torch.manual_seed(seed)
    return UNet(dataclasses.replace(CFG, dropout=0.5))


# Dropout draws from torch's global generator, which train() seeds per step inside a fork.
@pytest.mark.parametrize("precision,make", [("fp32", _model), ("bf16", _model),
                                            ("fp32", _dropout_model)])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, precision, make):
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=2, checkpoint_every=100,
                      precision=precision)
    schedule, data = NoiseSchedule("linear", 100), Images()
    straight = train(make(), schedule, data, cfg, progress=False)

    def stop_at_3(step, result):
        if step == 3:
            raise KeyboardInterrupt

    ckpt = tmp_path / "run.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(make(), schedule, data, cfg, checkpoint=ckpt, progress=False, callback=stop_at_3)
    # A fresh process would rebuild the model from scratch with another seed, and its global
    # generator would be elsewhere: resume must not care.
    resumed = train(make(seed=123), schedule, data, cfg, checkpoint=ckpt, progress=False)
    assert resumed.step == 6 and resumed.losses == straight.losses
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_leaves_the_callers_global_generator_where_it_was():
    model = _dropout_model()
    state = torch.get_rng_state()
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, precision="fp32")
    train(model, NoiseSchedule("linear", 100), Images(), cfg, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_snapshots_are_taken_on_schedule_and_survive_an_interruption(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=2, checkpoint_every=100,
                      precision="fp32")
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
                  snapshot_every=2, **interrupted)
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
                       ("grad_clip", 0.5)):
        other = dataclasses.replace(cfg, steps=4, **{key: value})
        with pytest.raises(ValueError, match=f"{key}="):
            train(_model(), NoiseSchedule("linear", 100), Images(), other, checkpoint=ckpt,
                  progress=False)
    longer = dataclasses.replace(cfg, steps=3, checkpoint_every=1)  # these may change
    assert train(_model(), NoiseSchedule("linear", 100), Images(), longer, checkpoint=ckpt,
                 progress=False).step == 3


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
        TrainConfig(steps=1, batch_size=1, precision="fp16")
    with pytest.raises(ValueError, match="steps and batch_size"):
        TrainConfig(steps=0, batch_size=1)
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        TrainConfig(steps=1, batch_size=1, checkpoint_every=0)
    with pytest.raises(ValueError, match="grad_clip must be >= 0"):
        TrainConfig(steps=1, batch_size=1, grad_clip=-1.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(steps=1, batch_size=1, lr=0.0)
    with pytest.raises(ValueError, match="snapshot_every must be >= 1"):
        train(_model(), NoiseSchedule("linear", 100), Images(), TrainConfig(steps=1, batch_size=2),
              progress=False, snapshot=lambda m: torch.zeros(1), snapshot_every=0)


def test_load_or_train_trains_once_then_loads_from_cache(tmp_path, monkeypatch):
    from fdiff import train as train_module
    from fdiff.profiles import get_profile

    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path))
    profile = get_profile("ci")
    model, meta = train_module.load_or_train("unit_test_model", profile=profile, progress=False)
    assert meta["steps"] == profile.train_steps and len(meta["losses"]) == profile.train_steps
    assert model.config.base_channels == profile.base_channels

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached checkpoint should have been loaded")

    monkeypatch.setattr(train_module, "run_recipe", must_not_train)
    again, _ = train_module.load_or_train("unit_test_model", profile=profile)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert len(list((tmp_path / "checkpoints").glob("*.resume"))) == 0


def test_recipe_digest_changes_with_the_recipe():
    from fdiff.profiles import get_profile
    from fdiff.train import Recipe

    steps = get_profile("ci").train_steps
    assert Recipe("unet", "ci").digest() == Recipe("unet", "ci", steps=steps).digest()
    assert Recipe("unet", "ci").digest() != Recipe("unet", "ci", steps=5).digest()
    assert Recipe("unet", "ci").digest() != Recipe("unet", "ci", schedule="linear").digest()


def test_a_trained_factorized_model_carries_its_partition_snapshots(tmp_path, monkeypatch):
    from fdiff.data import ShapesDataset
    from fdiff.factorized import masks_over_t
    from fdiff.profiles import get_profile
    from fdiff.train import Recipe, load_or_train

    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path))
    ci = get_profile("ci")
    model, meta = load_or_train("factorized_test", kind="factorized", profile=ci, progress=False)
    snap = meta["tensors"]
    steps = snap["snapshot_steps"].tolist()
    assert steps[0] == 0 and steps[-1] == ci.train_steps and steps == sorted(steps)
    n, ts = len(snap["snapshot_images"]), snap["snapshot_timesteps"].tolist()
    from fdiff.train import partition_snapshots

    assert snap["snapshot_masks"].shape[3] == 1  # K - 1 stored: the last mask is implied
    masks = partition_snapshots(snap)
    assert masks.dtype == torch.uint8
    assert masks.shape == (len(steps), n, len(ts), 2, ci.image_size, ci.image_size)
    # K = 2: the implied last mask makes the two sum to 255 exactly
    assert (masks.int().sum(3) == 255).all()
    probe = ShapesDataset(n, ci.image_size, split="test").batch(list(range(n)))["image"]
    torch.testing.assert_close(snap["snapshot_images"], probe)
    # the first snapshot is the untrained model, the last differs from it
    assert not torch.equal(masks[0], masks[-1])
    # the first snapshot is the freshly seeded model on the probe with its fixed noise
    untrained, schedule, _, _ = Recipe("factorized", "ci").parts()
    noise = torch.randn(probe.shape, generator=torch.Generator().manual_seed(1234))
    first = masks_over_t(untrained.eval(), schedule, probe, ts, noise)[:, :, 0]
    assert (masks[0][:, :, 0].int() - (first * 255).round().int()).abs().max() <= 1


def test_recipes_build_the_factorized_variants_and_refuse_them_for_a_unet():
    from fdiff.train import Recipe

    model = Recipe(kind="factorized", profile="ci", num_regions=3, mode="concat",
                   shared_decoder=False, mask_noise=0.5).parts()[0]
    cfg = model.config
    assert (cfg.num_regions, cfg.mode, cfg.shared_decoder, cfg.mask_noise) == (
        3, "concat", False, 0.5)
    assert len(model.decoders) == 3
    assert Recipe("factorized", "ci", num_regions=3).digest() != Recipe("factorized", "ci").digest()
    with pytest.raises(ValueError, match="only apply to --model factorized"):
        Recipe(kind="unet", profile="ci", num_regions=3).parts()


def _recipe_the_command_trains(monkeypatch, tmp_path, argv):
    """Run the training command up to the point where it would train; return its recipe."""
    from fdiff import train as train_module

    seen = {}

    def fake_run(recipe, resume, progress=True, root=None, download=False):
        seen["recipe"] = recipe
        raise SystemExit(0)

    monkeypatch.setattr(train_module, "run_recipe", fake_run)
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path))
    with pytest.raises(SystemExit):
        train_module.main(argv)
    return seen["recipe"]


def test_command_line_passes_the_variant_to_the_recipe(monkeypatch, tmp_path):
    r = _recipe_the_command_trains(
        monkeypatch, tmp_path,
        ["--model", "factorized", "--profile", "ci", "--name", "x", "--regions", "4",
         "--mode", "mask_mid", "--unshared-decoders", "--mask-noise", "1"])
    assert (r.num_regions, r.mode, r.shared_decoder, r.mask_noise) == (4, "mask_mid", False, 1.0)
    assert r.dataset == "shapes"


def test_the_padding_option_reaches_both_models_and_names_its_own_recipe(monkeypatch, tmp_path):
    from fdiff.train import Recipe

    for kind in ("unet", "factorized"):
        model = Recipe(kind, "ci", padding="replicate").parts()[0]
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.padding[0]]
        assert convs and all(m.padding_mode == "replicate" for m in convs)
        replicate = Recipe(kind, "ci", padding="replicate")
        assert replicate.digest() != Recipe(kind, "ci").digest()
        assert not replicate.same_model(Recipe(kind, "ci"))
    argv = ["--model", "factorized", "--profile", "ci", "--name", "x", "--padding", "replicate"]
    assert _recipe_the_command_trains(monkeypatch, tmp_path, argv).padding == "replicate"
    assert Recipe.from_command("--model unet --profile ci --name y").padding == "zeros"


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


def test_the_min_snr_option_reaches_the_training_loss_and_names_its_own_recipe(
    monkeypatch, tmp_path
):
    from fdiff.train import Recipe

    plain, weighted = Recipe("unet", "ci"), Recipe("unet", "ci", min_snr_gamma=5.0)
    assert plain.loss_fn is denoising_loss
    assert weighted.loss_fn.keywords == {"min_snr_gamma": 5.0}
    assert weighted.digest() != plain.digest() and not weighted.same_model(plain)
    assert Recipe("unet", "ci", min_snr_gamma=0.0).digest() == plain.digest()
    with pytest.raises(ValueError, match="min_snr_gamma must be >= 0"):
        Recipe("unet", "ci", min_snr_gamma=-5.0)
    from fdiff import train as train_module

    def fake_train(*args, loss_fn, **kwargs):
        raise RuntimeError(loss_fn)

    monkeypatch.setattr(train_module, "train", fake_train)
    with pytest.raises(RuntimeError) as caught:
        train_module.run_recipe(weighted, tmp_path / "run.safetensors", progress=False)
    assert caught.value.args[0].keywords == {"min_snr_gamma": 5.0}

    argv = ["--model", "unet", "--profile", "ci", "--name", "x", "--min-snr-gamma", "5"]
    assert _recipe_the_command_trains(monkeypatch, tmp_path, argv).min_snr_gamma == 5.0
    assert Recipe.from_command("--model unet --profile ci --name y").min_snr_gamma == 0.0


def test_the_depth_option_builds_deeper_models_and_names_its_own_recipe(monkeypatch, tmp_path):
    from fdiff.profiles import get_profile
    from fdiff.train import Recipe

    default = get_profile("ci").num_res_blocks
    for kind in ("unet", "factorized"):
        plain, deep = Recipe(kind, "ci"), Recipe(kind, "ci", res_blocks=default + 1)
        model = deep.parts()[0]
        unet_cfg = model.config if kind == "unet" else model.config.unet
        assert unet_cfg.num_res_blocks == default + 1
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert count(model) > count(plain.parts()[0])
        assert deep.digest() != plain.digest() and not deep.same_model(plain)
        # The profile's own depth, given explicitly, is the same recipe as leaving it out.
        assert Recipe(kind, "ci", res_blocks=default).digest() == plain.digest()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="res_blocks must be a positive integer"):
            Recipe("unet", "ci", res_blocks=bad)
    argv = ["--model", "unet", "--profile", "ci", "--name", "x", "--res-blocks", "3"]
    assert _recipe_the_command_trains(monkeypatch, tmp_path, argv).res_blocks == 3
    assert Recipe.from_command("--model unet --profile ci --name y").res_blocks is None


def test_recipes_name_their_dataset_and_refuse_unknown_ones():
    from fdiff.train import Recipe

    assert Recipe("unet", "ci", dataset="pets").digest() != Recipe("unet", "ci").digest()
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        Recipe("unet", "ci", dataset="imagenet")
    simple = Recipe("unet", "ci", dataset="simple-shapes")
    assert simple.digest() != Recipe("unet", "ci").digest()
    data = simple.data()
    assert (data.max_objects, data.textured, len(data)) == (1, False, 256)
    assert simple.data(split="test").split == "test"
    shapes = Recipe("unet", "ci").data()
    assert (shapes.max_objects, shapes.textured) == (4, True)


def test_a_committed_checkpoint_is_used_only_for_its_own_recipe():
    from fdiff.train import Recipe, _entry_matches

    def entry(args, steps=500, **more):
        return {"profile": "cpu", "steps": steps, "command": "python -m fdiff.train " + args,
                **more}

    k3 = entry("--model factorized --profile cpu --steps 500 --name a --regions 3")
    assert _entry_matches(k3, Recipe("factorized", "cpu", steps=500, num_regions=3))
    assert not _entry_matches(k3, Recipe("factorized", "cpu", steps=500))  # K = 2
    assert not _entry_matches(k3, Recipe("unet", "cpu", steps=500))
    assert not _entry_matches(k3, Recipe("factorized", "cpu", steps=3, num_regions=3))
    assert not _entry_matches(k3, Recipe("factorized", "cpu", num_regions=3))  # 3000 steps
    assert not _entry_matches(k3, Recipe("factorized", "ci", steps=500, num_regions=3))
    assert not _entry_matches(k3, Recipe("factorized", "cpu", steps=500, num_regions=3, seed=1))
    assert not _entry_matches(k3, Recipe("factorized", "cpu", steps=500, num_regions=3,
                                         schedule="linear"))
    # The precision changes the arithmetic of training, not the model it trains.
    unet = entry("--profile cpu --name b --precision bf16", steps=3000)
    assert _entry_matches(unet, Recipe("unet", "cpu"))
    assert not _entry_matches(unet, Recipe("unet", "cpu", dataset="pets"))
    assert not _entry_matches({**unet, "steps": 2000}, Recipe("unet", "cpu"))  # interrupted
    pets = entry("--name c --dataset pets", steps=3000)  # no --profile: the entry's
    assert _entry_matches(pets, Recipe("unet", "cpu", dataset="pets"))
    # An entry without a command, or with an unknown one, stands for no recipe.
    assert not _entry_matches({"profile": "cpu", "steps": 3000}, Recipe("unet", "cpu"))
    assert not _entry_matches(entry("--name d --colour red", steps=3000), Recipe("unet", "cpu"))
    with pytest.raises(ValueError, match="unrecognized arguments: --colour red"):
        Recipe.from_command("python -m fdiff.train --name d --colour red")


def test_every_committed_checkpoint_is_its_own_commands_model():
    from fdiff.checkpoints import checkpoint_dir, load_model, read_manifest, sha256_of
    from fdiff.train import Recipe

    manifest = read_manifest()
    assert manifest
    for name, entry in manifest.items():
        path = checkpoint_dir() / entry["file"]
        assert sha256_of(path) == entry["sha256"], name
        recipe = Recipe.from_command(entry["command"])
        model, _ = load_model(path)
        assert recipe.profile == entry["profile"] and recipe.budget == entry["steps"], name
        assert model.config.to_dict() == recipe.model_config(), name


def test_a_committed_checkpoint_of_other_widths_is_trained_again(tmp_path, monkeypatch):
    from fdiff import train as train_module
    from fdiff.checkpoints import register_checkpoint, save_model
    from fdiff.profiles import get_profile
    from fdiff.unet import UNet, UNetConfig

    monkeypatch.setenv("FDIFF_CHECKPOINTS", str(tmp_path / "committed"))
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    wide = UNet(UNetConfig(base_channels=24, channel_mults=(1, 2), num_heads=2))
    path = save_model(tmp_path / "committed" / "m.safetensors", wide)
    register_checkpoint("m", path, "python -m fdiff.train --profile ci --name m --steps 2",
                        profile="ci", steps=2)
    trained = []
    monkeypatch.setattr(train_module, "run_recipe",
                        lambda recipe, *a, **k: trained.append(recipe) or
                        (recipe.parts()[0], {}, {}))
    model, _ = train_module.load_or_train("m", profile=get_profile("ci"), steps=2,
                                          progress=False)
    assert len(trained) == 1 and model.config.base_channels == get_profile("ci").base_channels


def test_the_recipe_leaves_the_callers_generator_alone():
    from fdiff.train import Recipe

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    Recipe("factorized", "ci").digest()
    Recipe("unet", "ci").parts()
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_the_training_command_extends_its_own_run_and_resumes_no_other(tmp_path, monkeypatch):
    from fdiff import train as train_module
    from fdiff.checkpoints import load_model

    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    resumes = []
    real_run = train_module.run_recipe

    def spy(recipe, resume, **kwargs):
        resumes.append((resume, resume.exists()))
        return real_run(recipe, resume, **kwargs)

    monkeypatch.setattr(train_module, "run_recipe", spy)
    out = tmp_path / "out"
    args = ["--profile", "ci", "--name", "m", "--out-dir", str(out), "--precision", "fp32"]
    train_module.main([*args, "--steps", "2"])
    first = load_model(out / "m.safetensors")[1]["losses"]
    train_module.main([*args, "--steps", "3"])  # more steps: continues the same run
    extended = load_model(out / "m.safetensors")[1]["losses"]
    train_module.main([*args, "--steps", "3", "--seed", "1"])  # another recipe: a new run
    (run_a, _), (run_b, resumed), (run_c, fresh_exists) = resumes
    assert run_a == run_b and resumed and extended[:2] == first and len(extended) == 3
    assert run_c != run_a and not fresh_exists


def test_the_recorded_command_quotes_its_arguments(tmp_path, monkeypatch):
    import shlex

    from fdiff import train as train_module
    from fdiff.checkpoints import read_manifest
    from fdiff.train import Recipe

    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out dir"  # a space, as in "My Drive" on Colab
    root = tmp_path / "my data"
    train_module.main(["--profile", "ci", "--name", "q", "--out-dir", str(out), "--steps", "1",
                       "--data-root", str(root), "--precision", "fp32"])
    command = read_manifest(out)["q"]["command"]
    assert shlex.split(command)[-1] == "fp32" and str(root) in shlex.split(command)
    assert Recipe.from_command(command) == Recipe("unet", "ci", steps=1, precision="fp32")


def test_module_entry_point_runs_without_a_double_import_warning():
    # The README's training command is `python -m fdiff.train`; the package must not import
    # fdiff.train before runpy executes it, or Python warns about unpredictable behaviour.
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "fdiff.train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m fdiff.train" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr


@pytest.mark.parametrize("capability,expected", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_auto_precision_uses_bf16_only_on_gpus_with_native_bf16(monkeypatch, capability,
                                                               expected):
    from fdiff.train import _use_bf16

    # A T4 (7.5) emulates bf16 slowly, although torch.cuda.is_bf16_supported() says True.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert _use_bf16("auto", torch.device("cuda")) is expected
    assert _use_bf16("auto", torch.device("cpu")) is False
    assert _use_bf16("bf16", torch.device("cpu")) is True


def test_a_recipe_refuses_a_step_count_that_is_not_positive():
    from fdiff.train import Recipe

    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            Recipe("unet", "ci", steps=bad)
    assert Recipe("unet", "ci", steps=1).budget == 1
