"""What every `python -m hnm_ray.X` entry point shares: logging, a parser, our errors as exit code 2, Ray's as 3,
Ctrl-C as one line and 130."""
from __future__ import annotations

import argparse
import functools
import logging
import signal
from collections.abc import Callable

from hnm_ray.run.cluster import STOP_HINT, STOPPED_BY
from hnm_ray.core.errors import HnmError
from hnm_ray.run.progress import setup_logging

log = logging.getLogger("hnm_ray")


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser that shows the module docstring (its usage examples) as the description."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """--store ROOT --tag TAG [--round R]: one round of an existing feature store (`FeatureStore(root, tag, round)`)."""
    parser.add_argument("--store", required=True, help="feature store root (a folder or s3:// / gs:// URI)")
    parser.add_argument("--tag", required=True, help="encoder tag folder inside the store (e.g. uni_v1)")
    parser.add_argument("--round", type=int, default=0, help="store round (0: what MIL and mining start from)")


def entry_point(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI main: set up logging; an HnmError becomes one log line and exit code 2, an error Ray could not
    recover from one line and exit code 3, not a traceback."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        setup_logging()
        try:
            return main(argv)
        except HnmError as exc:
            log.error("%s", exc)
            return 2
        except KeyboardInterrupt:  # Ctrl-C before Ray started (after, `stop_cleanly_on_signals` ends the process)
            log.error("received %s: stopped; %s", STOPPED_BY[signal.SIGINT], STOP_HINT)
            return 128 + signal.SIGINT
        except Exception as exc:
            if not type(exc).__module__.startswith("ray."):
                raise
            # A failure Ray could not recover from by itself (e.g. a node lost with no restarts left): one clear line;
            # every stage's finished work is on disk, so the same command (train: --resume RUN) continues the job.
            log.error("Ray could not recover from a failure (%s: %s). Finished work is kept: run the command again "
                      "(python -m hnm_ray.train --resume RUN for a training job)", type(exc).__name__,
                      str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            return 3

    return run
