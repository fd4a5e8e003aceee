"""A stage's config from its sources: the dataclass defaults, a YAML/JSON ``--config`` file, then the flags and
``--set key=value`` items, later ones winning; every value checked against its field's declared type.

    cfg = load_config(TrainConfig, "configs/reference.yaml", {"lr": 1e-4, "curriculum": {"kd": 0.5}})

A wrong value is a ``ConfigError`` that names the key and what it expects (``lr = 'abc': expected a number``);
unknown keys are refused with the known ones listed. The flags themselves are built in flags.py.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from distill.config import ConfigError

C = TypeVar("C")


def parse_set_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "curriculum.kd=0.5"]`` -> nested dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value — for example --set lr=1e-4")
        key, raw = item.split("=", 1)
        target = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item!r}: {p} is set twice, as a value and as a group")
        target[leaf] = parse_value(raw)
    return out


def merge_set_overrides(flags: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """The flags given (non-None) and ``--set`` items in one override dict. A key may come from either; given
    by both with different values it is refused."""
    merged = parse_set_overrides(items)
    for key, value in flags.items():
        if value is None:
            merged.setdefault(key, None)
            continue
        if merged.get(key) is not None and merged[key] != value:
            raise ConfigError(
                f"{key} is given twice, as --{key.replace('_', '-')} {value} and --set {key}={merged[key]} — keep one"
            )
        merged[key] = value
    return merged


def parse_value(raw: str) -> Any:
    """int, then float (YAML 1.1 reads ``1e-4`` as a string), then YAML (lists, bools, null, strings)."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    if raw.strip().lower() in ("on", "off", "yes", "no", "y", "n"):  # YAML 1.1 would make these booleans
        return raw.strip()
    return yaml.safe_load(raw)


def describe_type(hint: Any) -> str:
    """Words for a field's type, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        arms = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(arms) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        if origin is tuple and len(args) == 2 and args[1] is not Ellipsis:
            return f"a pair [{describe_type(args[0])}, {describe_type(args[1])}]".replace("a number", "number")
        return f"a list of {describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if dataclasses.is_dataclass(hint):
        return "a group of settings (key: value)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def coerce_field(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against (and converted to) a field's declared type; ConfigError naming the key if not."""

    def bad() -> ConfigError:
        return ConfigError(f"{key} = {value!r}: expected {describe_type(hint)} — fix it in --set or the config file")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms:
            try:
                return coerce_field(key, value, arm)
            except ConfigError:
                continue
        raise bad()
    if value is None:
        raise bad()
    if origin in (list, tuple):
        items = [value] if isinstance(value, str) and origin is tuple and args[-1] is Ellipsis else value
        if not isinstance(items, (list, tuple)):
            raise bad()
        if origin is tuple and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise bad()
            return tuple(coerce_field(key, v, a) for v, a in zip(items, args))
        out = [coerce_field(key, v, args[0]) for v in items]
        return tuple(out) if origin is tuple else out
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise bad()
        return build_dataclass(hint, value, prefix=f"{key}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if hint in (int, float):
        number = parse_value(value) if isinstance(value, str) else value  # YAML 1.1 reads 1e-4 as a string
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise bad()
        if hint is int:
            if isinstance(number, float) and not number.is_integer():
                raise bad()
            return int(number)
        return float(number)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. --set device=0 would be read as a number
        raise bad()
    return value


def build_dataclass(cls: type[C], values: dict[str, Any], prefix: str = "") -> C:
    """``cls(**values)`` with every value checked against its field's type and unknown keys refused."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        names = [prefix + k for k in unknown]
        raise ConfigError(f"unknown config key(s) {names} — known keys: {[prefix + k for k in known]}")
    checked = {k: coerce_field(prefix + k, v, hints[k]) for k, v in values.items()}
    try:
        return cls(**checked)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:  # the nested configs validate with ValueError
        message = (
            str(exc)
            if isinstance(exc, ConfigError) or " — " in str(exc)
            else f"{exc} — fix it in --set or the config file"
        )
        raise ConfigError(message) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a YAML/JSON ``--config`` file: a mapping, or a ConfigError naming the file."""
    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = Path(path).read_text()
        loaded = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(
            f"--config {path}: not valid {'JSON' if str(path).endswith('.json') else 'YAML'} ({reason}) — fix the file"
        ) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"--config {path}: holds a {type(loaded).__name__}, not a mapping of settings — write key: value lines"
        )
    return loaded


def load_config(cls: type[C], path: str | Path | None, overrides: dict[str, Any]) -> C:
    """Build a ``cls`` config from defaults, an optional YAML/JSON file and non-None overrides."""
    values: dict[str, Any] = read_config_file(path) if path else {}
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return build_dataclass(cls, values)
