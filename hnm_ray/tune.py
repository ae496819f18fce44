"""Ray Tune sweeps of the mining ratio and the ranking loss (neg_ratio, margin, rank_k, w_rank), and when given values
the fine-tuning epochs per round, the self-paced positive ratio r_0 and the negatives' SupCon classes.

    python -m hnm_ray.tune --manifest slides.csv --search random --num-samples 16 --storage-path tune/
    python -m hnm_ray.tune --config base.yaml --sweep.neg_ratios 0.05 0.2 --sweep.margins 0.5 1 --sweep.search grid
    python -m hnm_ray.tune --config base.yaml --sweep.neg_ratios 0.05 0.2 1.0 --sweep.finetune_epochs 2 6 \
        --sweep.margins 1 --sweep.rank_ks 10 --sweep.w_ranks 0.1 --sweep.search grid   # mining ratio x epochs
    python -m hnm_ray.tune --storage-path tune/ --sweep-name NAME --resume    # continue an interrupted sweep

Each trial runs the whole job (`hnm_ray.train.run_job`) with its own knobs and reports each
round's validation metrics; ASHA stops weak trials early on validation slide AUC. The round-0
features are extracted once, before the trials, into a shared store that every trial reads. The
results table (one row per trial) and the best config (YAML for `python -m hnm_ray.train --config`)
are written to <storage-path>/<sweep-name>/.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hnm_ray import config as cfg
from hnm_ray.run import tracking
from hnm_ray.core import storage
from hnm_ray.run.cli import entry_point
from hnm_ray.run.cli import parser as cli_parser
from hnm_ray.config import TrainConfig
from hnm_ray.core.errors import ConfigError, HnmError
from hnm_ray.extract import extract_features
from hnm_ray.run.run_folder import RunState, demo_manifest, staged, sync
from hnm_ray.train import index_root, initial_encoder, round_store, run_job, with_weights

log = logging.getLogger("hnm_ray")

TRUST_SWEEP = ("Ray Tune unpickles the sweep folder (tuner.pkl, experiment state): a crafted file runs code, so resume "
               "only sweep folders you or someone you trust wrote")
# The swept knobs of the train tree (dotted keys) and the sweep knob listing each one's values: always swept ...
SWEPT = {"mining.neg_ratio": "neg_ratios", "mil.margin": "margins", "mil.rank_k": "rank_ks", "mil.w_rank": "w_ranks"}
# ... and swept only when given values (empty: every trial keeps the base config's value).
SWEPT_IF_GIVEN = {"finetune.epochs_per_round": "finetune_epochs", "mining.ro": "positive_ratios",
                  "finetune.negative_classes": "negative_classes"}


@dataclass
class SweepConfig:
    """The search: space, algorithm, early stopping, resources and where results go."""

    neg_ratios: list[float] = cfg.knob([0.05, 0.1, 0.2, 0.5], "hard negative mining ratios to try (mining.neg_ratio)",
                                       low=0.0, high=1.0, low_open=True)
    margins: list[float] = cfg.knob([0.5, 1.0, 2.0], "ranking-loss margins to try (mil.margin)", low=0.0)
    rank_ks: list[int] = cfg.knob([1, 5, 10], "top-k sizes of the ranking loss to try (mil.rank_k)", low=1)
    w_ranks: list[float] = cfg.knob([0.0, 0.1, 0.5], "ranking-loss weights to try (mil.w_rank)", low=0.0)
    finetune_epochs: list[int] = cfg.knob([], "fine-tuning epochs per round to try (finetune.epochs_per_round); "
                                              "not given: the base config's", low=1)
    positive_ratios: list[float] = cfg.knob([], "self-paced positive ratios r_0 to try (mining.ro); not given: the "
                                                "base config's", low=0.0, high=1.0)
    negative_classes: list[int] = cfg.knob([], "SupCon classes of the negatives to try (finetune.negative_classes); "
                                               "not given: the base config's", low=1)
    search: str = cfg.knob("random", "grid (every combination) or random (num_samples draws)", choices=["grid", "random"])
    num_samples: int = cfg.knob(8, "random draws (random search) or repeats of the grid (grid search)", low=1)
    metric: str = cfg.knob("val_auc", "validation metric to maximise")
    grace_rounds: int = cfg.knob(1, "ASHA: rounds every trial runs before it may be stopped", low=1)
    max_concurrent_trials: int = cfg.knob(1, "trials at once (each runs Ray Train/Data jobs of its own)", low=1)
    cpus_per_trial: float = cfg.knob(0.01, "CPUs reserved by a trial's driver (its workers ask for their own; stages "
                                           "with 0 workers, MIL by default, run in it: raise it with concurrent trials)",
                                     low=0.0, low_open=True)
    storage_path: str = cfg.knob("tune_results", "folder or s3:// / gs:// URI of sweep results")
    sweep_name: str = cfg.knob("hnm-sweep", "name of this sweep (its folder under storage_path)")

    def validate(self) -> None:
        """Every swept knob needs at least one value."""
        for key in SWEPT.values():
            if not getattr(self, key):
                raise ConfigError(f"sweep.{key}", "needs at least one value")


@dataclass
class TuneConfig(TrainConfig):
    """The train tree plus the `sweep` section: what every trial runs, and what varies between trials."""

    sweep: SweepConfig = cfg.section(SweepConfig, "the search: space, algorithm, early stopping, results")

    def train_tree(self) -> dict[str, Any]:
        """The nested mapping of the train sections (every trial's base)."""
        return {k: v for k, v in cfg.to_tree(self).items() if k != "sweep"}


def swept(sweep: SweepConfig) -> dict[str, list]:
    """The values of each swept knob (dotted key): the always-swept ones and the optional ones given values."""
    always = {key: list(getattr(sweep, values)) for key, values in SWEPT.items()}
    return {**always, **{key: list(getattr(sweep, values)) for key, values in SWEPT_IF_GIVEN.items()
                         if getattr(sweep, values)}}


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """Ray Tune's param space over the swept knobs (dotted keys): grid_search lists or random choices."""
    from ray import tune

    pick = tune.grid_search if sweep.search == "grid" else tune.choice
    return {key: pick(values) for key, values in swept(sweep).items()}


def trial_config(params: dict[str, Any]) -> TrainConfig:
    """A trial's train config: the base tree with the trial's swept knobs."""
    tree: dict[str, Any] = {}
    for key in (*SWEPT, *SWEPT_IF_GIVEN):
        if key in params:
            cfg.files.set_dotted(tree, key, params[key])
    return cfg.from_tree(TrainConfig, cfg.merge(params["base"], tree))


def check_swept_values(config: TuneConfig) -> None:
    """ConfigError naming the knob when a swept value is one the train config refuses (e.g. mining.ro above
    mining.rT), before the shared store is extracted rather than inside every trial."""
    base = config.train_tree()
    for key, values in swept(config.sweep).items():
        for value in values:
            trial_config({"base": base, key: value})


def trial(params: dict[str, Any]) -> None:
    """One Tune trial: the whole job with this trial's knobs; each round's metrics go to Tune."""
    from ray import tune

    config = trial_config(params)
    # Stages with 0 workers (MIL by default) run in this trial's process (training/runner.py), on the trial's CPUs.
    context = tune.get_context()
    run_dir = Path(context.get_trial_dir()) / "run"
    # --run.tracking mlflow: one MLflow run per trial, in an experiment named after the sweep (the trial dir's parent).
    tracking.start(run_dir, config, experiment=run_dir.parent.parent.name, run_name=context.get_trial_name(),
                   tags={"trial_id": context.get_trial_id()})
    run_job(config, run_dir, on_round=lambda m: tune.report({k: v for k, v in m.items() if _is_number(v)}))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def prepare_shared_store(config: TuneConfig, root: storage.Location, work: Path) -> TuneConfig:
    """Extract the round-0 features once into <root>/features (a folder or URI) and point every trial at them;
    the warm start's files go to the local folder `work`."""
    from hnm_ray.store.manifest import load_manifest, require_both_classes

    job = config.run
    job.manifest = job.manifest or str(demo_manifest(job))
    job.store = job.store or str(storage.join(root, "features"))
    storage.check(job.store, "run.store")
    tracking.check(job)
    job.tracking_uri = tracking.resolve_uri(job)  # absolute: trials run in their own folders, all log to one store
    records = load_manifest(job.manifest, seed=job.seed)
    require_both_classes(records, job.manifest)
    # The warm start (cached per cohort + encoder) is made here once, so every trial finds it and the same store.
    weights = initial_encoder(config, records, work, RunState(work))
    extract_features(records, round_store(config, work, 0, weights), with_weights(config, weights),
                     index_root(config, work))
    return config


def refuse_passwords(config: TuneConfig) -> None:
    """ConfigError naming the knob when a URI in the config holds a password: Ray Tune writes every trial's config
    into its folder (params.json, params.pkl), where no mask can reach it."""
    tree = cfg.to_tree(config)
    for key, _, _ in cfg.leaves(TuneConfig):
        value = cfg.tree.get_dotted(tree, key)
        if isinstance(value, str) and cfg.mask_secrets(value) != value:
            raise ConfigError(key, f"{cfg.mask_secrets(value)} holds a password, and Ray Tune writes each trial's "
                                   "config into its folder: give MLflow credentials in MLFLOW_TRACKING_USERNAME / "
                                   "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")


def run_sweep(config: TuneConfig, resume: bool = False):
    """Run (or restore) the sweep; returns the Tune ResultGrid and writes results.csv + best_config.yaml."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from hnm_ray.run.cluster import init_ray
    from hnm_ray.training.finetune import finetune_workers, worker_cpus

    refuse_passwords(config)
    check_swept_values(config)
    init_ray()
    sweep = config.sweep
    storage.check(sweep.storage_path, "sweep.storage_path")
    root = storage.location(sweep.storage_path)
    root = root if storage.is_uri(root) else root.resolve()
    # On object storage the sweep's own files (warm start, results.csv, best_config.yaml) are staged locally and
    # uploaded to <root>/<sweep_name>/shared; Tune syncs its experiment and trial folders to <root> itself.
    work = staged(storage.join(root, sweep.sweep_name, "shared")) if storage.is_uri(root) else root
    path = storage.join(root, sweep.sweep_name)
    storage_path, filesystem = storage.ray_storage(root)
    trainable = tune.with_resources(trial, {"cpu": sweep.cpus_per_trial})
    if resume:
        log.warning("resume: restoring %s. %s", path, TRUST_SWEEP)
        restore_path = storage.ray_storage(path)[0]
        if not tune.Tuner.can_restore(restore_path, storage_filesystem=filesystem):
            raise ConfigError("resume", f"no sweep to restore at {path}; check --storage-path and --sweep-name")
        tuner = tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True, storage_filesystem=filesystem)
    else:
        config = prepare_shared_store(config, root, work)
        # Each running trial's driver holds cpus_per_trial: its fine-tuning workers share what is left (on GPUs: the
        # cluster's GPUs, one worker each).
        ft = config.finetune
        ft.workers = finetune_workers(ft.workers, ft.use_gpu, sweep.max_concurrent_trials)
        ft.cpus_per_worker = worker_cpus(ft.cpus_per_worker, max(1, ft.workers) * sweep.max_concurrent_trials,
                                         reserved=sweep.cpus_per_trial * sweep.max_concurrent_trials,
                                         use_gpu=ft.use_gpu)
        # A job reports rounds + 1 times. stop_last_trials=False: a trial that reaches max_t is not stopped at that
        # last report (before its job writes the final metrics, checkpoint and report); rungs still stop weak trials.
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=config.run.rounds + 1,
                                  grace_period=sweep.grace_rounds, reduction_factor=2, stop_last_trials=False)
        tuner = tune.Tuner(
            trainable, param_space={"base": config.train_tree(), **search_space(sweep)},
            tune_config=tune.TuneConfig(metric=sweep.metric, mode="max", scheduler=scheduler,
                                        num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name=sweep.sweep_name, storage_path=storage_path, storage_filesystem=filesystem,
                                      sync_config=tune.SyncConfig(sync_artifacts=filesystem is not None)),
        )
    results = tuner.fit()
    failed = [f"{r.path.rsplit('/', 1)[-1] if r.path else '?'}: {str(r.error).splitlines()[0][:300]}"
              for r in results if r.error is not None]
    if len(failed) == len(results):
        raise HnmError(f"every trial of sweep {sweep.sweep_name!r} failed; no best config written:\n  " +
                       "\n  ".join(failed))
    write_results(results, work if storage.is_uri(root) else path, sweep.metric)
    sync(work)
    if failed:
        raise HnmError(f"{len(failed)} of {len(results)} trials failed (left out of the best config):\n  "
                       + "\n  ".join(failed))
    return results


def write_results(results, path: Path, metric: str) -> Path:
    """results.csv (one row per trial) and best_config.yaml (accepted by `hnm_ray.train --config`)."""
    table = results.get_dataframe(filter_metric=metric, filter_mode="max")
    keep = [c for c in table.columns if c.startswith("config/") and "/base" not in c] + \
           [c for c in ("trial_id", metric, "val_f1", "test_auc", "test_instance_auc", "round") if c in table.columns]
    path.mkdir(parents=True, exist_ok=True)
    table[keep].to_csv(path / "results.csv", index=False)
    print(table[keep].to_string(index=False))
    finished = [r for r in results if r.error is None and _is_number((r.metrics or {}).get(metric))]
    if not finished:
        raise HnmError(f"no trial finished with a {metric!r}; no best config written")
    best = max(finished, key=lambda r: r.metrics[metric])  # errored trials never make the best config
    best_config = trial_config(best.config)
    best_config.run.name = ""
    best_file = cfg.save_yaml(best_config, path / "best_config.yaml")
    log.info("best trial: %s = %s with %s -> %s", metric, best.metrics.get(metric),
             json.dumps({k: v for k, v in best.config.items() if k != "base"}), best_file)
    return best_file


@entry_point
def main(argv: list[str] | None = None) -> int:
    """CLI entry point of `python -m hnm_ray.tune`."""
    parser = cli_parser("python -m hnm_ray.tune", __doc__)
    parser.add_argument("--resume", action="store_true",
                        help=f"restore the interrupted sweep at storage_path/sweep_name. {TRUST_SWEEP}")
    cfg.add_source_arguments(parser)
    cfg.add_arguments(parser, TuneConfig)
    args = parser.parse_args(argv)
    run_sweep(cfg.load_config(TuneConfig, args), resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
