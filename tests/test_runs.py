"""Tests of the run layer: fdiff.runs (Run, registry, load_run), fdiff.configs and fdiff.cli."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdiff import cli
from fdiff.checkpoints import (
    checkpoint_dir,
    load_model,
    read_manifest,
    register_checkpoint,
    save_model,
    sha256_of,
)
from fdiff.configs import ConfigError, canonical, change, from_json, to_json
from fdiff.factorized import (
    ConcatDenoiser,
    FactorizedDenoiser,
    MaskMidDenoiser,
    UnsharedDenoiser,
    partition_snapshots,
)
from fdiff.profiles import get_profile
from fdiff.runs import RUNS, Run, load_run, resolve_run, run_paths
from fdiff.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_is_its_canonical_json_and_its_digest_hashes_it():
    run = resolve_run("ddpm_shapes", "ci")
    assert from_json(Run, run.to_json()) == run
    assert json.loads(canonical(run)) == run.to_json()
    assert run.digest() == hashlib.sha256(canonical(run).encode()).hexdigest()[:12]
    # Every field takes part: change any leaf and the digest changes.
    for path, value in (("model.num_heads", 2), ("train.lr", 5e-4), ("data.seed", 1),
                        ("schedule.kind", "linear"), ("model.padding_mode", "replicate")):
        assert run.change(path, value).digest() != run.digest(), path
    # The budget-free digest names the run that more steps continue.
    longer = run.change("train.steps", 50)
    assert longer.digest() != run.digest()
    assert longer.digest(budget=False) == run.digest(budget=False)


def test_changes_by_dotted_path_read_text_as_json_and_check_the_type():
    run = resolve_run("factorized_shapes", "ci")
    assert change(run, "model.unet.num_res_blocks", "2").model.unet.num_res_blocks == 2
    assert change(run, "steps", 7).train.steps == 7  # the one field ending in "steps"
    assert change(run, "channel_mults", "[1, 2, 2]").model.unet.channel_mults == (1, 2, 2)
    assert change(run, "mask_width", "0.5").model.mask_width == 0.5
    assert change(run, "padding_mode", "replicate").model.unet.padding_mode == "replicate"
    assert change(run, "min_snr_gamma", "5").train.min_snr_gamma == 5.0
    with pytest.raises(ConfigError, match="ambiguous"):
        change(run, "seed", 1)  # train.seed and data.seed
    with pytest.raises(ConfigError, match="no field 'colour'"):
        change(run, "colour", "red")
    with pytest.raises(ConfigError, match="train.steps must be int, got 2.5"):
        change(run, "train.steps", "2.5")
    with pytest.raises(ConfigError, match="shared_decoder must be bool"):
        change(run, "shared_decoder", "1")
    with pytest.raises(ConfigError, match="num_regions"):
        change(run, "num_regions", 1)  # the config's own check, named
    with pytest.raises(ConfigError, match="no field 'dropout'"):
        from_json(UNetConfig, {"dropout": 0.0})


def test_registered_runs_build_their_models_and_variants():
    classes = {"ablation_k2": FactorizedDenoiser, "ablation_concat": ConcatDenoiser,
               "ablation_mask_mid": MaskMidDenoiser, "ablation_unshared": UnsharedDenoiser,
               "ddpm_shapes": UNet}
    for name, cls in classes.items():
        assert type(resolve_run(name, "ci").build_model()) is cls, name
    k4 = resolve_run("ablation_k4", "cpu")
    assert k4.model.num_regions == 4 and k4.train.steps == 500 and k4.data.name == "shapes"
    deep = resolve_run("ddpm_shapes-deep-long", "cpu")
    assert (deep.model.num_res_blocks, deep.train.steps, deep.train.precision) == (2, 23_000,
                                                                                   "bf16")
    assert resolve_run("ddpm_shapes-deep-long", "ci").train.steps == get_profile("ci").train_steps
    pets = resolve_run("factorized_shapes", "ci", dataset="pets")
    assert pets.data.name == "pets" and pets.data.num_images is None
    with pytest.raises(ValueError, match="no run named 'nope'"):
        resolve_run("nope", "ci")


def test_a_run_seeds_its_initial_weights_and_leaves_the_global_generator_alone():
    run = resolve_run("factorized_shapes", "ci")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a, b = run.build_model(), run.build_model()
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    other = run.change("train.seed", 1).build_model()
    assert not torch.equal(a.encoder.conv_in.weight, other.encoder.conv_in.weight)


def test_load_run_trains_once_then_loads_from_cache(tmp_path, monkeypatch):
    from fdiff import runs as runs_module

    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path))
    ci = get_profile("ci")
    model, meta = load_run("ddpm_simple-shapes", profile=ci, progress=False)
    assert meta["steps"] == ci.train_steps and len(meta["losses"]) == ci.train_steps
    assert meta["run"] == resolve_run("ddpm_simple-shapes", ci).to_json()
    assert model.config.base_channels == ci.base_channels

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached checkpoint should have been loaded")

    monkeypatch.setattr(runs_module, "train_run", must_not_train)
    again, _ = load_run("ddpm_simple-shapes", profile="ci")
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_a_trained_factorized_run_carries_its_partition_snapshots(tmp_path, monkeypatch):
    from fdiff.factorized import masks_over_t
    from fdiff.seeding import make_generator, randn
    from fdiff.worlds import world

    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path))
    ci = get_profile("ci")
    model, meta = load_run("ablation_k2", profile=ci, progress=False)
    snap = meta["tensors"]
    steps = snap["snapshot_steps"].tolist()
    assert steps[0] == 0 and steps[-1] == 3 and steps == sorted(steps)
    n, ts = len(snap["snapshot_images"]), snap["snapshot_timesteps"].tolist()
    assert snap["snapshot_masks"].shape[3] == 1  # K - 1 stored: the last mask is implied
    masks = partition_snapshots(snap)
    assert masks.dtype == torch.uint8
    assert masks.shape == (len(steps), n, len(ts), 2, ci.image_size, ci.image_size)
    assert (masks.int().sum(3) == 255).all()  # K = 2: the two sum to 255 exactly
    probe = world("shapes", n, ci.image_size, split="test").batch(list(range(n)))["image"]
    torch.testing.assert_close(snap["snapshot_images"], probe)
    assert not torch.equal(masks[0], masks[-1])
    # the first snapshot is the run's initial model on the probe with its fixed noise
    untrained = resolve_run("ablation_k2", ci).build_model()
    schedule = resolve_run("ablation_k2", ci).schedule.build()
    noise = randn(probe.shape, make_generator(0))
    first = masks_over_t(untrained.eval(), schedule, probe, ts, noise)[:, :, 0]
    assert (masks[0][:, :, 0].int() - (first * 255).round().int()).abs().max() <= 1


def _committed(tmp_path, monkeypatch, run: Run, name: str = "ddpm_shapes") -> Path:
    """Publish a model of ``run`` under ``name`` in a stand-in committed folder."""
    monkeypatch.setenv("FDIFF_CHECKPOINTS", str(tmp_path / "committed"))
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    model = run.build_model()
    path = save_model(tmp_path / "committed" / f"{name}.safetensors", model,
                      extra={"run": run.to_json(), "steps": run.train.steps})
    register_checkpoint(name, path, f"python -m fdiff.train {name}", run=run.to_json())
    return path


def test_a_committed_checkpoint_is_used_exactly_when_its_run_matches(tmp_path, monkeypatch):
    from fdiff import runs as runs_module

    trained = []

    def fake_train(run, resume, *args, **kwargs):
        trained.append(run)
        return run.build_model(), {"run": run.to_json()}, {}

    monkeypatch.setattr(runs_module, "train_run", fake_train)
    run = resolve_run("ddpm_shapes", "ci")
    _committed(tmp_path, monkeypatch, run)
    model, meta = load_run("ddpm_shapes", "ci")
    assert trained == [] and meta["manifest"]["run"] == run.to_json()
    # Any other run under that name is trained (and cached), never served the committed one.
    for i, other in enumerate((run.change("train.steps", 3), run.change("model.num_heads", 2))):
        _committed(tmp_path, monkeypatch, other)
        monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / f"cache{i}"))
        load_run("ddpm_shapes", "ci")
    assert trained == [run, run]


def test_every_committed_checkpoint_holds_its_registered_run():
    manifest = read_manifest()
    assert manifest
    for name, entry in manifest.items():
        path = checkpoint_dir() / entry["file"]
        assert sha256_of(path) == entry["sha256"], name
        run = resolve_run(name, entry["profile"])
        assert entry["run"] == run.to_json(), name
        model, meta = load_model(path)
        # read as a Run: a checkpoint written before a field existed holds that field's default
        stored = to_json(from_json(Run, meta["run"]))
        assert stored == entry["run"] and to_json(model.config) == entry["run"]["model"], name
        assert len(meta["losses"]) == run.train.steps == meta["steps"], name
        words = shlex.split(entry["command"])
        assert words[:4] == ["python", "-m", "fdiff.train", name], name


def test_help_lists_every_registered_run():
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "fdiff.train",
                           "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m fdiff.train" in proc.stdout and "RuntimeWarning" not in proc.stderr
    for name, entry in RUNS.items():
        assert f"  {name} " in proc.stdout and entry.about in proc.stdout


def test_the_command_line_sets_fields_and_refuses_bad_ones(capsys):
    cli.main(["ablation_k3", "--profile", "ci", "--set", "model.unet.num_heads=2",
              "--set", "steps=9", "--show"])
    shown = json.loads(capsys.readouterr().out.split("\nfields:")[0])
    expected = resolve_run("ablation_k3", "ci").change("num_heads", 2).change("steps", 9)
    assert shown == expected.to_json()
    for argv, said in ((["nope"], "no run named 'nope'"),
                       (["ddpm_shapes", "--set", "steps"], "PATH=VALUE"),
                       (["ddpm_shapes", "--set", "colour=red"], "no field 'colour'"),
                       (["ddpm_shapes", "--set", "steps=many"], "steps must be int"),
                       (["ddpm_shapes", "--save-every", "0"], "--save-every must be >= 1")):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert said in capsys.readouterr().err


def test_the_training_command_extends_its_own_run_and_resumes_no_other(tmp_path, monkeypatch):
    from fdiff import cli as cli_module

    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    resumes = []
    real = cli_module.train_run

    def spy(run, resume, **kwargs):
        resumes.append((resume, resume.exists()))
        return real(run, resume, **kwargs)

    monkeypatch.setattr(cli_module, "train_run", spy)
    out = tmp_path / "out"
    args = ["ddpm_shapes", "--profile", "ci", "--out-dir", str(out), "--overwrite"]
    cli.main([*args, "--set", "steps=2"])
    first = load_model(out / "ddpm_shapes.safetensors")[1]["losses"]
    cli.main([*args, "--set", "steps=3"])  # more steps: continues the same run
    extended = load_model(out / "ddpm_shapes.safetensors")[1]["losses"]
    cli.main([*args, "--set", "steps=3", "--set", "train.seed=1"])  # another run: a new one
    (run_a, _), (run_b, resumed), (run_c, fresh_exists) = resumes
    assert run_a == run_b and resumed and extended[:2] == first and len(extended) == 3
    assert run_c != run_a and not fresh_exists


def test_the_recorded_command_reproduces_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out dir"  # a space, as in "My Drive" on Colab
    cli.main(["ddpm_simple-shapes", "--profile", "ci", "--out-dir", str(out), "--set",
              "steps=1", "--set", "train.precision=fp32", "--data-root", str(tmp_path / "a b")])
    entry = read_manifest(out)["ddpm_simple-shapes"]
    words = shlex.split(entry["command"])
    assert words[:3] == ["python", "-m", "fdiff.train"] and "--data-root" not in words
    capsys.readouterr()
    cli.main([*words[3:], "--show"])
    shown = json.loads(capsys.readouterr().out.split("\nfields:")[0])
    assert shown == entry["run"]


def test_without_out_dir_the_command_trains_what_load_run_then_loads(tmp_path, monkeypatch):
    from fdiff import runs as runs_module

    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path))
    cli.main(["ddpm_simple-shapes", "--profile", "ci"])
    path, resume = run_paths("ddpm_simple-shapes", resolve_run("ddpm_simple-shapes", "ci"))
    assert path.is_file() and resume.is_file()
    monkeypatch.setattr(runs_module, "train_run", lambda *a, **k: pytest.fail("trained again"))
    _, meta = load_run("ddpm_simple-shapes", "ci")
    assert meta["steps"] == get_profile("ci").train_steps


# A new option of the U-Net, written into a copy of the package: one field in UNetConfig and
# its use in the forward pass. Nothing else in the package is edited.
_FIELD = "    padding_mode: str = \"zeros\"\n"
_USE = "        return (out, features) if return_features else out\n"


def test_a_new_unet_option_is_one_edit_to_its_config(tmp_path):
    package = tmp_path / "fdiff"
    shutil.copytree(ROOT / "fdiff", package, ignore=shutil.ignore_patterns("__pycache__"))
    unet = (package / "unet.py").read_text()
    assert unet.count(_FIELD) == 1 and unet.count(_USE) == 1
    unet = unet.replace(_FIELD, _FIELD + "    output_scale: float = 1.0  # the new option\n")
    unet = unet.replace(_USE, "        out = out * self.config.output_scale\n" + _USE)
    (package / "unet.py").write_text(unet)
    edited = [p.name for p in sorted(package.glob("*.py"))
              if p.read_bytes() != (ROOT / "fdiff" / p.name).read_bytes()]
    assert edited == ["unet.py"]
    env = {"PYTHONPATH": str(tmp_path), "FDIFF_CACHE": str(tmp_path / "cache"),
           "PATH": "/usr/bin:/bin"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fdiff.train", "ddpm_simple-shapes", "--profile", "ci", "--set",
         "output_scale=0.5", "--set", "steps=2", "--out-dir", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((out / "manifest.json").read_text())["ddpm_simple-shapes"]
    assert entry["run"]["model"]["output_scale"] == 0.5
    check = ("import sys, json; from fdiff.checkpoints import load_model; "
             "from fdiff.runs import resolve_run; "
             "m, meta = load_model(sys.argv[1]); "
             "run = resolve_run('ddpm_simple-shapes', 'ci').change('output_scale', 0.5)"
             ".change('steps', 2); "
             "print(json.dumps([m.config.output_scale, meta['run'] == run.to_json(), "
             "run.digest() != resolve_run('ddpm_simple-shapes', 'ci').digest()]))")
    saved = out / "ddpm_simple-shapes.safetensors"
    proc = subprocess.run([sys.executable, "-c", check, str(saved)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [0.5, True, True]


def test_a_model_config_round_trips_through_json():
    from fdiff.factorized import FactorizedConfig

    cfg = FactorizedConfig(UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2,
                                      attention_levels=(1,)), num_regions=3, mode="concat")
    data = to_json(cfg)
    assert data["kind"] == "factorized" and data["unet"]["kind"] == "unet"
    assert from_json(FactorizedConfig, data) == cfg
    assert dataclasses.replace(cfg, num_regions=4) == from_json(
        FactorizedConfig, {**data, "num_regions": 4})


def test_masks_survive_their_json_form_to_within_half_a_step():
    import json

    from fdiff.configs import masks_from_json, masks_to_json

    masks = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    stored = json.loads(json.dumps(masks_to_json(masks)))
    back = masks_from_json(stored)
    assert back.shape == masks.shape and (back - masks).abs().max() <= 0.5 / 255 + 1e-6
