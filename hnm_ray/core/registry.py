"""Registries of named components (timm-style) and `module.path:callable` plug-ins."""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from hnm_ray.core.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+")
# Models named by a Hugging Face Hub repository or a timm architecture (hnm_ray.models.foundation): an architecture
# plus weights, no code of the file's author runs.
HUB_PREFIXES = ("hf-hub:", "hf_hub:")
TIMM_PREFIX = "timm:"


def names_code(spec: str) -> bool:
    """Whether a model spec names code to run (a `module:callable` plug-in or a TorchScript file) rather than a
    registered name or an `hf-hub:` / `timm:` model: those are never looked up as files or modules."""
    return PLAIN_NAME.fullmatch(spec) is None and not spec.startswith((*HUB_PREFIXES, TIMM_PREFIX))


class Registry(Generic[F]):
    """Name -> factory table of one kind of component; `register(name)` is the decorator that fills it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering `factory` under `name` (a second, different factory for a name is an error)."""

        if names_code(name):
            raise ValueError(f"{self.kind} name {name!r} must be a plain identifier (letters, digits, _)")

        def add(factory: F) -> F:
            known = self._factories.get(name)
            if known is not None and known is not factory:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {known.__module__})")
            self._factories[name] = factory
            return factory

        return add

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __getitem__(self, name: str) -> F:
        return self._factories[name]


def load_plugin(spec: str, key: str) -> Any:
    """The object named by a `module.path:attr[.attr]` spec; ConfigError(key) naming the spec when it cannot load.
    An `hf-hub:` / `timm:` name is never a plug-in (names_code lets it past the trust check as a model name, which
    only encoder.name resolves): refused here, so no other knob can import and call through it."""
    if spec.startswith((*HUB_PREFIXES, TIMM_PREFIX)):
        raise ConfigError(key, f"{spec!r} names a Hugging Face / timm model, which only --encoder.name takes; give "
                               f"{key} a registered name or a 'package.module:callable' plug-in")
    module_name, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception as exc:  # noqa: BLE001 - importing user code can raise anything; each becomes one clear line
        raise ConfigError(key, f"cannot load plug-in {spec!r}: {one_line(exc)}; give 'package.module:callable' "
                               "importable on every Ray node") from exc
    return target


def build_plugin(spec: str, key: str, *args: Any, **kwargs: Any) -> Any:
    """Load the `module.path:callable` plug-in `spec` and call it; ConfigError(key) naming the plug-in and the cause
    (in one line) when it is not callable or its call fails."""
    factory = load_plugin(spec, key)
    if not callable(factory):
        raise ConfigError(key, f"plug-in {spec!r} is a {type(factory).__name__}, not a callable that builds the model")
    try:
        return factory(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a user's factory can raise anything; each becomes one clear line
        raise ConfigError(key, f"plug-in {spec!r} failed to build: {one_line(exc)}") from exc


def one_line(exc: BaseException) -> str:
    """`Type: message` of an exception with its whitespace (newlines included) collapsed to single spaces."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
