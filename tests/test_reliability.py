"""What a hostile but fair user tried: each case fails loudly and clearly, or works.

1. the input contract (float images in [-1, 1], finite); 2. committed checkpoints are never
overwritten by accident; 3. concurrent writers (processes) do not collide; 4. failures show up
before training, SIGTERM saves; 5. integrity checks cannot fail open; 6. edge input.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from fdiff import cli
from fdiff.baselines import colour_kmeans, grabcut, kmeans
from fdiff.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_model,
    load_pretrained,
    read_manifest,
    register_checkpoint,
    save_checkpoint,
    save_model,
)
from fdiff.data import from_uint8
from fdiff.factorized import FactorizedConfig, FactorizedDenoiser
from fdiff.features import DiffusionFeatures, sample_pixels
from fdiff.metrics import frechet_distance, mask_stats
from fdiff.probing import ProbeConfig, ProbeEnsemble
from fdiff.recognise import two_colour_split
from fdiff.samplers import ddim_invert, generate, sample
from fdiff.schedules import NoiseSchedule
from fdiff.segmentation import segment, segment_dataset
from fdiff.train import TrainConfig, train
from fdiff.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
UCFG = UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2)


class Images(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return UNet(UCFG).eval(), FactorizedDenoiser(FactorizedConfig(UCFG)).eval()


def _images(n=2, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- 1. The input contract -------------------------------------------------------------------


def test_uint8_images_are_refused_instead_of_becoming_pure_noise(models):
    unet, fact = models
    s = NoiseSchedule("cosine", 100)
    e = torch.randn(2, 3, 16, 16)
    uint8 = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(TypeError, match="from_uint8"):
        s.add_noise(uint8, e, torch.tensor([5, 5]))  # used to return e itself
    with pytest.raises(TypeError, match="float images in \\[-1, 1\\]"):
        segment(fact, s, uint8[:, :, :8, :8], 5, noise=e[:, :, :8, :8])
    with pytest.raises(TypeError, match="from_uint8"):
        DiffusionFeatures(unet, s, [0], [5], (3, 8, 8))(uint8[:, :, :8, :8])
    # The explicit conversion: 0 -> -1, 255 -> 1.
    assert from_uint8(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
    with pytest.raises(TypeError, match="uint8"):
        from_uint8(torch.zeros(2))


def test_images_outside_minus_one_to_one_are_refused_where_they_enter(models):
    unet, fact = models
    s = NoiseSchedule("cosine", 100)
    wide = _images() * 127.5 + 127.5  # [0, 255] as floats
    e = torch.randn_like(wide)
    t = torch.tensor([5, 5])
    for call in (lambda: s.add_noise(wide, e, t),
                 lambda: segment(fact, s, wide, 5, noise=e),
                 lambda: DiffusionFeatures(unet, s, [0], [5], (3, 8, 8))(wide),
                 lambda: next(ddim_invert(unet, s, wide, num_steps=5)),
                 lambda: grabcut(wide.expand(-1, -1, -1, -1)),
                 lambda: colour_kmeans(wide),
                 lambda: two_colour_split(wide)):
        with pytest.raises(ValueError, match=r"must lie in \[-1, 1\], got values from 0"):
            call()
    cfg = TrainConfig(steps=1, batch_size=2, precision="fp32")
    with pytest.raises(ValueError, match=r"the training images must lie in \[-1, 1\]"):
        train(UNet(UCFG), s, Images(wide), cfg, progress=False)


def test_a_batch_that_looks_like_zero_to_one_gets_a_warning():
    s = NoiseSchedule("cosine", 100)
    unit = (_images(8) + 1) / 2
    with pytest.warns(UserWarning, match=r"are they in \[0, 1\]"):
        s.add_noise(unit, torch.randn_like(unit), torch.full((8,), 5))


def test_nan_and_inf_are_refused(models):
    unet, _ = models
    s = NoiseSchedule("cosine", 100)
    x = _images()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    t = torch.tensor([5, 5])
    with pytest.raises(ValueError, match="x0 has 1 NaN or infinite values"):
        s.add_noise(bad, torch.randn_like(x), t)
    with pytest.raises(ValueError, match="eps has 1 NaN"):
        s.add_noise(x, bad, t)
    with pytest.raises(ValueError, match="xt has 1 NaN"):
        unet(bad.masked_fill(torch.isnan(bad), float("inf")), t)
    with pytest.raises(ValueError, match="xT has 1 NaN"):
        next(sample(unet, s, x.shape, xT=bad))
    # One NaN among the probe's features used to make it a constant classifier.
    X = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    y = (X[:, 0] > 0).long()
    X[7, 2] = float("nan")
    with pytest.raises(ValueError, match="X has 1 NaN"):
        ProbeEnsemble(4, 2, ProbeConfig(ensemble_size=1, max_epochs=1)).fit(X, y)


# -- 2. Committed checkpoints ----------------------------------------------------------------


@pytest.fixture
def committed(tmp_path, monkeypatch):
    """A copy of the committed ddpm_shapes checkpoint and manifest, as the package's folder."""
    folder = tmp_path / "committed"
    folder.mkdir()
    entry = read_manifest()["ddpm_shapes"]
    shutil.copy(ROOT / "data" / "checkpoints" / entry["file"], folder)
    (folder / "manifest.json").write_text(json.dumps({"ddpm_shapes": entry}, indent=2))
    monkeypatch.setenv("FDIFF_CHECKPOINTS", str(folder))
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    return folder


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_the_training_command_never_overwrites_a_committed_checkpoint_by_default(committed,
                                                                                capsys):
    before = _bytes(committed)
    cli.main(["ddpm_shapes", "--profile", "ci", "--set", "steps=2"])  # the repro
    assert _bytes(committed) == before  # it went to the cache
    with pytest.raises(SystemExit):
        cli.main(["ddpm_shapes", "--profile", "ci", "--set", "steps=2", "--out-dir",
                  str(committed)])
    assert "already published; pass --overwrite" in capsys.readouterr().err
    assert _bytes(committed) == before
    cli.main(["ddpm_shapes", "--profile", "ci", "--set", "steps=2", "--out-dir", str(committed),
              "--overwrite"])
    assert _bytes(committed) != before
    assert read_manifest(committed)["ddpm_shapes"]["run"]["train"]["steps"] == 2


# -- 3. Concurrent writers -------------------------------------------------------------------

_REGISTER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from fdiff.checkpoints import register_checkpoint
    folder, worker, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for i in range(n):
        register_checkpoint(f"{worker}-{i}", folder / "weights.bin", "python -m fdiff.train x")
""")

_READ = textwrap.dedent("""
    import sys, time, json
    from pathlib import Path
    from fdiff.checkpoints import read_manifest
    folder, stop = Path(sys.argv[1]), Path(sys.argv[2])
    bad = reads = 0
    while not stop.exists():
        try:
            if not read_manifest(folder):
                bad += 1
        except Exception:
            bad += 1
        reads += 1
    print(json.dumps([reads, bad]))
""")


def test_concurrent_manifest_registrations_all_land_and_readers_see_whole_manifests(tmp_path):
    (tmp_path / "weights.bin").write_bytes(os.urandom(1024))
    register_checkpoint("seed", tmp_path / "weights.bin", "python -m fdiff.train x")
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", _READ, str(tmp_path), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    writers = [subprocess.Popen([sys.executable, "-c", _REGISTER, str(tmp_path), f"w{k}", "40"])
               for k in range(4)]
    assert all(w.wait(timeout=300) == 0 for w in writers)
    stop.touch()
    reads, bad = json.loads(reader.communicate(timeout=60)[0])
    manifest = read_manifest(tmp_path)
    assert len(manifest) == 1 + 4 * 40  # none lost
    assert reads > 0 and bad == 0  # never an empty, truncated or half-written manifest


def test_concurrent_saves_of_one_file_never_crash_and_leave_a_whole_file(tmp_path):
    path = tmp_path / "run.safetensors"
    errors = []

    def writer(k):
        try:
            for i in range(20):
                save_checkpoint(path, {"w": torch.full((256,), float(k * 100 + i))}, {"k": k})
        except Exception as err:  # noqa: BLE001 - any failure is the finding
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    tensors, meta = load_checkpoint(path)  # whole, and one writer's
    assert tensors["w"].unique().numel() == 1
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_files_get_the_umask_permissions_not_owner_only_ones(tmp_path, mask):
    # files are written to a private temporary name and renamed: the result must still be as
    # readable as a plain open() makes it, for a cache or results folder shared by a class
    old = os.umask(mask)
    try:
        save_checkpoint(tmp_path / "run.safetensors", {"w": torch.zeros(2)}, {})
        register_checkpoint("run", tmp_path / "run.safetensors", "python -m fdiff.train run")
    finally:
        os.umask(old)
    for name in ("run.safetensors", "manifest.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


_SLOW_TRAINER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from fdiff.schedules import NoiseSchedule
    from fdiff.train import TrainConfig, train
    from fdiff.unet import UNet, UNetConfig
    ckpt, marker, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    data = [{"image": im} for im in x]
    model = UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2))
    def tick(step, result):
        if step == 3:
            marker.touch()
        time.sleep(0.1)
    cfg = TrainConfig(steps=steps, batch_size=4, warmup_steps=2, precision="fp32")
    train(model, NoiseSchedule("linear", 100), data, cfg, checkpoint=ckpt, progress=False,
          callback=tick, save_every=1000)
""")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "trainer exited"
        assert time.monotonic() - start < timeout, "the trainer never reached step 3"
        time.sleep(0.05)


def test_a_second_trainer_of_one_run_is_refused_while_the_first_runs(tmp_path):
    ckpt, marker = tmp_path / "run.safetensors", tmp_path / "at-step-3"
    first = subprocess.Popen([sys.executable, "-c", _SLOW_TRAINER, str(ckpt), str(marker), "40"],
                             stderr=subprocess.PIPE, text=True)
    _wait_for(marker, first)
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    cfg = TrainConfig(steps=40, batch_size=4, warmup_steps=2, precision="fp32")
    with pytest.raises(RuntimeError, match="another process is training into"):
        train(UNet(UCFG), NoiseSchedule("linear", 100), Images(x), cfg, checkpoint=ckpt,
              progress=False)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert load_checkpoint(ckpt)[1]["step"] == 40


# -- 4. Failures that showed up too late -----------------------------------------------------


def test_sigterm_saves_the_progress_and_the_run_resumes_exactly(tmp_path):
    ckpt, marker = tmp_path / "run.safetensors", tmp_path / "at-step-3"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_TRAINER, str(ckpt), str(marker), "400"],
                            stderr=subprocess.PIPE, text=True)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    assert "Terminated" in proc.stderr.read()
    saved = load_checkpoint(ckpt)[1]["step"]
    assert 3 <= saved < 400  # saved on SIGTERM, with no periodic save before it
    # Resumed here to 12 steps, it equals 12 steps trained straight.
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    data = [{"image": im} for im in x]
    cfg = TrainConfig(steps=max(12, saved + 2), batch_size=4, warmup_steps=2, precision="fp32")
    torch.manual_seed(0)
    straight = train(UNet(UCFG), NoiseSchedule("linear", 100), data, cfg, progress=False)
    resumed = train(UNet(UCFG), NoiseSchedule("linear", 100), data, cfg, checkpoint=ckpt,
                    progress=False)
    assert resumed.losses == straight.losses
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_an_unwritable_cache_is_reported_before_training(tmp_path, monkeypatch, capsys):
    from fdiff import cli as cli_module

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FDIFF_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(cli_module, "train_run", lambda *a, **k: pytest.fail("trained anyway"))
    with pytest.raises(SystemExit):
        cli.main(["ddpm_simple-shapes", "--profile", "ci", "--out-dir", str(tmp_path / "out")])
    assert "cannot write into" in capsys.readouterr().err


def test_a_resume_file_that_cannot_be_written_costs_a_warning_not_the_model(tmp_path,
                                                                            monkeypatch):
    from fdiff import train as train_module

    def full_disk(self, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_module._State, "save", full_disk)
    cfg = TrainConfig(steps=3, batch_size=4, precision="fp32")
    with pytest.warns(UserWarning, match="could not write the resume file"):
        result = train(UNet(UCFG), NoiseSchedule("linear", 100), Images(_images(8)), cfg,
                       checkpoint=tmp_path / "run.safetensors", progress=False, save_every=1)
    assert result.step == 3 and len(result.losses) == 3


def test_the_save_interval_is_a_command_line_option(tmp_path, monkeypatch):
    from fdiff import cli as cli_module

    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path))
    seen = {}
    monkeypatch.setattr(cli_module, "train_run",
                        lambda run, resume, **k: seen.update(k) or pytest.skip("seen"))
    with pytest.raises(pytest.skip.Exception):
        cli.main(["ddpm_shapes", "--profile", "ci", "--save-every", "7"])
    assert seen["save_every"] == 7


# -- 5. Integrity ----------------------------------------------------------------------------


def test_a_manifest_entry_without_a_hash_is_refused(committed):
    manifest = json.loads((committed / "manifest.json").read_text())
    manifest["ddpm_shapes"]["sha256"] = None
    (committed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="'ddpm_shapes' has no valid sha256"):
        load_pretrained("ddpm_shapes")


def test_a_manifest_that_is_not_json_or_lacks_a_key_names_the_file(committed):
    path = committed / "manifest.json"
    path.write_text('{"ddpm_shapes": {"file": "x"')
    with pytest.raises(CheckpointError, match=f"{path} is not valid JSON"):
        read_manifest(committed)
    path.write_text('{"ddpm_shapes": {"sha256": "' + "0" * 64 + '"}}')
    with pytest.raises(CheckpointError, match=r"json: the entry 'ddpm_shapes' has no file"):
        read_manifest(committed)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor's data
    path.write_bytes(bytes(data))


def test_damaged_self_trained_and_resume_files_are_refused(tmp_path):
    torch.manual_seed(0)
    path = save_model(tmp_path / "cached.safetensors", UNet(UCFG))
    load_model(path)
    _flip_last_byte(path)
    with pytest.raises(CheckpointError, match="does not hold the tensors it was written with"):
        load_model(path)
    ckpt = tmp_path / "run.safetensors"
    cfg = TrainConfig(steps=2, batch_size=4, precision="fp32")
    train(UNet(UCFG), NoiseSchedule("linear", 100), Images(_images(8)), cfg, checkpoint=ckpt,
          progress=False)
    _flip_last_byte(ckpt)
    with pytest.raises(CheckpointError, match="does not hold the tensors"):
        train(UNet(UCFG), NoiseSchedule("linear", 100), Images(_images(8)),
              TrainConfig(steps=4, batch_size=4, precision="fp32"), checkpoint=ckpt,
              progress=False)


# -- 6. Edge input ---------------------------------------------------------------------------


def test_nan_into_clustering_and_frechet_distance_is_a_value_error():
    x = torch.randn(10, 3)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="x has 1 NaN"):
        kmeans(x, 2)
    img = _images()
    img[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images has 1 NaN"):
        colour_kmeans(img)
    with pytest.raises(ValueError, match="a has 1 NaN"):
        frechet_distance(x, torch.randn(10, 3))


def test_degenerate_sizes_are_refused_with_a_reason(models):
    _, fact = models
    with pytest.raises(ValueError, match="K >= 2 regions"):
        mask_stats(torch.ones(2, 1, 4, 4))
    with pytest.raises(ValueError, match="dataset without images"):
        segment_dataset(fact, NoiseSchedule("cosine", 100), Images(torch.zeros(0, 3, 8, 8)), 5,
                        progress=False)
    with pytest.raises(ValueError, match="at least one image, got an empty one"):
        train(UNet(UCFG), NoiseSchedule("cosine", 100), Images(torch.zeros(0, 3, 8, 8)),
              TrainConfig(steps=1, batch_size=2), progress=False)
    with pytest.raises(ValueError, match="groups must be an int >= 1, got 0"):
        UNetConfig(groups=0)
    with pytest.raises(ValueError, match="pixels_per_image must be an int >= 1, got -5"):
        sample_pixels(lambda x: x, [{"image": torch.zeros(3, 4, 4),
                                     "semantic": torch.zeros(4, 4, dtype=torch.long)}], [0],
                      pixels_per_image=-5, progress=False)


def test_the_probe_takes_float64_features_and_int32_labels():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 4, generator=g)
    y = (X[:, 0] > 0).long()
    cfg = ProbeConfig(ensemble_size=2, max_epochs=3)
    plain = ProbeEnsemble(4, 2, cfg).fit(X, y).predict(X)[0]
    other = ProbeEnsemble(4, 2, cfg).fit(X.double(), y.int()).predict(X.double())[0]
    assert torch.equal(plain, other)
    with pytest.raises(TypeError, match="integer labels"):
        ProbeEnsemble(4, 2, cfg).fit(X, y.float())


def test_silent_coercions_are_refused(models, tmp_path):
    unet, fact = models
    s = NoiseSchedule("cosine", 100)
    x = _images()
    for t in (3.9, "3", True):
        with pytest.raises(ValueError, match=r"t must be an int in \[0, 100\)"):
            segment(fact, s, x, t)
    with pytest.raises(TypeError, match="num_steps must be an int, got True"):
        generate(unet, s, x.shape, num_steps=True)
    for eta in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eta must be a finite number"):
            generate(unet, s, x.shape, num_steps=5, eta=eta)
    with pytest.raises(TypeError, match="steps must be an int, got float 2.5"):
        TrainConfig(steps=2.5, batch_size=4)
    with pytest.raises(ValueError, match="t must be >= 0"):
        unet(x, torch.tensor([-1, 5]))
    # A model loaded from a checkpoint knows its chain: t beyond it is refused.
    path = save_model(tmp_path / "m.safetensors", unet,
                      extra={"schedule": {"kind": "cosine", "num_timesteps": 100}})
    loaded, _ = load_model(path)
    with pytest.raises(ValueError, match=r"t must be >= 0 and < T = 100; got values from 5 to 100"):
        loaded(x, torch.tensor([5, 100]))


def test_a_damaged_dataset_image_is_named(tmp_path):
    from standins import make_pets

    from fdiff.datasets import OxfordPets

    root = make_pets(tmp_path)
    image = root / "oxford-iiit-pet" / "images" / "Abyssinian_1.jpg"
    image.write_bytes(image.read_bytes()[:100])  # truncated
    with pytest.raises(OSError, match="Abyssinian_1.jpg"):
        OxfordPets(root, image_size=16)[0]


def test_dataset_errors_say_what_went_wrong(tmp_path, monkeypatch):
    import torchvision

    from fdiff.datasets import DatasetNotFoundError, OxfordPets

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(torchvision.datasets, "OxfordIIITPet", read_only)
    with pytest.raises(PermissionError, match="cannot write into") as info:
        OxfordPets(tmp_path, download=True)
    assert "internet" not in str(info.value)

    def missing_package(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    monkeypatch.setattr(torchvision.datasets, "OxfordIIITPet", missing_package)
    with pytest.raises(ImportError, match="pip install scipy"):
        OxfordPets(tmp_path, download=True)
    monkeypatch.undo()
    with pytest.raises(DatasetNotFoundError, match="--download"):  # the command's flag, too
        OxfordPets(tmp_path / "nowhere")
