"""A run folder: its saved config, `state.json` (finished stages, so `--resume` skips them) and the demo cohort."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from hnm_ray import config as cfg
from hnm_ray import tracking
from hnm_ray.config import JobConfig, TrainConfig
from hnm_ray.errors import ConfigError

log = logging.getLogger("hnm_ray")
CONFIG_FILE = "config.yaml"


class RunState:
    """`state.json` of a run: which stages are done and what they produced, so --resume skips them."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "state.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, stage: str) -> Any:
        """What a finished stage recorded, or None."""
        return self.data.get(stage)

    def done(self, stage: str, value: Any) -> Any:
        """Record a finished stage (atomically) and return its value."""
        self.data[stage] = value
        self._save()
        return value

    def once(self, stage: str, work: Callable[[], Any]) -> Any:
        """The recorded value of `stage`, or `work()` run now, timed, recorded, and returned."""
        if stage in self.data:
            return self.data[stage]
        started = time.perf_counter()
        value = work()
        self.data.setdefault("seconds", {})[stage] = time.perf_counter() - started
        return self.done(stage, value)

    def timed(self, stage: str, work: Callable[[], Any]) -> Any:
        """Run `work()` (a stage that resumes by itself, like extraction) and record how long it took."""
        started = time.perf_counter()
        value = work()
        self.data.setdefault("seconds", {})[stage] = time.perf_counter() - started
        self._save()
        return value

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=float))
        tmp.replace(self.path)


def saved_config(run_dir: str | Path) -> dict[str, Any]:
    """The config tree a run folder was started with (for --resume and predict)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise ConfigError("resume", f"{run_dir} has no {CONFIG_FILE}: not a run folder of hnm_ray.train")
    return cfg.load_yaml(path)


def resolve_run(config: TrainConfig, resume: str | None, saved: dict[str, Any] | None) -> Path:
    """The run folder: the resumed one (changed knobs are applied and logged), or <runs_dir>/<name> for a new run.
    A run asking for MLflow tracking without mlflow installed stops here, before any work."""
    tracking.check(config.run)
    if resume:
        changed = cfg.changed_knobs(saved or {}, cfg.to_tree(config))
        if changed:
            log.warning("resume: applying changed knobs to the rest of the run (finished stages are kept): %s",
                        ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        return Path(resume).resolve()
    config.run.name = config.run.name or time.strftime("hnm-%Y%m%d-%H%M%S")
    return (Path(config.run.runs_dir) / config.run.name).resolve()


def demo_manifest(job: JobConfig) -> Path:
    """The demo cohort's manifest, generating the cohort into the cache folder when absent."""
    from hnm_ray.slides.synthetic import make_demo_cohort

    folder = cache_dir(job) / f"demo-n{job.demo_slides}-s{job.demo_size}-seed{job.seed}"
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        log.info("creating the demo cohort (%d slides) in %s", job.demo_slides, folder)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        make_demo_cohort(tmp, n_slides=job.demo_slides, seed=job.seed, size=job.demo_size)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return manifest


def cache_dir(job: JobConfig) -> Path:
    """The cache folder of cohorts and warm-start weights ($HNM_RAY_CACHE, else ~/.cache/hnm_ray)."""
    return Path(job.demo_dir or os.environ.get("HNM_RAY_CACHE") or Path.home() / ".cache" / "hnm_ray")
