"""Typed option sections: a frozen dataclass per section, built from a YAML mapping with errors
that name the key and the file. Sans-IO."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["build", "parse_duration", "parse_size"]

T = TypeVar("T")

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
               "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _split_unit(text: str) -> tuple[str, str]:
    text = text.strip().lower()
    i = len(text)
    while i and not (text[i - 1].isdigit() or text[i - 1] == "."):
        i -= 1
    return text[:i], text[i:].strip()


def parse_size(value: Any, key: str, source: str | None = None) -> int:
    """64, "64k", "10MiB" -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(key, "expected a size such as 65536 or '64KiB'", source=source)
    if isinstance(value, int):
        n = value
    else:
        num, unit = _split_unit(str(value))
        if unit not in _SIZE_UNITS or not num:
            raise ConfigError(key, f"expected a size such as 65536 or '64KiB', got {value!r}", source=source)
        try:
            n = int(float(num) * _SIZE_UNITS[unit])
        except ValueError:
            raise ConfigError(key, f"expected a size, got {value!r}", source=source) from None
    if n < 0:
        raise ConfigError(key, "must not be negative", source=source)
    return n


def parse_duration(value: Any, key: str, source: str | None = None) -> float:
    """5, 2.5, "500ms", "10m" -> seconds."""
    if isinstance(value, bool):
        raise ConfigError(key, "expected a duration such as 5 or '500ms'", source=source)
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        num, unit = _split_unit(str(value))
        if unit not in _DURATION_UNITS or not num:
            raise ConfigError(key, f"expected a duration such as 5, '500ms' or '10m', got {value!r}", source=source)
        try:
            n = float(num) * _DURATION_UNITS[unit]
        except ValueError:
            raise ConfigError(key, f"expected a duration, got {value!r}", source=source) from None
    if n < 0:
        raise ConfigError(key, "must not be negative", source=source)
    return n


def _convert(tp: Any, value: Any, key: str, source: str | None, meta: dict) -> Any:
    kind = meta.get("kind")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, key, source, meta)
        for a in non_none:
            try:
                return _convert(a, value, key, source, meta)
            except ConfigError:
                continue
        raise ConfigError(key, f"unexpected value {value!r}", source=source)
    if kind == "size":
        return parse_size(value, key, source)
    if kind == "duration":
        return parse_duration(value, key, source)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        return build(tp, value, prefix=key, source=source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0", ""):
            return False
        raise ConfigError(key, f"expected true or false, got {value!r}", source=source)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}", source=source)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected an integer, got {value!r}", source=source) from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}", source=source)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected a number, got {value!r}", source=source) from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(key, f"expected a string, got {type(value).__name__}", source=source)
        return str(value)
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(key, f"expected a file path, got {value!r}", source=source)
        return Path(value)
    if origin in (tuple, list, frozenset):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__}", source=source)
        item = args[0] if args else Any
        items = [_convert(item, v, f"{key}[{i}]", source, {}) for i, v in enumerate(value)]
        return origin(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__}", source=source)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v, f"{key}.{k}", source, {}) for k, v in value.items()}
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(str, args))}; got {value!r}", source=source)
        return value
    return value


def build(cls: type[T], section: Any, *, prefix: str, source: str | None = None) -> T:
    """Build dataclass `cls` from a mapping; unknown keys and bad values raise ConfigError.

    Field metadata {"kind": "size"|"duration"} parses human units. Validation in __post_init__
    may raise ConfigError with a bare key; it is re-raised with the prefix and source.
    """
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(prefix, f"expected a mapping, got {type(section).__name__}", source=source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for raw_key, value in section.items():
        name = str(raw_key).replace("-", "_")
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(key, f"unknown key (known: {known})", source=source)
        kwargs[name] = _convert(hints[name], value, key, source, dict(fields[name].metadata))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if e.source is None and not e.key.startswith(prefix):
            full = f"{prefix}.{e.key}" if prefix else e.key
            raise ConfigError(full, e.reason, source=source) from None
        raise
    except TypeError as e:
        raise ConfigError(prefix or "config", str(e), source=source) from None
