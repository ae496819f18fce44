"""The paper's loop, one command: extract -> MIL -> score -> mine -> fine-tune -> re-extract, per round.

    python -m hnm_ray.train                       # demo cohort, laptop CPU, a few minutes
    python -m hnm_ray.train --manifest slides.csv --encoder resnet18_in --rounds 4 --neg-ratio 0.2
    python -m hnm_ray.train --resume runs/NAME    # continue a killed or crashed run
    ray job submit --working-dir . -- python -m hnm_ray.train --manifest /data/slides.csv

Round r: features of round r (the encoder fine-tuned in round r-1; round 0: the initial encoder) ->
the MIL aggregator (DSMIL + ranking loss) on Ray Train -> pseudo labels for every training tile ->
the HardNegativeMiner keeps the global top `neg_ratio` of negative-slide tiles -> the encoder is
fine-tuned with SupCon on hard negatives + self-paced positives for `epochs_per_round` epochs.
The last round only trains and evaluates the aggregator. Outputs in runs/<name>/: config.yaml,
metrics.json (every round), metrics_round<r>.json, checkpoint/ (encoder + aggregator), roc.png,
heatmaps/*.png.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hnm_ray import config as cfg
from hnm_ray.cli import entry_point
from hnm_ray.cli import parser as cli_parser
from hnm_ray.errors import ConfigError
from hnm_ray.extract import ExtractConfig, build_index, extract_features
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord, load_manifest
from hnm_ray.mining import positive_ratio
from hnm_ray.training.finetune import FinetuneConfig, fit_finetune, sample_positives, tile_rows
from hnm_ray.training.mil import MILConfig, evaluate_split, fit_mil

log = logging.getLogger("hnm_ray")


@dataclass
class JobConfig:
    """The whole job: data, encoder, rounds, mining and where results go."""

    name: str = cfg.knob("", "run name (default: hnm-<date>-<time>); outputs go to <runs_dir>/<name>")
    runs_dir: str = cfg.knob("runs", "folder of run folders")
    manifest: str = cfg.knob("", "slide manifest (CSV/Parquet); empty: the built-in demo cohort")
    demo_dir: str = cfg.knob("", "where the demo cohort is cached (default: $HNM_RAY_CACHE or ~/.cache/hnm_ray)")
    demo_slides: int = cfg.knob(16, "slides in the demo cohort")
    demo_size: int = cfg.knob(4096, "level-0 side of demo slides in pixels")
    store: str = cfg.knob("", "feature store root (default: <run>/features)")
    encoder: str = cfg.knob("small_cnn", "tile encoder: small_cnn, resnet18_in (the paper's), module:callable, or .pt")
    weights: str | None = cfg.knob(None, "initial encoder weights file (e.g. SimCLR); none: seeded random init")
    pretrain: str = cfg.knob("none", "self-supervised warm start before round 0", choices=["none", "simclr"])
    pretrain_epochs: int = cfg.knob(2, "SimCLR epochs when --pretrain simclr")
    pretrain_tiles: int = cfg.knob(2048, "random training tiles used by SimCLR pre-training")
    tile_size: int = cfg.knob(224, "tile side in pixels")
    level: int | None = cfg.knob(0, "pyramid level to tile (ignored when --mpp is set)")
    mpp: float | None = cfg.knob(None, "tile at this resolution (microns/pixel) instead of a level")
    min_tissue: float = cfg.knob(0.5, "minimum tissue fraction of a kept tile")
    extract_batch_size: int = cfg.knob(64, "tiles per decode/encode batch during extraction")
    num_encoders: int = cfg.knob(1, "encoder actors during extraction")
    gpus_per_encoder: float | None = cfg.knob(None, "GPUs per encoder actor (default: 1 if the cluster has GPUs)")
    rounds: int = cfg.knob(2, "fine-tuning rounds (the aggregator is trained rounds + 1 times)")
    epochs_per_round: int = cfg.knob(2, "encoder fine-tuning epochs between re-extractions (mil_every_n_epochs)")
    neg_ratio: float = cfg.knob(0.2, "hard negative mining ratio: global top fraction of negative-slide tiles kept")
    heatmaps: int = cfg.knob(4, "test slides to draw tile-score heatmaps for")
    seed: int = cfg.knob(0, "seed of splits, init, pairing and sampling")

    def validate(self) -> None:
        """Raise ConfigError on out-of-range values."""
        cfg.check_range("neg_ratio", self.neg_ratio, 0.0, 1.0, low_open=True)
        cfg.check_range("rounds", self.rounds, 0)
        cfg.check_range("epochs_per_round", self.epochs_per_round, 1)
        cfg.check_range("demo_slides", self.demo_slides, 4)
        cfg.check_range("tile_size", self.tile_size, 16, 4096)
        cfg.check_range("min_tissue", self.min_tissue, 0.0, 1.0)


SECTIONS = (JobConfig, MILConfig, FinetuneConfig)


@dataclass
class TrainConfig:
    """All knobs of `python -m hnm_ray.train`, one flat namespace for flags and YAML."""

    job: JobConfig
    mil: MILConfig
    ft: FinetuneConfig

    def to_flat(self) -> dict[str, Any]:
        """One flat mapping (the YAML that --config accepts)."""
        return {**dataclasses.asdict(self.job), **dataclasses.asdict(self.mil), **dataclasses.asdict(self.ft)}


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Validate a flat mapping of knobs (YAML + flags) into a TrainConfig; unknown keys are errors."""
    known = {f.name for section in SECTIONS for f in dataclasses.fields(section)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(unknown[0], "unknown key; `python -m hnm_ray.train --help` lists every knob")
    parts = [cfg.from_mapping(s, {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(s)}})
             for s in SECTIONS]
    config = TrainConfig(*parts)
    total = config.job.rounds * config.job.epochs_per_round
    if total and config.ft.warmup_epochs >= total:
        raise ConfigError("warmup_epochs", f"{config.ft.warmup_epochs} must be below rounds * epochs_per_round = {total}; "
                          "lower --warmup-epochs or train more epochs")
    return config


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
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=float))
        tmp.replace(self.path)
        return value


def demo_manifest(job: JobConfig) -> Path:
    """The demo cohort's manifest, generating the cohort into the cache folder when absent."""
    from hnm_ray.slides.synthetic import make_demo_cohort

    cache = Path(job.demo_dir or os.environ.get("HNM_RAY_CACHE") or Path.home() / ".cache" / "hnm_ray")
    folder = cache / f"demo-n{job.demo_slides}-s{job.demo_size}-seed{job.seed}"
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        log.info("creating the demo cohort (%d slides) in %s", job.demo_slides, folder)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        make_demo_cohort(tmp, n_slides=job.demo_slides, seed=job.seed, size=job.demo_size)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return manifest


def extract_round(job: JobConfig, store: FeatureStore, weights: str | None, records: list[SlideRecord]) -> FeatureStore:
    """Features of every slide with this round's encoder (resumes; failed slides are recorded and skipped)."""
    config = cfg.from_mapping(ExtractConfig, {
        "out": str(store.root), "encoder": job.encoder, "weights": weights, "seed": job.seed, "tag": store.encoder_tag,
        "round": store.round, "tile_size": job.tile_size, "level": job.level, "mpp": job.mpp, "min_tissue": job.min_tissue,
        "batch_size": job.extract_batch_size, "num_encoders": job.num_encoders,
        "gpus_per_encoder": job.gpus_per_encoder, "dtype": "float32"})
    extract_features(config, records)
    return store


def mine(store: FeatureStore, records: list[SlideRecord], model_path: str, run_dir: Path, round_: int,
         neg_ratio: float, threshold: float, miner_name: str):
    """Pseudo labels for every training tile, the global hard negatives and the positives of this round."""
    import ray

    from hnm_ray.mining import get_miner, select_positives
    from hnm_ray.scoring import count_tiles, score_tiles

    train = [r for r in records if r.split == "train" and r.slide_id in store.completed()]
    negatives = [r.slide_id for r in train if r.label == 0]
    miner = get_miner(miner_name, snapshot_path=str(run_dir / "miner_snapshot.npz"))
    ray.get(miner.begin_round.remote(count_tiles(store, negatives), neg_ratio, round_))
    scores = score_tiles(model_path, store, train, run_dir / f"scores_round{round_}.parquet", miner_name=miner_name)
    ray.get(miner.save.remote(str(run_dir / "miner_snapshot.npz")))
    hard = ray.get(miner.hard_negatives.remote())
    positive_ids = {r.slide_id for r in train if r.label == 1}
    positive_scores = scores.filter(np.isin(scores["slide_id"].to_numpy(zero_copy_only=False), list(positive_ids)))
    positives = select_positives(positive_scores.select(["slide_id", "tile_id", "score"]), threshold, ratio=1.0)
    stats = ray.get(miner.stats.remote())
    logit = stats.get("threshold")
    log.info("round %d mining: %d hard negatives (k of %d negative tiles, threshold p=%.3f), %d positives above %.2f",
             round_, hard.num_rows, stats.get("n_neg_total", 0), 1 / (1 + np.exp(-logit)) if logit is not None else np.nan,
             positives.num_rows, threshold)
    return hard, _with_rank(positives), stats


def _with_rank(positives):
    """Add pos_rank: a positive's rank fraction by score (0 = most confident), for the self-paced ratio r_t."""
    import pyarrow as pa

    order = np.argsort(-positives["score"].to_numpy(), kind="stable")
    rank = np.empty(len(order), np.float32)
    rank[order] = (np.arange(len(order)) + 1) / max(1, len(order))
    return positives.append_column("pos_rank", pa.array(rank))


def run_job(config: TrainConfig, run_dir: Path, on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the whole iterative job in `run_dir`; returns the final metrics.

    `on_round` is called with each round's metrics (Ray Tune reports them for early stopping).
    """
    from hnm_ray.cluster import init_ray

    job, mil = config.job, config.mil
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml_mapping(config.to_flat(), run_dir / "config.yaml")
    state = RunState(run_dir)
    init_ray()
    started = time.perf_counter()
    records = load_manifest(Path(job.manifest) if job.manifest else demo_manifest(job), seed=job.seed)
    miner_name = f"hnm_miner-{run_dir.name}"
    weights = job.weights
    if job.pretrain == "simclr":
        weights = state.get("pretrain") or state.done("pretrain", pretrain_simclr(config, records, run_dir))
    head = None
    history: list[dict[str, Any]] = []
    for round_ in range(job.rounds + 1):
        store = extract_round(job, round_store(job, run_dir, round_, weights), weights, records)
        result = state.get(f"mil_round{round_}")
        if result is None:
            fitted = fit_mil(mil, store, records, run_dir, name=f"mil_round{round_}", miner_name=miner_name,
                             seed=job.seed)
            metrics = {"round": round_, "best_epoch": fitted.best_epoch, **_val_metrics(fitted.metrics),
                       **evaluate_split(fitted.model_path, store, records, "test", fitted.threshold),
                       "model_path": fitted.model_path, "encoder_weights": weights}
            result = state.done(f"mil_round{round_}", metrics)
            (run_dir / f"metrics_round{round_}.json").write_text(json.dumps(result, indent=2, default=float))
        log.info("round %d: val AUC %.3f, test AUC %.3f, test instance AUC %.3f", round_, result.get("val_auc", np.nan),
                 result.get("test_auc", np.nan), result.get("test_instance_auc", np.nan))
        history.append(result)
        if on_round is not None:
            on_round(result)
        if round_ == job.rounds:
            break
        finetuned = state.get(f"finetune_round{round_}")
        if finetuned is None:
            finetuned = state.done(f"finetune_round{round_}", finetune_round(
                config, store, records, result["model_path"], run_dir, round_, weights, head, miner_name))
        weights, head = finetuned["encoder_weights"], finetuned["head_weights"]
    final = finish(run_dir, history, records, store, state, job)
    final["seconds"] = time.perf_counter() - started
    (run_dir / "metrics.json").write_text(json.dumps(final, indent=2, default=float))
    log.info("done: %s (test AUC %.3f)", run_dir / "metrics.json", final["final"].get("test_auc", np.nan))
    return final


def round_store(job: JobConfig, run_dir: Path, round_: int, weights: str | None) -> FeatureStore:
    """Where round r's features live: round 0 in the shared store (--store, reusable by other runs and
    sweep trials), later rounds (this run's fine-tuned encoders) inside the run folder."""
    from hnm_ray.models.encoders import encoder_tag

    if round_ == 0:
        root = Path(job.store) if job.store else run_dir / "features"
        return FeatureStore(root, encoder_tag(job.encoder, weights), round=0)
    return FeatureStore(run_dir / "features", f"{run_dir.name}-finetuned", round=round_)


def finetune_round(config: TrainConfig, store: FeatureStore, records: list[SlideRecord], model_path: str,
                   run_dir: Path, round_: int, weights: str | None, head: str | None, miner_name: str) -> dict[str, Any]:
    """Mine this round's hard negatives and positives, then fine-tune the encoder on them."""
    job, ft = config.job, config.ft
    hard, positives, stats = mine(store, records, model_path, run_dir, round_, job.neg_ratio, ft.threshold, miner_name)
    last_epoch = (round_ + 1) * job.epochs_per_round - 1
    max_rank = positive_ratio(last_epoch, ft.warmup_epochs, job.rounds * job.epochs_per_round, ft.ro, ft.rT)
    chosen = sample_positives(positives, math.ceil(ft.pos_per_neg * hard.num_rows), max_rank, job.seed + round_)
    rows = tile_rows(store, records, [(hard.select(["slide_id", "tile_id"]), 0),
                                      (chosen.select(["slide_id", "tile_id", "pos_rank"]), 1)], job.seed + round_)
    started = time.perf_counter()
    out = fit_finetune(ft, rows, job.encoder, weights, run_dir, name=f"finetune_round{round_}",
                       first_epoch=round_ * job.epochs_per_round, last_epoch=(round_ + 1) * job.epochs_per_round,
                       total_epochs=max(1, job.rounds * job.epochs_per_round), tile_size=job.tile_size, seed=job.seed,
                       head_weights=head)
    seconds = time.perf_counter() - started
    return {"encoder_weights": out.encoder_weights, "head_weights": out.head_weights, "hard_negatives": hard.num_rows,
            "positives": positives.num_rows, "positives_streamed": chosen.num_rows, "tiles_per_epoch": rows.num_rows, "seconds": seconds,
            "seconds_per_epoch": seconds / job.epochs_per_round, "miner": stats,
            "last": out.history[-1] if out.history else {}}


def _val_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k.startswith("val_")}


def finish(run_dir: Path, history: list[dict[str, Any]], records: list[SlideRecord], store: FeatureStore,
           state: RunState, job: JobConfig) -> dict[str, Any]:
    """Final checkpoint folder, ROC plot and heatmaps of the last round; the metrics summary."""
    from hnm_ray.predict import draw_heatmaps, split_probabilities
    from hnm_ray.report import plot_roc

    last = history[-1]
    checkpoint = run_dir / "checkpoint"
    checkpoint.mkdir(exist_ok=True)
    shutil.copy(last["model_path"], checkpoint / "aggregator.pt")
    if last.get("encoder_weights"):
        shutil.copy(last["encoder_weights"], checkpoint / "encoder.pt")
    shutil.copy(run_dir / "config.yaml", checkpoint / "config.yaml")
    (checkpoint / "meta.json").write_text(json.dumps({
        "encoder": job.encoder, "encoder_weights": "encoder.pt" if last.get("encoder_weights") else None,
        "tile_size": job.tile_size, "level": job.level, "mpp": job.mpp, "min_tissue": job.min_tissue,
        "threshold": last.get("val_threshold", 0.5), "seed": job.seed, "round": last["round"]}, indent=2))
    labels, probs, test_ids = split_probabilities(checkpoint / "aggregator.pt", store, records, "test")
    plot_roc(labels, probs, run_dir / "roc.png", title=f"test ROC, round {last['round']}")
    chosen = [r for r in records if r.slide_id in set(test_ids)][: job.heatmaps]
    draw_heatmaps(checkpoint / "aggregator.pt", store, chosen, run_dir / "heatmaps")
    return {"final": {k: v for k, v in last.items() if k not in ("model_path", "encoder_weights")},
            "rounds": history, "finetune": {k: v for k, v in state.data.items() if k.startswith("finetune_round")}}


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, Path]:
    """Flags and YAML -> config and run folder (`--resume RUN` reloads RUN/config.yaml first)."""
    parser = cli_parser("python -m hnm_ray.train", __doc__)
    parser.add_argument("--config", help="YAML file of knobs (flags override it)")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in this folder with its saved config")
    for section in SECTIONS:
        cfg.add_arguments(parser, section)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.exists():
            raise ConfigError("resume", f"{args.resume} has no config.yaml: not a run folder of hnm_ray.train")
        values.update(cfg.load_yaml(saved))
    if args.config:
        values.update(cfg.load_yaml(args.config))
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in ("config", "resume")})
    config = build_config(values)
    if args.resume:
        run_dir = Path(args.resume)
    else:
        name = config.job.name or time.strftime("hnm-%Y%m%d-%H%M%S")
        config.job.name = name
        run_dir = Path(config.job.runs_dir) / name
    return config, run_dir.resolve()


def pretrain_simclr(config: TrainConfig, records: list[SlideRecord], run_dir: Path) -> str:
    """SimCLR (NT-Xent) warm start of the encoder on random training tiles; returns the weights file."""
    import pyarrow as pa

    job = config.job
    extract = cfg.from_mapping(ExtractConfig, {"tile_size": job.tile_size, "level": job.level, "mpp": job.mpp,
                                               "min_tissue": job.min_tissue})
    train = [r for r in records if r.split == "train"]
    index = build_index(train, extract, FeatureStore(run_dir / "features", "pretrain", round=0))
    table = pa.concat_tables([t.select(["slide_id", "tile_id"]) for t in index.values()])
    rng = np.random.default_rng(job.seed)
    sample = table.take(np.sort(rng.choice(table.num_rows, min(job.pretrain_tiles, table.num_rows), replace=False)))
    rows = tile_rows_from_index(index, sample)
    out = fit_finetune(config.ft, rows, job.encoder, job.weights, run_dir, name="pretrain_simclr", first_epoch=0,
                       last_epoch=job.pretrain_epochs, total_epochs=job.pretrain_epochs, tile_size=job.tile_size,
                       seed=job.seed, supervised=False)
    return out.encoder_weights


def tile_rows_from_index(index, sample):
    """Fine-tuning rows (label 0, unused by SimCLR) for sampled (slide_id, tile_id) of a tile index."""
    import pyarrow as pa

    from hnm_ray.training.finetune import TILE_ROW_SCHEMA

    parts = []
    for slide_id, table in index.items():
        ids = sample.filter(pa.compute.equal(sample["slide_id"], slide_id))["tile_id"]
        chosen = table.filter(pa.compute.is_in(table["tile_id"], value_set=ids))
        n = chosen.num_rows
        parts.append(chosen.select(["slide_id", "path", "tile_id", "x", "y", "level", "size"])
                     .append_column("label", pa.array(np.zeros(n, np.int8)))
                     .append_column("pos_rank", pa.array(np.zeros(n, np.float32))).cast(TILE_ROW_SCHEMA))
    return pa.concat_tables(parts)


@entry_point
def main(argv: list[str] | None = None) -> int:
    """CLI entry point of `python -m hnm_ray.train`."""
    config, run_dir = parse_args(argv)
    log.info("run folder: %s", run_dir)
    final = run_job(config, run_dir)
    print(json.dumps({"run": str(run_dir), **{k: final["final"].get(k) for k in
                      ("test_auc", "test_accuracy", "test_f1", "test_instance_auc", "test_instance_auprc")}}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
