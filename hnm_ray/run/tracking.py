"""Experiment tracking with MLflow (`--run.tracking mlflow`): one MLflow run per run folder (and per Tune trial).

The config tree is logged as params (dotted keys), each round's metrics with the round as the step, the
final metrics of both protocols, and report.html, roc.png, heatmaps/ and metrics.json as artifacts. The
MLflow run id is kept in `<run>/mlflow.json`, so `--resume` continues the same MLflow run and rounds that
are replayed from state.json are not logged twice. The default URI is `<runs_dir>/mlruns`, a local file
store (no server); any MLflow URI works (`sqlite:///mlflow.db` needs the full `mlflow` package).

We talk to MLflow through `MlflowClient` and an explicit run id rather than Ray's `setup_mlflow`: the same
code then serves `train` and Tune trials, and a resumed run or trial continues its MLflow run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from hnm_ray import config as cfg
from hnm_ray.core import storage
from hnm_ray.config import JobConfig, TrainConfig
from hnm_ray.core.errors import ConfigError
from hnm_ray.core.registry import one_line

log = logging.getLogger("hnm_ray")

RUN_FILE = "mlflow.json"
EXPERIMENT = "hnm-ray"
BATCH = 100  # MLflow's limit of params per log_batch call
ARTIFACTS = ("report.html", "roc.png", "config.yaml")


def enabled(job: JobConfig) -> bool:
    """True when this job logs to MLflow."""
    return job.tracking == "mlflow"


def check(job: JobConfig) -> None:
    """ConfigError('run.tracking') before any work when MLflow tracking is asked for but mlflow is not installed."""
    if not enabled(job):
        return
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise ConfigError("run.tracking", f"mlflow is not installed ({one_line(exc)}); pip install 'hnm-ray[tracking]' "
                                          "(or mlflow), or drop --run.tracking") from exc


def resolve_uri(job: JobConfig) -> str:
    """The tracking URI: run.tracking_uri, or <runs_dir>/mlruns; local folders as absolute paths (so Tune trials,
    which run in their own folders, share one store)."""
    uri = job.tracking_uri or str(Path(job.runs_dir) / "mlruns")
    return uri if "://" in uri or uri.startswith("file:") else str(Path(uri).expanduser().resolve())


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if "://" not in uri or uri.startswith("file:"):
        # MLflow >= 3.13 refuses its filesystem store unless asked (mlflow/mlflow#18534; e.g. MONAI issue #8891);
        # it is still supported, and the no-server store the README promises.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def start(run_dir: Path, config: TrainConfig, experiment: str = EXPERIMENT, run_name: str | None = None,
          tags: dict[str, str] | None = None) -> str | None:
    """The MLflow run id of this run folder: the one in <run>/mlflow.json (same URI), else a new run with the config
    as params. Knobs changed on --resume are tagged `changed.<key>` (MLflow params cannot change). None: no tracking."""
    if not enabled(config.run):
        return None
    check(config.run)
    uri = resolve_uri(config.run)
    client = _client(uri)
    saved = _saved(run_dir)
    params = flat_params(config)
    if saved.get("tracking_uri") == cfg.mask_secrets(uri) and saved.get("run_id"):
        logged = client.get_run(saved["run_id"]).data.params
        changed = {k: f"{logged[k]} -> {v}" for k, v in params.items() if k in logged and logged[k] != v}
        for key, change in changed.items():
            client.set_tag(saved["run_id"], f"changed.{key}", change)
        return saved["run_id"]
    run = client.create_run(_experiment_id(client, experiment), run_name=run_name or run_dir.name,
                            tags={"hnm_ray.run_dir": str(run_dir), **(tags or {})})
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), BATCH):
        client.log_batch(run.info.run_id, params=items[i:i + BATCH])
    _save(run_dir, {"tracking_uri": cfg.mask_secrets(uri), "run_id": run.info.run_id, "logged_rounds": []})
    log.info("MLflow: run %s in experiment %r at %s", run.info.run_id, experiment, cfg.mask_secrets(uri))
    return run.info.run_id


def log_round(run_dir: Path, config: TrainConfig, result: dict[str, Any]) -> None:
    """One round's metrics (ours, and the official protocol's as official_*) with the round as the step; a round
    already logged (replayed on --resume) is skipped."""
    run_id = start(run_dir, config)
    if run_id is None:
        return
    saved = _saved(run_dir)
    step = int(result["round"])
    if step in saved["logged_rounds"]:
        return
    _log_metrics(run_dir, config, run_id, {**_numbers(result), **_numbers(result.get("official_protocol"), "official_")},
                 step)
    _save(run_dir, {**saved, "logged_rounds": [*saved["logged_rounds"], step]})


def log_final(run_dir: Path, config: TrainConfig, final: dict[str, Any]) -> None:
    """Final metrics (final_*, final_official_*), metrics.json, report, ROC, config and heatmaps as artifacts; the
    MLflow run is marked finished."""
    run_id = start(run_dir, config)
    if run_id is None:
        return
    step = int(final["final"].get("round", 0))
    _log_metrics(run_dir, config, run_id, {**_numbers(final["final"], "final_"),
                                           **_numbers(final.get("official_protocol"), "final_official_")}, step)
    client = _client(resolve_uri(config.run))
    client.log_dict(run_id, json.loads(json.dumps(final, default=float)), "metrics.json")
    for name in ARTIFACTS:
        if (run_dir / name).is_file():
            client.log_artifact(run_id, str(run_dir / name))
    if (run_dir / "heatmaps").is_dir():
        client.log_artifacts(run_id, str(run_dir / "heatmaps"), "heatmaps")
    client.set_terminated(run_id)


def flat_params(config: TrainConfig) -> dict[str, str]:
    """The config tree as MLflow params: dotted keys, values as text ('' for unset)."""
    out: dict[str, str] = {}

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = "" if value is None else str(value)

    walk(cfg.mask_secrets(cfg.to_tree(config)), "")
    return out


def _numbers(metrics: dict[str, Any] | None, prefix: str = "") -> dict[str, float]:
    """The finite numeric entries of a metrics dict (nested dicts, paths and flags left out)."""
    return {f"{prefix}{k}": float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _log_metrics(run_dir: Path, config: TrainConfig, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _client(resolve_uri(config.run)).log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])


def _experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created when absent (a trial racing another to create it reads it back)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - another trial created it first (the error type depends on the store)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _saved(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(run_dir: Path, data: dict[str, Any]) -> None:
    storage.write_bytes(json.dumps(data, indent=2), run_dir / RUN_FILE)
