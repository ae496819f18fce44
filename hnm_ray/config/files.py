"""The config tree as files: nested YAML read (`load_yaml`, recipes) and written (`save_yaml`, passwords in URIs
masked), and the nested-mapping helpers the loader in `hnm_ray.config.tree` merges sources with."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hnm_ray.core.errors import ConfigError

RECIPES_PACKAGE = "hnm_ray.config.recipes"
URI_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]+@")  # scheme://user:PASSWORD@host
MASK = "***"


def mask_secrets(value: Any) -> Any:
    """`value` (text, or a nested mapping / list of them) with the password of every `scheme://user:password@host`
    URI replaced by ***: what every file and log line we write shows (credentials belong in the environment, e.g.
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."""
    if isinstance(value, str):
        return URI_PASSWORD.sub(rf"\g<1>{MASK}@", value)
    if isinstance(value, Mapping):
        return {k: mask_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_secrets(v) for v in value)
    return value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree["a"]["b"] = value for key "a.b" (intermediate mappings created)."""
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A deep merge: mappings merge key by key, everything else in `override` replaces `base`."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file as a nested mapping (sections -> knobs); `-` in keys read as `_`. Anchors and aliases
    (`&a` / `*a`) are refused before anything is built: a few hundred bytes of nested aliases expand to billions of
    values, and a config needs neither."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "config file not found; pass an existing YAML file")
    try:
        text = path.read_text()
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events only: linear in the file, nothing expanded
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                line = event.start_mark.line + 1
                raise ConfigError(str(path), f"line {line} uses a YAML anchor or alias ('&' / '*'); write the "
                                             "values out instead (config files may not use them)")
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(str(path), "the YAML file must hold a mapping of section: {knob: value}")
    return _normalise_keys(data)


def _normalise_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """Keys with `-` read as `_`; a dotted key (`mining.neg_ratio: 0.1`) read as its nested form."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        nested: dict[str, Any] = {}
        set_dotted(nested, str(key).replace("-", "_"), _normalise_keys(value) if isinstance(value, Mapping) else value)
        out = merge(out, nested)
    return out


def recipe_names() -> list[str]:
    """Names of the recipes shipped in the package (`--recipe NAME`)."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(RECIPES_PACKAGE).iterdir()
                  if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe's nested mapping: a shipped recipe by name, or any YAML file by path."""
    if name_or_path in recipe_names():
        with resources.as_file(resources.files(RECIPES_PACKAGE) / f"{name_or_path}.yaml") as path:
            return load_yaml(path)
    if Path(name_or_path).is_file():
        return load_yaml(name_or_path)
    raise ConfigError("recipe", f"{name_or_path!r} is neither a shipped recipe ({', '.join(recipe_names())}) "
                                "nor a YAML file")


def to_tree(config: Any) -> dict[str, Any]:
    """The nested, YAML-ready mapping of a config tree (what `--config` and `from_tree` read back)."""
    return dataclasses.asdict(config)


def save_yaml(values: Any, path: str | Path) -> Path:
    """Write a config tree (dataclass or nested mapping) as YAML that `--config` accepts (atomically, never through
    a symlink; passwords in URIs masked)."""
    from hnm_ray.core.storage import write_bytes

    path = Path(path)
    data = to_tree(values) if dataclasses.is_dataclass(values) else dict(values)
    write_bytes(yaml.dump(mask_secrets(data), Dumper=_PlainDumper, sort_keys=False), path)
    return path


class _PlainDumper(yaml.SafeDumper):
    """safe_dump without anchors/aliases (a value repeated is written out again), so `load_yaml` reads it back."""

    def ignore_aliases(self, data: Any) -> bool:
        return True
