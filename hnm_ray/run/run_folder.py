"""A run folder: its saved config, `state.json` (finished stages, so `--resume` skips them) and the demo cohort.

With `--runs-dir s3://bucket/runs` (or gs://) the run folder is staged in a local folder and mirrored to
`<uri>/<name>/` each time a stage is recorded and when the job ends: changed files first, `state.json` last, so the
remote copy always holds a state.json whose stages' outputs were uploaded before it. `--resume <uri>/<name>`
fetches the remote copy first. Ray Train checkpoints go straight to `<uri>/<name>/ray_train` (`train_storage`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from hnm_ray import config as cfg
from hnm_ray.run import tracking
from hnm_ray.core import storage
from hnm_ray.config import JobConfig, TrainConfig
from hnm_ray.core.errors import ConfigError, StoreError

log = logging.getLogger("hnm_ray")
CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
REMOTE_FILE = ".remote"  # in a staged run folder: the URI it mirrors
SYNCED_FILE = ".synced.json"  # in a staged run folder: size and mtime of each file as last uploaded


class RunState:
    """`state.json` of a run: which stages are done and what they produced, so --resume skips them."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / STATE_FILE
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
        storage.write_bytes(json.dumps(self.data, indent=2, default=float), self.path)
        sync(self.run_dir)


def staged(uri: str) -> Path:
    """The local stage of the run folder at `uri` (under $HNM_RAY_CACHE/staged_runs), holding what the remote copy
    holds: missing files are fetched, and all of them when the remote state.json differs from the local one."""
    local = _cache_root() / "staged_runs" / hashlib.sha256(uri.encode()).hexdigest()[:12] / storage.name(uri)
    remote_state = storage.join(uri, STATE_FILE)
    remote_bytes = storage.read_bytes(remote_state) if storage.is_file(remote_state) else None
    local_bytes = (local / STATE_FILE).read_bytes() if (local / STATE_FILE).is_file() else None
    overwrite = remote_bytes is not None and remote_bytes != local_bytes
    remote_files = storage.download_tree(uri, local, overwrite)
    if remote_files:
        log.info("run %s: %d file(s) there, local stage %s", uri, len(remote_files), local)
    if overwrite or not (local / SYNCED_FILE).is_file():  # else the local stage is at the remote's state or ahead
        present = set(remote_files)
        _record_synced(local, {k: v for k, v in storage.local_files(local).items() if k in present})
    storage.write_bytes(uri, local / REMOTE_FILE)
    return local


def remote_of(run_dir: Path) -> str | None:
    """The URI a staged run folder mirrors, or None for a plain local run folder."""
    marker = Path(run_dir) / REMOTE_FILE
    return marker.read_text().strip() if marker.is_file() else None


def sync(run_dir: Path) -> None:
    """Upload a staged run folder's new and changed files to its URI, state.json last (no-op for local runs)."""
    uri = remote_of(run_dir)
    if uri is None:
        return
    try:
        _record_synced(run_dir, storage.upload_tree(run_dir, uri, _synced(run_dir), last=(STATE_FILE,)))
    except OSError as exc:
        raise StoreError(f"cannot upload run folder {run_dir} to {uri}: {exc}. The remote copy keeps its last "
                         f"complete state; fix access ({storage.ENV_HELP}) and --resume {uri}") from exc


def ray_train_storage(run_dir: Path) -> dict[str, Any]:
    """RunConfig's storage_path (+ storage_filesystem) of a run's Ray Train stages: <uri>/ray_train for a staged
    run (every node reaches it; the filesystem, with its endpoint, travels with the trainer), else <run>/ray_train."""
    uri = remote_of(run_dir)
    path, filesystem = storage.ray_storage(storage.join(uri, "ray_train") if uri else Path(run_dir) / "ray_train")
    return {"storage_path": path, "storage_filesystem": filesystem}


def _synced(run_dir: Path) -> dict[str, list[int]]:
    path = Path(run_dir) / SYNCED_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _record_synced(run_dir: Path, record: dict[str, list[int]]) -> None:
    storage.write_bytes(json.dumps(record).encode(), Path(run_dir) / SYNCED_FILE)


def _cache_root() -> Path:
    return Path(os.environ.get("HNM_RAY_CACHE") or Path.home() / ".cache" / "hnm_ray")


# Knobs newer than a run's config.yaml, with the value every run saved before them trained with (the defaults changed
# when they came): a resumed run without them goes on as it started, not with Adam at its saved SGD learning rate or
# an ensemble of 5 embedded aggregators after a round 0 of one plain one.
BEFORE_THE_KNOB = {("finetune", "optimizer"): "sgd", ("finetune", "objective"): "supcon",
                   ("finetune", "orientations"): "dihedral",
                   ("mil", "ensemble"): 1, ("mil", "embed"): 0, ("mil", "min_val_bags"): 0,
                   ("mining", "min_positives"): 0}


def saved_config(run_dir: str | Path) -> dict[str, Any]:
    """The config tree a run folder was started with (for --resume and predict)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise ConfigError("--resume", f"{run_dir} has no {CONFIG_FILE}: not a run folder of hnm_ray.train")
    tree = cfg.load_yaml(path)
    for (section, knob), value in BEFORE_THE_KNOB.items():
        if isinstance(tree.get(section), dict) and knob not in tree[section]:
            tree[section][knob] = value
    return tree


def resolve_run(config: TrainConfig, resume: str | None, saved: dict[str, Any] | None) -> Path:
    """The run folder: the resumed one (changed knobs are applied and logged), or <runs_dir>/<name> for a new run,
    which must not hold a run yet unless --run.overwrite (a run folder belongs to one config). A run asking for MLflow
    tracking without mlflow installed stops here, before any work."""
    tracking.check(config.run)
    storage.check(config.run.runs_dir, "run.runs_dir")
    storage.check(config.run.store, "run.store")
    if resume and config.run.overwrite:
        raise ConfigError("run.overwrite", "cannot be combined with --resume (which continues the run); drop one")
    if resume:
        storage.refuse_links_out(Path(resume), "resume")
        changed = cfg.changed_knobs(saved or {}, cfg.mask_secrets(cfg.to_tree(config)))
        if changed:
            log.warning("resume: applying changed knobs to the rest of the run (finished stages are kept): %s",
                        ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        return Path(resume).resolve()
    config.run.name = config.run.name or time.strftime("hnm-%Y%m%d-%H%M%S")
    runs_dir = storage.location(config.run.runs_dir)
    if not storage.is_uri(runs_dir):
        storage.refuse_links_out(runs_dir / config.run.name, "run.name")
    run = storage.join(runs_dir, config.run.name) if storage.is_uri(runs_dir) else (runs_dir / config.run.name).resolve()
    if not config.run.overwrite and holds_run(run):
        raise ConfigError("run.name", f"{run} already holds a run{_described(run)}; a run folder belongs to one config. "
                          f"Continue it with --resume {run}, start it afresh with --run.overwrite true (deletes it), "
                          "or pick another --run.name")
    return staged(run) if storage.is_uri(run) else run


def holds_run(run: storage.Location) -> bool:
    """Whether a run folder (local or on object storage) already holds a run: its config.yaml or state.json."""
    return any(storage.is_file(storage.join(run, name)) for name in (CONFIG_FILE, STATE_FILE))


def _described(run: storage.Location) -> str:
    """` (manifest M, N rounds)` of an existing local run's saved config, for the refusal message; empty otherwise."""
    path = Path(run) / CONFIG_FILE if not storage.is_uri(run) else None
    if path is None or not path.is_file():
        return ""
    job = (cfg.load_yaml(path).get("run") or {})
    return f" (manifest {job.get('manifest') or 'the demo cohort'}, {job.get('rounds')} rounds)"


def start_afresh(run_dir: Path) -> None:
    """--run.overwrite: delete the run in `run_dir` (and its remote copy for a staged run) before the new run starts."""
    uri = remote_of(run_dir)
    if not holds_run(run_dir) and (uri is None or not holds_run(uri)):
        return
    log.warning("run.overwrite: deleting the earlier run in %s", uri or run_dir)
    if uri is not None:
        fs, path = storage.filesystem(uri)
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            pass
    shutil.rmtree(run_dir)
    if uri is not None:
        staged(uri)


def demo_manifest(job: JobConfig) -> Path:
    """The demo cohort's manifest, generating the cohort into the cache folder when absent."""
    from hnm_ray.slides.synthetic import make_demo_cohort

    manifest = demo_manifest_path(job)
    folder = manifest.parent
    if not manifest.exists():
        log.info("creating the demo cohort (%d slides) in %s", job.demo_slides, folder)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        make_demo_cohort(tmp, n_slides=job.demo_slides, seed=job.seed, size=job.demo_size)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return manifest


def demo_manifest_path(job: JobConfig) -> Path:
    """Where the demo cohort of `job`'s knobs keeps its manifest (generated or not)."""
    return cache_dir(job) / f"demo-n{job.demo_slides}-s{job.demo_size}-seed{job.seed}" / "manifest.csv"


def cache_dir(job: JobConfig) -> Path:
    """The cache folder of cohorts and warm-start weights ($HNM_RAY_CACHE, else ~/.cache/hnm_ray)."""
    return Path(job.demo_dir) if job.demo_dir else _cache_root()
