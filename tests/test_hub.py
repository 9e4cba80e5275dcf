"""fdiff.hub: published weights are downloaded by name (here from a local mirror, offline),
checked against their sha256 and used instead of training; without them load_run trains or,
asked not to, says what to do."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fdiff import runs as runs_module
from fdiff.checkpoints import CheckpointError, sha256_of
from fdiff.hub import fetch_published
from fdiff.profiles import get_profile
from fdiff.runs import load_run, resolve_run, run_paths

NAME = "ddpm_simple-shapes"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The ci run, trained once for this module's tests: (its checkpoint, the run)."""
    ci = get_profile("ci")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FDIFF_CACHE", str(tmp_path_factory.mktemp("publisher")))
        load_run(NAME, profile=ci, progress=False)
        run = resolve_run(NAME, ci)
        return run_paths(NAME, run)[0], run


@pytest.fixture
def mirror(trained, tmp_path, monkeypatch):
    """Publish the trained run in a local folder: return (published-table folder, weights
    file, run), with no committed checkpoint and an empty reader's cache."""
    checkpoint, run = trained
    server = tmp_path / "server"
    server.mkdir()
    weights = server / f"{NAME}-gpu.safetensors"
    shutil.copy(checkpoint, weights)
    table = tmp_path / "table"
    table.mkdir()
    (table / "published.json").write_text(json.dumps({NAME: {
        "digest": run.digest(), "url": weights.as_uri(), "sha256": sha256_of(weights)}}))
    monkeypatch.setenv("FDIFF_CHECKPOINTS", str(table))  # no committed run, this table
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "reader"))
    return table, weights, run


def _no_training(*args, **kwargs):
    raise AssertionError("published weights should have been downloaded, not trained")


def test_published_weights_are_downloaded_checked_and_used(mirror, monkeypatch, tmp_path):
    _, weights, run = mirror
    monkeypatch.setattr(runs_module, "train_run", _no_training)
    model, meta = load_run(NAME, profile="ci", progress=False)
    path, _ = run_paths(NAME, run)
    assert path.is_file() and sha256_of(path) == sha256_of(weights)
    assert meta["run"] == run.to_json()
    assert isinstance(model, torch.nn.Module)


def test_a_mirror_folder_replaces_the_published_location(mirror, monkeypatch, tmp_path):
    table, weights, run = mirror
    moved = tmp_path / "mirror"
    moved.mkdir()
    shutil.move(weights, moved / weights.name)  # the original URL is dead now
    monkeypatch.setenv("FDIFF_WEIGHTS_URL", moved.as_uri())
    monkeypatch.setattr(runs_module, "train_run", _no_training)
    load_run(NAME, profile="ci", progress=False)
    assert run_paths(NAME, run)[0].is_file()


def test_a_corrupt_download_is_refused_and_nothing_is_kept(mirror, tmp_path):
    table, weights, run = mirror
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    dest = tmp_path / "reader" / "w.safetensors"
    with pytest.raises(CheckpointError, match="sha256"):
        fetch_published(NAME, run.digest(), dest, progress=False, directory=table)
    assert not dest.exists() and not list(dest.parent.glob("*.tmp"))


def test_no_network_is_a_clear_error(mirror, monkeypatch, tmp_path):
    table, weights, run = mirror
    weights.unlink()  # as unreachable as a server without network
    with pytest.raises(ConnectionError, match="FDIFF_WEIGHTS_URL.*train=True"):
        fetch_published(NAME, run.digest(), tmp_path / "w.safetensors", progress=False,
                        directory=table)


def test_weights_of_another_run_are_not_used(mirror, tmp_path):
    table, _, run = mirror
    other = run.change("train.steps", run.train.steps + 1)
    assert fetch_published(NAME, other.digest(), tmp_path / "w", directory=table) is None


def test_without_published_weights_load_run_trains_or_says_how(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path))
    monkeypatch.setenv("FDIFF_CHECKPOINTS", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"train=True"):
        load_run(NAME, profile="ci", progress=False, train=False)
    load_run(NAME, profile="ci", progress=False)
    assert "no published weights" in capsys.readouterr().out
