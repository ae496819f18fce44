"""What every `python -m hnm_ray.X` entry point shares: logging, a parser, our errors as exit code 2."""
from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable

from hnm_ray.errors import HnmError
from hnm_ray.progress import setup_logging

log = logging.getLogger("hnm_ray")


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser that shows the module docstring (its usage examples) as the description."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def entry_point(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI main: set up logging; an HnmError becomes one log line and exit code 2, not a traceback."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        setup_logging()
        try:
            return main(argv)
        except HnmError as exc:
            log.error("%s", exc)
            return 2

    return run
