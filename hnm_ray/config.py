"""Dataclass configs: one place where knobs are declared, validated, documented and turned into a CLI.

Every config is a dataclass whose fields carry `help` metadata. `add_arguments` builds argparse
flags from the fields, `load_yaml` reads a YAML mapping, and `build` merges defaults < YAML < flags
and runs each dataclass's `validate()`.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hnm_ray.errors import ConfigError

C = TypeVar("C")


def knob(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation attached (shown by `--help`)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """The scalar type behind Optional[...] annotations."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--flag` per dataclass field of `cls` (defaults left as None so YAML can fill them)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for field in dataclasses.fields(cls):
        if field.metadata.get("cli") is False:
            continue
        tp = _base_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        help_text = f"{field.metadata.get('help', '')} (default: {default})"
        if typing.get_origin(tp) is list:
            item = typing.get_args(tp)[0]
            group.add_argument(_flag(field.name), dest=field.name, type=item, nargs="+", default=None, help=help_text)
        elif tp is bool:
            group.add_argument(_flag(field.name), dest=field.name, type=_parse_bool, default=None, metavar="BOOL", help=help_text)
        else:
            choices = field.metadata.get("choices")
            group.add_argument(_flag(field.name), dest=field.name, type=tp, default=None, choices=choices, help=help_text)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file as a flat mapping of knob names to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "config file not found; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(str(path), "the YAML file must hold a mapping of knob: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def from_mapping(cls: type[C], values: Mapping[str, Any], strict: bool = True) -> C:
    """Build and validate `cls` from a mapping; unknown keys raise ConfigError when `strict`."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if strict and unknown:
        raise ConfigError(unknown[0], f"unknown key; known keys are: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in names or value is None:
            continue
        kwargs[name] = _coerce(name, value, _base_type(hints[name]))
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def _coerce(name: str, value: Any, tp: Any) -> Any:
    try:
        if tp is bool and isinstance(value, str):
            return _parse_bool(value)
        if tp in (int, float, str) and not isinstance(value, tp):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(name, f"expected {tp.__name__}, got {value!r}") from None
    return value


def build(cls: type[C], args: argparse.Namespace | Mapping[str, Any] | None = None, config_file: str | Path | None = None) -> C:
    """Defaults < YAML file < explicit flags, validated."""
    values: dict[str, Any] = load_yaml(config_file) if config_file else {}
    flags = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values.update({k: v for k, v in flags.items() if k in names and v is not None})
    return from_mapping(cls, values)


def to_dict(config: Any) -> dict[str, Any]:
    """A YAML-ready dict of a config dataclass."""
    return dataclasses.asdict(config)


def save_yaml(config: Any, path: str | Path) -> Path:
    """Write a config dataclass as YAML that `--config` accepts."""
    return save_yaml_mapping(to_dict(config), path)


def save_yaml_mapping(values: Mapping[str, Any], path: str | Path) -> Path:
    """Write a flat mapping of knobs as YAML that `--config` accepts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(values), sort_keys=False))
    return path


def check_range(key: str, value: float, low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False) -> None:
    """Raise ConfigError unless low (<|<=) value (<|<=) high."""
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
        raise ConfigError(key, f"{value!r} is out of range; it must lie in {interval}")


def check_choice(key: str, value: str, choices: typing.Iterable[str]) -> None:
    """Raise ConfigError unless value is one of choices."""
    options = list(choices)
    if value not in options:
        raise ConfigError(key, f"{value!r} is not one of {options}")
