"""Progress lines for long jobs: counts, rate and ETA, printed at most every few seconds."""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("hnm_ray")


class MaskingFormatter(logging.Formatter):
    """A formatter that masks passwords in URIs (`scheme://user:***@host`) in every line it writes."""

    def format(self, record: logging.LogRecord) -> str:
        from hnm_ray.config.files import mask_secrets

        return mask_secrets(super().format(record))


def setup_logging(level: int = logging.INFO) -> None:
    """Send hnm_ray's log lines to stderr with timestamps (idempotent)."""
    logger = logging.getLogger("hnm_ray")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(MaskingFormatter("%(asctime)s hnm_ray %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


@dataclass
class Progress:
    """Tracks done/total of a unit of work and logs a line with rate and ETA every `every_s` seconds."""

    what: str
    total: int
    every_s: float = 5.0
    done: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)
    _last: float = 0.0

    def update(self, n: int = 1, force: bool = False, **extra: int) -> None:
        """Add `n` done units (and counters in `extra`), logging when due."""
        self.done += n
        for key, value in extra.items():
            self.extra[key] = self.extra.get(key, 0) + value
        now = time.perf_counter()
        if force or now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            log.info(self.line())

    def line(self) -> str:
        """The progress line: `what done/total (pct) rate/s, ETA, extra counters`."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        extras = "".join(f", {k} {v}" for k, v in self.extra.items())
        return f"{self.what}: {self.done}/{self.total} ({pct:.0f}%), {rate:.1f}/s, ETA {eta:.0f}s{extras}"

    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self._start


# Ray's warnings that are notices, not problems, on every run: kept out of a quiet console (ray.log has them).
RAY_NOTICES = ("Token authentication is enabled for this Ray cluster", "Progress bars disabled")


def _not_a_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(RAY_NOTICES)


def route_ray_logs(log_file: Path | None, verbose: bool = False) -> None:
    """A quiet console: Ray's own INFO lines (per-report, actor and placement-group chatter, Ray Data progress) and
    its every-run notices (`RAY_NOTICES`) go to `log_file` only; Ray's other warnings and errors still reach the
    console, and `verbose` shows everything. Call it before ray.init (whose auth-token notice it then catches) and
    again after it (ray.init may set up Ray's console handler anew)."""
    from ray.data import DataContext

    for name in ("ray", "ray.data"):  # Ray Data's logger does not propagate to "ray": both are routed
        logger = logging.getLogger(name)
        if log_file is not None and not any(getattr(h, "baseFilename", None) == str(log_file) for h in logger.handlers):
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_file)
            handler.setFormatter(MaskingFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.INFO if verbose else logging.WARNING)
                if not verbose and _not_a_notice not in handler.filters:
                    handler.addFilter(_not_a_notice)
    DataContext.get_current().enable_progress_bars = verbose


@contextmanager
def native_stderr_to(log_file: Path) -> Iterator[None]:
    """Inside the block, what native code writes to this process's stderr (fd 2) goes to `log_file`: Ray's C++ core
    worker prints its warnings there beside its own log, e.g. core_worker.cc's note on every Ray Data actor pool
    ("constructor arguments in the object store and max_restarts > 0"). Python's sys.stderr, and the log handlers
    that wrote to it, keep the console. For a CLI's driver process only; restored on exit."""
    sys.stderr.flush()
    console = os.dup(2)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as sink:
        os.dup2(sink.fileno(), 2)
    saved = sys.stderr
    stream = os.fdopen(os.dup(console), "w", buffering=1, errors="backslashreplace")
    if _writes_to_fd2(saved):
        sys.stderr = stream
        _repoint_handlers(saved, stream)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)
        os.close(console)
        if sys.stderr is stream:
            sys.stderr = saved
            _repoint_handlers(stream, saved)
        stream.close()


def _writes_to_fd2(stream: object) -> bool:
    try:
        return stream.fileno() == 2  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False  # e.g. a test runner's capture object


def _repoint_handlers(old: object, new: object) -> None:
    """Console handlers (ours, Ray's) that write to the stream `old` write to `new` instead."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler) and getattr(handler, "stream", None) is old:
                handler.setStream(new)  # type: ignore[attr-defined]
