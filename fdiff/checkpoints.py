"""Checkpoints as safetensors plus JSON metadata, and the manifest of committed checkpoints.

A checkpoint file holds only tensors and a JSON string (the model's config, and for a trained
run the run itself and its training record): loading it never unpickles code. Committed
checkpoints are listed in ``data/checkpoints/manifest.json`` with their sha256, the run that
made them (its canonical JSON, :mod:`fdiff.runs`), the command and how long it ran;
:func:`load_pretrained` refuses a file whose hash does not match, and an entry without one.
Every file fdiff writes also carries the sha256 of its own tensors in its metadata, so that
self-trained checkpoints and resume files, which no manifest lists, are checked on loading too.
Writers never collide: each writes its own temporary file, and a manifest's read-modify-write
holds the manifest's lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from .configs import ConfigError, from_json, to_json
from .factorized import FactorizedConfig, factorized_denoiser
from .guidance import GuidedConfig, GuidedUNet
from .unet import UNet, UNetConfig

__all__ = [
    "ModelConfig",
    "build_model",
    "save_checkpoint",
    "load_checkpoint",
    "save_model",
    "load_model",
    "load_pretrained",
    "register_checkpoint",
    "read_manifest",
    "checkpoint_dir",
    "data_file",
    "sha256_of",
    "atomic_path",
    "ensure_writable",
    "CheckpointError",
]

_META_KEY = "fdiff"
_EXTRA = "extra."  # prefix of tensors stored beside a model's weights (e.g. training snapshots)

# The models a checkpoint can hold, by the config that describes them.
ModelConfig = UNetConfig | FactorizedConfig | GuidedConfig
_BUILDERS = {UNetConfig: UNet, FactorizedConfig: factorized_denoiser, GuidedConfig: GuidedUNet}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match its manifest entry."""


def build_model(config: ModelConfig) -> nn.Module:
    """Return a freshly initialised model of the kind ``config`` describes."""
    if type(config) not in _BUILDERS:
        raise TypeError(f"expected a UNetConfig, a FactorizedConfig or a GuidedConfig, got "
                        f"{type(config).__name__}")
    return _BUILDERS[type(config)](config)


def data_file(name: str) -> Path:
    """Return the path of a small committed result of the book, ``data/<name>`` beside the
    package (e.g. ``"emergence.json"``, written by ``scripts/emergence.py``)."""
    path = Path(__file__).resolve().parents[1] / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it is committed with the book's repository "
                                f"(install fdiff from a clone, or re-create it with its script)")
    return path


def checkpoint_dir() -> Path:
    """Return the committed checkpoints' folder: ``$FDIFF_CHECKPOINTS`` or ``data/checkpoints``."""
    env = os.environ.get("FDIFF_CHECKPOINTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data" / "checkpoints"


def sha256_of(path: str | Path) -> str:
    """Return the hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    """The process's umask (read by setting it, then setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success flush it and rename it over
    ``path``, on failure delete it.

    Every writer gets its own temporary name, so two writers never write into one file, and a
    crash leaves either the old file or the new one, never half of one. The file gets the
    permissions a plain ``open`` would give it (0o666 less the umask), not the temporary file's
    owner-only ones, so a cache or a results folder shared by a class stays readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check that a file can be written there; raise a
    PermissionError that names it otherwise (before a training, not after it)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fdiff-write-check-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"cannot write into {folder} ({err.strerror or err}): choose another folder "
            f"(FDIFF_CACHE for trained runs, --out-dir for published ones)"
        ) from err
    return folder


def content_sha256(tensors: dict[str, Tensor]) -> str:
    """Return the sha256 of named tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, tensors: dict[str, Tensor], metadata: dict) -> Path:
    """Write tensors and JSON-serialisable metadata to ``path`` atomically (:func:`atomic_path`),
    with the sha256 of the tensors in the metadata (``content_sha256``)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**metadata, "content_sha256": content_sha256(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(metadata)})
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`; return (tensors, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is corrupt or not a safetensors checkpoint ({err}); delete it and retrain, "
            f"or restore it from the repository"
        ) from err
    if raw is None:
        raise CheckpointError(f"{path} has no fdiff metadata: it was not written by fdiff")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} has unreadable metadata ({err})") from err
    recorded = metadata.get("content_sha256")
    if recorded is not None and recorded != content_sha256(tensors):
        raise CheckpointError(
            f"{path} does not hold the tensors it was written with (their sha256 differs from "
            f"the one recorded in the file): it was damaged; delete it and train again"
        )
    return tensors, metadata


def save_model(
    path: str | Path,
    model: nn.Module,
    extra: dict | None = None,
    tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Save a model's weights with its config, so that :func:`load_model` can rebuild it.

    extra: JSON-serialisable metadata; tensors: other tensors to keep with the weights (such as
    the mask snapshots taken during training), returned by :func:`load_model` as
    ``metadata["tensors"]``.
    """
    config = getattr(model, "config", None)
    if type(config) not in _BUILDERS:
        raise TypeError(
            f"cannot save a {type(model).__name__}: expected a model built from a UNetConfig, "
            f"a FactorizedConfig or a GuidedConfig"
        )
    metadata = {"kind": config.KIND, "config": to_json(config), **(extra or {})}
    state = {**model.state_dict(), **{_EXTRA + k: v for k, v in (tensors or {}).items()}}
    return save_checkpoint(path, state, metadata)


def load_model(path: str | Path, expected_sha256: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_model`; return (model in eval mode, metadata).

    With ``expected_sha256`` the file's hash is checked first. Tensors saved beside the weights
    are in ``metadata["tensors"]``.
    """
    path = Path(path)
    if expected_sha256 is not None and path.is_file():
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"{path} has sha256 {actual[:12]}..., but the manifest expects "
                f"{expected_sha256[:12]}...: the file is corrupt or was replaced"
            )
    tensors, meta = load_checkpoint(path)
    try:
        config = from_json(ModelConfig, meta.get("config"), "config")
    except ConfigError as err:
        raise CheckpointError(f"{path} holds no model config fdiff can build: {err}") from err
    model = build_model(config)
    if isinstance(meta.get("schedule"), dict) and "num_timesteps" in meta["schedule"]:
        model.num_timesteps = int(meta["schedule"]["num_timesteps"])  # its t must stay below
    extra = {k[len(_EXTRA) :]: v for k, v in tensors.items() if k.startswith(_EXTRA)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(_EXTRA)}
    meta["tensors"] = extra
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval(), meta


def _manifest_path(directory: Path | None = None) -> Path:
    return (directory or checkpoint_dir()) / "manifest.json"


_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_manifest(directory: str | Path | None = None) -> dict:
    """Return the manifest: ``{name: {file, sha256, run, command, duration_s, ...}}``.

    A manifest that is not a JSON object of entries, or an entry without a file name or a
    sha256, is refused with an error that names the manifest and the entry.
    """
    path = _manifest_path(Path(directory) if directory else None)
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err}); restore it from the repository") from err
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path} must hold a JSON object of entries, got {type(manifest)}")
    for name, entry in manifest.items():
        problem = None
        if not isinstance(entry, dict):
            problem = "is not a JSON object"
        elif not isinstance(entry.get("file"), str) or not entry["file"]:
            problem = "has no file name (key 'file')"
        elif not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            problem = f"has no valid sha256 (key 'sha256': {entry.get('sha256')!r})"
        if problem:
            raise CheckpointError(f"{path}: the entry {name!r} {problem}")
    return manifest


def register_checkpoint(name: str, path: str | Path, command: str, **info) -> dict:
    """Add or replace the manifest entry of a checkpoint file in the same folder.

    The read-modify-write holds the manifest's lock, so that concurrent registrations all
    land; readers see the old manifest or the new one, never a partial one.
    """
    path = Path(path)
    entry = {"file": path.name, "sha256": sha256_of(path), "command": command, **info}
    manifest_path = _manifest_path(path.parent)
    with FileLock(f"{manifest_path}.lock", timeout=120):
        manifest = read_manifest(path.parent)
        manifest[name] = entry
        text = json.dumps(dict(sorted(manifest.items())), indent=2) + "\n"
        with atomic_path(manifest_path) as tmp:
            tmp.write_text(text)
    return entry


def load_pretrained(name: str, directory: str | Path | None = None) -> tuple[nn.Module, dict]:
    """Load a committed checkpoint by name, checking its sha256; return (model, metadata)."""
    directory = Path(directory) if directory else checkpoint_dir()
    manifest = read_manifest(directory)
    if name not in manifest:
        raise CheckpointError(
            f"no checkpoint named {name!r} in {_manifest_path(directory)}; "
            f"available: {sorted(manifest) or 'none'}"
        )
    entry = manifest[name]
    path = directory / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint file {path} is listed in the manifest but missing; "
            f"recreate it with: {entry['command']}"
        )
    model, meta = load_model(path, expected_sha256=entry["sha256"])
    return model, {**meta, "manifest": entry}
