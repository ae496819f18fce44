"""The machinery of the one config tree: knobs declared once (default, help, bounds, choices), nested
dataclass sections, `--section.knob` flags, and one loader for every CLI (nested YAML and recipes:
`hnm_ray.config.files`).

Precedence, lowest first: defaults < recipe (`--recipe NAME|PATH`) < `--config FILE` < flags.
A knob's dotted key (`mining.neg_ratio`) is its YAML path and its flag (`--mining.neg_ratio`, or with
dashes `--mining.neg-ratio`); a knob whose name is unique in the whole tree also answers to the short
flag `--neg-ratio`. Unknown keys and out-of-range values raise one ConfigError naming the dotted key.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

from hnm_ray.config.files import load_recipe, load_yaml, merge, recipe_names, set_dotted
from hnm_ray.core.errors import ConfigError

C = TypeVar("C")


def knob(default: Any, help: str, *, choices: list[str] | None = None, low: float | None = None,
         high: float | None = None, low_open: bool = False, high_open: bool = False, code: bool = False) -> Any:
    """A config field declared once: default, help for `--help`, and the bounds or choices it is checked against.
    `code`: the knob may name code to run (a plug-in or TorchScript file), accepted from a file only when trusted."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "code": code}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A nested config section (a dataclass of knobs or of further sections)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


def _base_type(tp: Any) -> Any:
    """The scalar type behind Optional[...] annotations."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def is_section(field: dataclasses.Field) -> bool:
    """True for a field that holds a nested section."""
    return bool(field.metadata.get("section"))


def leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, scalar type) of every knob of the tree rooted at `cls`, sections depth first."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        if is_section(field):
            yield from leaves(hints[field.name], key + ".")
        else:
            yield key, field, _base_type(hints[field.name])


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _default(field: dataclasses.Field) -> Any:
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per knob of the tree `cls` (every CLI that reads the tree takes them all); defaults stay None so files
    fill them."""
    parser.usage = parser.usage or f"{parser.prog} [--recipe NAME] [--config YAML] [--section.knob VALUE ...]"
    keys = list(leaves(cls))
    names = [key.rsplit(".", 1)[-1] for key, _, _ in keys]
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, field, tp in keys:
        top = key.split(".", 1)[0] if "." in key else ""
        if top not in groups:
            groups[top] = parser.add_argument_group(top or "run", _section_help(cls, top))
        name = key.rsplit(".", 1)[-1]
        flags = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else [])
        short = f"--{name.replace('_', '-')}"
        if "." in key and names.count(name) == 1 and short not in parser._option_string_actions:
            flags.append(short)  # a unique knob name is its own short flag, unless the CLI uses that flag itself
        kwargs: dict[str, Any] = {"dest": key, "default": None, "metavar": name.upper(),
                                  "help": f"{field.metadata.get('help', '')} (default: {_default(field)})"}
        if typing.get_origin(tp) is list:
            kwargs.update(type=typing.get_args(tp)[0], nargs="+")
        elif tp is bool:
            kwargs.update(type=_parse_bool, metavar="BOOL")
        else:
            choices = field.metadata.get("choices")
            kwargs.update(type=tp, choices=choices, metavar="{" + ",".join(choices) + "}" if choices else name.upper())
        groups[top].add_argument(*flags, **kwargs)


def _section_help(cls: type, top: str) -> str:
    if not top:
        return (cls.__doc__ or "").strip().splitlines()[0]
    field = next(f for f in dataclasses.fields(cls) if f.name == top)
    return field.metadata.get("help", "")


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The nested mapping of the config flags the user gave (dests with a dotted key or known knob names)."""
    tree: dict[str, Any] = {}
    for key, value in vars(args).items():
        if value is not None and not key.startswith("_"):
            set_dotted(tree, key, value)
    return tree


def from_tree(cls: type[C], values: Mapping[str, Any], prefix: str = "") -> C:
    """Build the tree `cls` from a nested mapping: unknown keys, bad types and out-of-range values raise
    ConfigError naming the dotted key; each section's `validate()` (cross-knob checks) runs after its knobs."""
    if not isinstance(values, Mapping):
        raise ConfigError(prefix.rstrip(".") or "config", f"expected a mapping of knobs, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(prefix + unknown[0], f"unknown key; known keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        field, key = fields[name], prefix + name
        if is_section(field):
            kwargs[name] = from_tree(hints[name], value or {}, key + ".")
        elif value is not None or _base_type(hints[name]) is not hints[name]:
            kwargs[name] = _check(key, field, _coerce(key, value, _base_type(hints[name])))
    config = cls(**kwargs)
    for name, field in fields.items():
        if not is_section(field) and name not in kwargs:
            _check(prefix + name, field, getattr(config, name))
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def _coerce(key: str, value: Any, tp: Any) -> Any:
    if value is None:
        return None
    try:
        if typing.get_origin(tp) is list:
            item = typing.get_args(tp)[0]
            return [_coerce(key, v, item) for v in (value if isinstance(value, list) else [value])]
        if tp is bool and isinstance(value, str):
            return _parse_bool(value)
        if tp is bool and not isinstance(value, (bool, int)):
            raise ValueError
        if tp in (int, float, str) and not isinstance(value, tp):
            if tp is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
                raise ValueError
            return tp(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(key, f"expected {getattr(tp, '__name__', tp)}, got {value!r}") from None
    return value


def _check(key: str, field: dataclasses.Field, value: Any) -> Any:
    meta = field.metadata
    if value is None:
        return value
    if meta.get("choices") is not None:
        check_choice(key, value, meta["choices"])
    if meta.get("low") is not None or meta.get("high") is not None:
        for item in value if isinstance(value, list) else [value]:
            check_range(key, item, meta.get("low"), meta.get("high"), low_open=meta.get("low_open", False),
                        high_open=meta.get("high_open", False))
    return value


def check_range(key: str, value: float, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
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


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """`--recipe` and `--config`, the two file sources of knobs every CLI takes, and `--trust-plugins`."""
    parser.add_argument("--recipe", metavar="NAME|PATH",
                        help=f"a recipe: YAML of knobs shipped with hnm_ray ({', '.join(recipe_names())}) or a file; "
                             "--config and flags override it")
    parser.add_argument("--config", metavar="YAML", help="YAML file of knobs (nested sections); flags override it")
    add_trust_argument(parser)


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """`--trust-plugins`: a command-line flag only (a file can never set it), declared in sections.py."""
    from hnm_ray.config.sections import TRUST_PLUGINS_FLAG, TRUST_PLUGINS_HELP

    parser.add_argument(TRUST_PLUGINS_FLAG, action="store_true", dest="_trust_plugins", help=TRUST_PLUGINS_HELP)


def load_config(cls: type[C], args: argparse.Namespace | None = None, base: Mapping[str, Any] | None = None) -> C:
    """The one loader: defaults < `base` (e.g. a resumed run's saved tree) < recipe < --config < flags.
    A code knob (a plug-in or TorchScript file) set by a file and not by a flag needs `--trust-plugins`."""
    sources: list[tuple[str, Mapping[str, Any]]] = [("the resumed run's config.yaml", base or {})]
    flags: dict[str, Any] = {}
    if args is not None:
        recipe = getattr(args, "recipe", None)
        if recipe:  # a shipped recipe is part of the package; a recipe file is a file like --config
            sources.append(("" if recipe in recipe_names() else f"--recipe {recipe}", load_recipe(recipe)))
        if getattr(args, "config", None):
            sources.append((f"--config {args.config}", load_yaml(args.config)))
        flags = given_knobs(cls, args)
    values: dict[str, Any] = {}
    for _, tree in sources:
        values = merge(values, tree)
    config = from_tree(cls, merge(values, flags))
    if not getattr(args, "_trust_plugins", False):
        for source, tree in sources:
            if source:
                refuse_code(cls, tree, source, flags)
    return config


def refuse_code(cls: type, values: Mapping[str, Any], source: str, flags: Mapping[str, Any] | None = None) -> None:
    """ConfigError when `values` (read from the file `source`) set a code knob to a plug-in or TorchScript file that
    the command line (`flags`) does not name itself: files are data, and a shared file must not run code."""
    from hnm_ray.config.sections import TRUST_PLUGINS_FLAG
    from hnm_ray.core.registry import names_code

    for key, field, _ in leaves(cls):
        value = get_dotted(values, key)
        if field.metadata.get("code") and isinstance(value, str) and names_code(value) \
                and get_dotted(flags or {}, key) is None:
            raise ConfigError(key, f"{value!r} (from {source}) names code to run (a module:callable plug-in or a "
                                   f"TorchScript file), and files are data: name it on the command line "
                                   f"(--{key} {value}) or add {TRUST_PLUGINS_FLAG} if you trust that file")


def get_dotted(tree: Mapping[str, Any], key: str) -> Any:
    """tree["a"]["b"] for key "a.b", or None when absent."""
    for part in key.split("."):
        if not isinstance(tree, Mapping):
            return None
        tree = tree.get(part)
    return tree


def given_knobs(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The nested mapping of the knob flags of the tree `cls` the user gave (other arguments left out)."""
    known = {key for key, _, _ in leaves(cls)}
    return flag_values(argparse.Namespace(**{k: v for k, v in vars(args).items() if k in known}))


def changed_knobs(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} of the knobs whose values differ between two nested mappings."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.update(changed_knobs(a, b, f"{prefix}{key}."))
        elif a != b:
            out[prefix + key] = (a, b)
    return out
