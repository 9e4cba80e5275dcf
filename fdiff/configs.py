"""Frozen dataclass configs as canonical JSON, and changes to them by dotted field path.

Every config of the package (``UNetConfig``, ``FactorizedConfig``, ``TrainConfig``, a run's
data and schedule) is a frozen dataclass. This module turns any of them into plain JSON values
and back, and changes one field deep inside a nest of them from a path and a value::

    to_json(run)                                   # {"model": {...}, "train": {...}, ...}
    change(run, "model.num_res_blocks", 2)         # dataclasses.replace, all the way down
    change(run, "train.steps", "5000")             # text is read as JSON, then type-checked

Nothing here knows a field by name: a new field of a config is written, read, hashed and set
from the command line without further code.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import types
import typing
from typing import Any, Union

import torch

__all__ = ["to_json", "from_json", "change", "field_paths", "canonical", "ConfigError",
           "masks_to_json", "masks_from_json"]


class ConfigError(ValueError):
    """A config value or field path that does not fit the dataclass it is meant for."""


def to_json(config: Any) -> Any:
    """Return ``config`` (a dataclass, or a value inside one) as JSON-serialisable values.

    A field may hold one of several dataclasses (a run's model config): a class that declares
    ``KIND`` is written with a ``"kind"`` key so that :func:`from_json` knows which to build.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        out = {f.name: to_json(getattr(config, f.name)) for f in dataclasses.fields(config)}
        kind = getattr(type(config), "KIND", None)
        return {"kind": kind, **out} if kind else out
    if isinstance(config, (tuple, list)):
        return [to_json(v) for v in config]
    return config


def canonical(config: Any) -> str:
    """Return the canonical JSON text of a config: sorted keys, no spaces (what is hashed)."""
    return json.dumps(to_json(config), sort_keys=True, separators=(",", ":"))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _options(tp: Any) -> tuple[Any, ...]:
    """The members of a union type (``int | None``), or the type itself."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return (tp,)


def _describe(tp: Any) -> str:
    return " or ".join(getattr(t, "__name__", str(t)) for t in _options(tp)).replace("NoneType",
                                                                                    "null")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` (JSON) as type ``tp``, or raise a ConfigError that names ``where``."""
    errors = []
    for option in _options(tp):
        try:
            return _convert_one(value, option, where)
        except ConfigError as err:
            errors.append(str(err))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    raise ConfigError(f"{where} must be {_describe(tp)}, got {value!r}")


def _convert_one(value: Any, tp: Any, where: str) -> Any:
    if tp is type(None):
        if value is None:
            return None
    elif tp is Any:
        return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_json(tp, value, where)
    elif typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in
                             enumerate(zip(value, args)))
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{where} has a type configs cannot hold: {tp}")
    raise ConfigError(f"{where} must be {_describe(tp)}, got {value!r}")


def _subclasses(cls: type) -> dict[str, type]:
    """The dataclasses a field typed ``cls`` (or a union) may hold, by their ``KIND``."""
    return {c.KIND: c for c in _options(cls) if getattr(c, "KIND", None)}


def from_json(cls: Any, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` (or, for a union of kinds, the one ``data["kind"]`` names) from
    JSON values. Unknown keys are refused; missing keys take the field's default."""
    kinds = _subclasses(cls)
    if kinds:
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind is None and len(_options(cls)) == 1:  # one class: its kind goes without saying
            kind = next(iter(kinds))
        if kind not in kinds:
            raise ConfigError(f"{where}.kind must be one of {sorted(kinds)}, got {kind!r}")
        cls = kinds[kind]
        data = {k: v for k, v in data.items() if k != "kind"} if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object for {cls.__name__}, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where} has no field {unknown[0]!r} ({cls.__name__} fields: "
                          f"{', '.join(sorted(names))})")
    values = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def field_paths(config: Any, prefix: str = "") -> dict[str, Any]:
    """Return ``{dotted path: type}`` of every leaf field of a dataclass instance."""
    out = {}
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(field_paths(value, path + "."))
        else:
            out[path] = hints[f.name]
    return out


def _resolve(config: Any, path: str) -> str:
    """Return the full dotted path that ``path`` names: itself, or the one leaf it ends."""
    paths = field_paths(config)
    if path in paths:
        return path
    matches = [p for p in paths if p.endswith("." + path)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"{path!r} is ambiguous: say one of {', '.join(sorted(matches))}")
    raise ConfigError(f"no field {path!r}; the fields are: {', '.join(paths)}")


def change(config: Any, path: str, value: Any) -> Any:
    """Return ``config`` with the field at ``path`` set to ``value``.

    ``path`` is dotted (``"model.unet.padding_mode"``) or the last part of exactly one such
    path (``"padding_mode"``). A ``str`` value for a field that is not a string is read as JSON
    first (``"2"``, ``"[1, 2]"``, ``"null"``, ``"true"``), so command-line text works as is.
    """
    full = _resolve(config, path)
    return _set(config, full.split("."), value, full)


def _set(config: Any, parts: list[str], value: Any, full: str) -> Any:
    head = parts[0]
    if len(parts) > 1:
        return dataclasses.replace(config, **{head: _set(getattr(config, head), parts[1:],
                                                         value, full)})
    tp = _hints(type(config))[head]
    if isinstance(value, str) and str not in _options(tp):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"{full} must be {_describe(tp)}, got {value!r}") from None
    converted = _convert(value, tp, full)
    try:
        return dataclasses.replace(config, **{head: converted})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{full}: {err}") from err


def masks_to_json(masks: torch.Tensor) -> dict:
    """Soft masks (..., H, W) in [0, 1] as a small JSON object: uint8 steps of 1/255, base64."""
    u8 = (masks.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()
    return {"shape": list(u8.shape),
            "uint8_base64": base64.b64encode(u8.numpy().tobytes()).decode("ascii")}


def masks_from_json(encoded: dict) -> torch.Tensor:
    """The masks :func:`masks_to_json` stored, as float in [0, 1] (within half a 1/255 step)."""
    raw = bytearray(base64.b64decode(encoded["uint8_base64"]))
    return torch.frombuffer(raw, dtype=torch.uint8).reshape(encoded["shape"]).float() / 255
