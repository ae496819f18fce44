"""Progress lines for long jobs: counts, rate and ETA, printed at most every few seconds."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("hnm_ray")


class MaskingFormatter(logging.Formatter):
    """A formatter that masks passwords in URIs (`scheme://user:***@host`) in every line it writes."""

    def format(self, record: logging.LogRecord) -> str:
        from hnm_ray.config.tree import mask_secrets

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


def route_ray_logs(log_file: Path | None, verbose: bool = False) -> None:
    """A quiet console: Ray's own INFO lines (per-report, actor and placement-group chatter, Ray Data progress)
    go to `log_file` only; warnings and errors from Ray still reach the console, and `verbose` shows everything."""
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
    DataContext.get_current().enable_progress_bars = verbose
