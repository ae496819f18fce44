"""The one exception hierarchy of hnm-ray: every error names what is wrong and how to fix it."""
from __future__ import annotations

from collections.abc import Sequence


class HnmError(Exception):
    """Base class of every error hnm-ray raises on purpose."""


class SlideError(HnmError):
    """A slide cannot be used: missing, unreadable, unsupported, corrupt or without tissue."""

    def __init__(self, slide: str, cause: str, fix: str = "") -> None:
        self.slide = str(slide)
        self.cause = cause
        self.fix = fix
        message = f"slide {self.slide!r}: {cause}"
        super().__init__(f"{message}. {fix}" if fix else message)

    def __reduce__(self):  # copy/pickle (Ray Tune copies a trial's error) rebuild it from its own arguments
        return type(self), (self.slide, self.cause, self.fix)


class NoTissueError(SlideError):
    """Tissue detection found no tissue on the slide."""


class ManifestError(HnmError):
    """A manifest has bad rows or columns; `problems` lists every one of them."""

    def __init__(self, manifest: str, problems: Sequence[str]) -> None:
        self.manifest = str(manifest)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"manifest {self.manifest!r} has {len(self.problems)} problem(s):\n{lines}")

    def __reduce__(self):
        return type(self), (self.manifest, self.problems)


class ConfigError(HnmError):
    """A configuration key is unknown or its value is out of range."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"config key {key!r}: {problem}")

    def __reduce__(self):
        return type(self), (self.key, self.problem)


class StoreError(HnmError):
    """The feature store or a run folder cannot be read or written."""


class ModelFileError(HnmError):
    """A model file (aggregator or encoder weights) is missing, unreadable, or in a format we never load (pickles)."""
