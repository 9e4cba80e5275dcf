import json

import pytest
import torch

from fdiff.checkpoints import (
    CheckpointError,
    checkpoint_dir,
    load_checkpoint,
    load_model,
    load_pretrained,
    read_manifest,
    register_checkpoint,
    save_model,
)
from fdiff.unet import UNet, UNetConfig


def test_model_round_trip(tmp_path, tiny_unet):
    path = save_model(tmp_path / "m.safetensors", tiny_unet, extra={"steps": 7})
    loaded, meta = load_model(path)
    assert meta["steps"] == 7 and meta["kind"] == "unet"
    assert loaded.config == tiny_unet.config
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([3])
    torch.testing.assert_close(loaded(x, t), tiny_unet(x, t), rtol=0, atol=0)


def test_a_replicate_padded_factorized_model_round_trips(tmp_path):
    from fdiff.factorized import FactorizedConfig, FactorizedDenoiser

    torch.manual_seed(0)
    unet = UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2,
                      padding_mode="replicate")
    model = FactorizedDenoiser(FactorizedConfig(unet)).eval()
    loaded, _ = load_model(save_model(tmp_path / "f.safetensors", model))
    assert loaded.config.unet.padding_mode == "replicate"
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([3])
    torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)


def test_file_holds_no_pickle(tmp_path, tiny_unet):
    path = save_model(tmp_path / "m.safetensors", tiny_unet)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["fdiff"])["config"]["base_channels"] == 16
    # nothing but the JSON header and the raw tensor bytes it indexes: no room for a pickle
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    assert 8 + header_len + max(ends) == path.stat().st_size
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} <= {"F32", "I64", "U8"}


def test_manifest_checks_sha256(tmp_path, tiny_unet):
    path = save_model(tmp_path / "m.safetensors", tiny_unet)
    entry = register_checkpoint("tiny", path, command="python -m fdiff.train ...", duration_s=1.0)
    assert read_manifest(tmp_path)["tiny"]["sha256"] == entry["sha256"]
    model, meta = load_pretrained("tiny", tmp_path)
    assert meta["manifest"]["command"].startswith("python -m fdiff.train")
    # Replace the file by another valid model: the hash no longer matches.
    save_model(path, UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2)))
    with pytest.raises(CheckpointError, match="sha256"):
        load_pretrained("tiny", tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint named 'nope'"):
        load_pretrained("nope", tmp_path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="recreate it with"):
        load_pretrained("tiny", tmp_path)


def test_corrupt_checkpoint_is_refused(tmp_path, tiny_unet):
    path = save_model(tmp_path / "m.safetensors", tiny_unet)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(path)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")


def test_committed_manifest_entries_are_complete():
    manifest = read_manifest()
    assert "ddpm_shapes" in manifest and "factorized_shapes" in manifest
    for name, entry in manifest.items():
        assert {"file", "sha256", "command", "duration_s", "run", "profile"} <= set(entry), name
        assert entry["command"].startswith("python -m fdiff.train")
        assert (checkpoint_dir() / entry["file"]).is_file(), name


def test_data_file_finds_committed_results_and_names_a_missing_one():
    from fdiff.checkpoints import data_file

    assert data_file("references.bib").name == "references.bib"
    with pytest.raises(FileNotFoundError, match="no-such.json is missing"):
        data_file("no-such.json")
