"""Configs to and from plain data: YAML files, ``KEY=VALUE`` overrides parsed as YAML scalars, dataclasses
filled from nested dicts with one-line errors naming the key, and back to plain values and JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import typing
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from equiseg.data.augment import AugmentConfig


class ConfigError(ValueError):
    """A bad config value or key; the message names it."""


def read_yaml(path: Path | str) -> dict[str, Any]:
    """A YAML file's mapping ({} for an empty file); not YAML, or not a mapping, is a ConfigError."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML{_where(error)}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a text file (byte {error.start} is not UTF-8)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    return data


def _where(error: yaml.YAMLError) -> str:
    """Where and why a YAML file fails to parse, in one line: " at line L, column C: problem
    (context on line K)".
    """
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:
        return f" ({' '.join(str(error).split())})"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    opened = f" ({context} that starts on line {context_mark.line + 1})" if context and context_mark else ""
    return f" at line {mark.line + 1}, column {mark.column + 1}: {' '.join(str(problem).split())}{opened}"


def from_plain(cls: type, data: Any, where: str = "") -> Any:
    """An instance of the dataclass ``cls`` from builtin values (as YAML gives them), each field
    converted to its annotated type (nested dataclasses, enums, optional and tuple fields); an
    unknown key, a missing field or a wrong value is a `ConfigError` naming it.
    """
    return _from_plain(cls, data, where)


def path_override(key: str, path: Path | str) -> str:
    """The override ``key=path`` with the path quoted, so that YAML reads it as the string it is
    (``null``, ``#``, ``: `` and leading spaces included), never as another value.
    """
    return f"{key}={json.dumps(str(path))}"


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to nested dicts (values parsed as YAML scalars)."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (for example train.epochs=5)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    return value


def plain(value: Any) -> Any:
    """``value`` as builtin values that YAML, JSON and ``torch.load(weights_only=True)`` take:
    dataclasses as dicts (augmentation as its own dict form), tuples as lists, enums by value,
    paths as strings, numpy scalars as Python numbers, and NaN as None (the one place NaN
    becomes null; readers turn it back).
    """
    if isinstance(value, AugmentConfig):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else float(value)
    return value


def json_text(value: Any) -> str:
    """``value`` (see `plain`) as indented JSON text with a final newline; never a NaN token."""
    return json.dumps(plain(value), indent=1, allow_nan=False) + "\n"


def _from_plain(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where or 'config'}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, raw in data.items():
        key = f"{where}.{name}" if where else name
        default = getattr(cls(), name) if _has_defaults(cls) else None
        kwargs[name] = _convert(default, raw, key, hints[name])
    try:
        return cls(**kwargs)
    except TypeError as error:  # a field without default missing
        missing = [f.name for f in fields.values() if f.name not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"{where or 'config'}: needs {', '.join(missing)} ({error})") from None
    except ValueError as error:  # the section's own checks name the key already
        named = where and str(error).startswith(f"{where}.")
        raise ConfigError(str(error) if named else f"{where or 'config'}: {error}") from None


def _has_defaults(cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def _convert(default: Any, raw: Any, key: str, hint: Any) -> Any:
    """``raw`` (a YAML value) as the field's type ``hint`` (``int``, ``float | None``, an enum, a
    nested dataclass, ...); the default tells augmentation presets and nested sections apart.
    """
    args = typing.get_args(hint)
    optional = type(None) in args
    kind = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not tuple else hint
    try:
        if isinstance(default, AugmentConfig):
            return AugmentConfig.preset(raw) if isinstance(raw, str) else AugmentConfig.from_dict(raw)
        if dataclasses.is_dataclass(default):
            return _from_plain(type(default), raw, key)
        if isinstance(raw, dict) and isinstance(kind, type) and dataclasses.is_dataclass(kind):  # an optional section
            return _from_plain(kind, raw, key)
        if raw is None:
            if not optional:
                raise ConfigError(f"{key}: may not be empty")
            return None
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            choices = [member.value for member in kind]
            if raw not in choices:
                raise ConfigError(f"{key}: {raw!r} is not one of {', '.join(map(str, choices))}")
            return kind(raw)
        if typing.get_origin(kind) is tuple:  # tuple[X, ...]: each item as an X
            item = typing.get_args(kind)[0]
            items = raw if isinstance(raw, (list, tuple)) else (raw,)
            return tuple(_convert(None, value, f"{key}[{i}]", item) for i, value in enumerate(items))
        if kind is bool:
            if not isinstance(raw, bool):
                raise ConfigError(f"{key}: expected true or false, got {raw!r}")
            return raw
        if kind is float:
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                raise ConfigError(f"{key}: expected a number, got {raw!r}")
            return float(raw)
        if kind is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise ConfigError(f"{key}: expected an integer, got {raw!r}")
            return raw
        if kind is str:
            return str(raw)
        return raw
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"{key}: {error}") from None
