"""Typed construction of nested dataclasses from plain data, with errors that name the key.

Kept apart from config.py so the schema (what the fields are) and the machinery (how plain
YAML becomes typed dataclasses) can each be read in one look.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, Literal, get_args, get_origin

import yaml

from semiseg.errors import ConfigError


def show(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, for messages: a fuzzed or pasted value can be
    huge, and repr() of an int over 4300 digits raises ValueError instead of printing."""
    try:
        text = repr(value)
    except ValueError:
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, with every way it can fail (bad syntax, an int over Python's 4300-digit
    limit, nesting deeper than the recursion limit) turned into a ConfigError naming `where`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{where}: cannot parse the YAML ({type(exc).__name__}: "
                          f"{str(exc)[:200]})") from None


def build(cls: type, data: Any, prefix: str, source: str) -> Any:
    """Instantiate dataclass `cls` from `data`, checking every key and value type."""
    where = prefix.rstrip(".") or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {show(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix + str(unknown[0])!r}; valid keys: "
            + ", ".join(prefix + n for n in names)
        )
    kwargs = {k: coerce(v, hints[k], prefix + k, source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against type `hint`; ints are accepted where floats are expected."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".", source)
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(
                f"{source}: {key}={show(value)} is not a valid choice; choose one of: "
                + ", ".join(map(str, choices))
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}={show(value)}: expected a list")
        (item,) = get_args(hint)
        return [coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}={show(value)}: expected a mapping")
        _, item = get_args(hint)
        return {str(k): coerce(v, item, f"{key}.{k}", source) for k, v in value.items()}
    return _scalar(value, hint, key, source)


def _scalar(value: Any, hint: Any, key: str, source: str) -> Any:
    if hint is Any:
        return value
    if hint is float and isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        value = float(value)  # PyYAML (YAML 1.1) reads 1e-3, without a dot, as a string
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if ok is None:
        raise TypeError(f"config field {key} has an unsupported type {hint}")
    if not ok:
        raise ConfigError(f"{source}: {key}={show(value)}: expected {hint.__name__}")
    if hint is float:
        # No field means anything at NaN or infinity, and `nan <= 0` is False, so a NaN would
        # slip past every range check in __post_init__.
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key}={show(value)}: expected a finite number")
    return value


def coerce_override(data: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override to nested plain data; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {show(item)}: expected key=value, e.g. train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw  # e.g. a path with a ': ' in it: taken as the plain string
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"override {show(item)}: cannot parse the value ({type(exc).__name__})") from None
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:  # a missing or empty (`train:`) section
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override {show(item)}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and empty mappings stay as values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
