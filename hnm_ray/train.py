"""The paper's Algorithm 1, one command: extract -> MIL -> pseudo labels -> mine -> fine-tune -> re-extract.

    python -m hnm_ray.train                                  # demo cohort, laptop CPU, a few minutes
    python -m hnm_ray.train --manifest slides.csv --encoder.name resnet18_in --encoder.weights simclr.pt
    python -m hnm_ray.train --recipe paper --manifest slides.csv --encoder.weights simclr.pt
    python -m hnm_ray.train --resume runs/NAME               # continue a killed or crashed run
    ray job submit --working-dir . -- python -m hnm_ray.train --manifest /data/slides.csv

Round r: features with the encoder of round r (round 0: the initial or warm-started encoder) -> the MIL
aggregator (DSMIL + ranking loss) on Ray Train -> pseudo labels for every tile of the mining pool -> the
HardNegativeMiner keeps the global top `mining.neg_ratio` of negative-slide tiles, positives by the
self-paced r_t -> the encoder is fine-tuned with SupCon for `finetune.epochs_per_round` epochs (with
`--finetune.scope adapter` the encoder stays frozen: a small adapter is trained on the same rows' stored features,
and round r + 1's features are adapter(round 0's), no slide read: `training.adapter`). The
last round only trains and evaluates the aggregator. The run's final model is the round with the best validation
slide AUC (`run.final_round`; `last` for the last round). Outputs in runs/<name>/: report.html, config.yaml,
metrics.json (both reporting protocols, stage seconds), metrics_round<r>.json, checkpoint/, roc.png,
heatmaps/, qupath/ (README "What the job does").
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hnm_ray import config as cfg
from hnm_ray.core import storage
from hnm_ray.run.cli import entry_point
from hnm_ray.run.cli import parser as cli_parser
from hnm_ray.config import TrainConfig
from hnm_ray.config.sections import EMBED_AUTO_MIN_BAGS
from hnm_ray.core.errors import ConfigError
from hnm_ray.extract import extract_features
from hnm_ray.extraction.index import TileIndex
from hnm_ray.models.metrics import describe
from hnm_ray.mining.miner import get_miner
from hnm_ray.report.outputs import finish, log_skipped, round_done
from hnm_ray.run.progress import native_stderr_to, route_ray_logs
from hnm_ray.mining.pseudo_labels import MINER_SNAPSHOT, Selection
from hnm_ray.run.run_folder import (CONFIG_FILE, RunState, cache_dir, demo_manifest, remote_of, resolve_run,
                                    saved_config, staged, start_afresh, sync)
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord, load_manifest, require_both_classes
from hnm_ray.training.pretrain import warm_start
from hnm_ray.training.rounds import finetune_round, mine, train_aggregator

log = logging.getLogger("hnm_ray")


def run_job(config: TrainConfig, run_dir: Path, on_round: Callable[[dict[str, Any]], None] | None = None,
            records: list[SlideRecord] | None = None) -> dict[str, Any]:
    """Run (or resume) Algorithm 1 in `run_dir`; returns the final metrics. `on_round` gets each round's metrics;
    `records`: the cohort `check_inputs` returned (checked here when not given)."""
    from hnm_ray.run.cluster import init_ray

    started = time.perf_counter()
    records = check_inputs(config) if records is None else records  # before Ray starts and the run folder is made
    state = RunState(run_dir)
    keep_scope(config, state, run_dir)  # a --resume never switches finetune.scope
    config = with_encoder_preprocessing(config)  # an hf-hub:/timm: encoder's own mean/std/input size, recorded
    config = with_mil_embed(config, records)  # mil.embed unset: from the training split's size, recorded
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(config, run_dir / CONFIG_FILE)
    if state.get("finetune_scope") is None:
        state.done("finetune_scope", config.finetune.scope)
    route_ray_logs(run_dir / "ray.log", config.run.verbose)  # before ray.init: its auth-token notice goes there too
    init_ray()
    miner_name = miner_name_of(state)
    # Held for the whole job: Ray garbage-collects a named actor when its last handle goes, and the global ranking
    # form of round >= 1 reads the queue that round - 1's mining left in it (restored from the snapshot on resume).
    _miner = get_miner(miner_name, snapshot_path=str(run_dir / MINER_SNAPSHOT))
    weights, adapter = initial_encoder(config, records, run_dir, state), None
    head, adopted, history, stores = initial_head(weights, run_dir), None, [], []
    for round_ in range(config.run.rounds + 1):
        store = round_store(config, run_dir, round_, weights)
        stores.append(store)
        state.timed(f"extract_round{round_}", lambda: round_features(                         # f(x) for every tile
            config, records, store, stores[0], weights, adapter, run_dir))
        result = state.once(f"mil_round{round_}", lambda: train_aggregator(                   # MIL + ranking loss
            config, store, records, run_dir, round_, weights, miner_name, adapter))
        history.append(result)
        round_done(run_dir, config, result)                                                     # report.html, MLflow
        if on_round is not None:
            on_round(result)
        if round_ == config.run.rounds:
            break
        adopted = state.once(f"mining_round{round_}", lambda: mine(                            # pseudo labels, HNM
            config, store, records, result, adopted, run_dir, round_, miner_name))
        finetuned = state.once(f"finetune_round{round_}", lambda: finetune_round(              # SupCon on f
            config, store, records, Selection.load(Path(adopted["folder"]), adopted["stats"]), run_dir, round_,
            weights, head, uncertain_joined=adopted["round"] >= 1, round0=stores[0], adapter=adapter))
        weights, head, adapter = (finetuned["encoder_weights"], finetuned["head_weights"],
                                  finetuned.get("adapter_weights"))
    finetune = {k: v for k, v in state.data.items() if k.startswith("finetune_round")}
    final = finish(run_dir, history, records, stores, finetune, config)  # the kept round's model (run.final_round)
    final["seconds"] = time.perf_counter() - started
    final["stage_seconds"] = state.get("seconds")
    storage.write_bytes(json.dumps(final, indent=2, default=float), run_dir / "metrics.json")
    sync(run_dir)  # a run folder on object storage gets the last outputs
    log_skipped(final["skipped"], len(records))
    log.info("done: %s (final model: round %d, %s; test %s; official protocol AUC %.3f)", run_dir / "metrics.json",
             final["final"]["round"], final["final"]["kept"], describe(final["final"], "test_"),
             (final["official_protocol"] or {}).get("test_auc", np.nan))
    return final


def check_inputs(config: TrainConfig) -> list[SlideRecord]:
    """Every input check of a job, before Ray starts and before any folder is made: the manifest (every bad row at
    once; both classes), the encoder (name or plug-in, weights file; an hf-hub: model in the local cache; none on
    imported features, where no encoder runs) and the aggregator (name or plug-in). An hf-hub:/timm: model's weights
    are not loaded here: its files are found and its architecture traced on the meta device (its feature size), so a
    1B-parameter model is read once, by each encoder actor."""
    from hnm_ray.models.aggregators import build_aggregator
    from hnm_ray.models.encoders import encoder_out_dim

    records = load_manifest(Path(config.run.manifest) if config.run.manifest else demo_manifest(config.run),
                            seed=config.run.seed)
    require_both_classes(records, config.run.manifest or "the demo cohort")
    check_scope(config)
    dim = int(round0_of(config).metadata()["dim"]) if imported_round0(config) else encoder_out_dim(config.encoder)
    check_store_tag(config, dim)
    build_aggregator(config.mil.aggregator, config.mil.resolved_embed(labelled_training_slides(records)) or dim,
                     hidden=config.mil.hidden, dropout=config.mil.dropout)
    return records


def round0_of(config: TrainConfig) -> FeatureStore | None:
    """Round 0's store when --run.store and --run.store_tag name it (it may hold features already), else None."""
    if not (config.run.store and config.run.store_tag):
        return None
    return FeatureStore(config.run.store, config.run.store_tag, round=0)


def imported_round0(config: TrainConfig) -> str | None:
    """The h5 format round 0's features were imported from (`import_features`: no slide to read), else None."""
    from hnm_ray.store.features import imported_format

    store = round0_of(config)
    return None if store is None else imported_format(store)


def check_store_tag(config: TrainConfig, dim: int) -> None:
    """ConfigError before any work when --run.store_tag names a store of features extracted with another encoder,
    preprocessing, tiling, feature size or dtype than this run's (`dim`-d features): this run's round 0 would be
    written beside them and both read as one cohort. An imported store (import_features) is taken as it is."""
    from hnm_ray.extract import RESUME_KEYS, store_metadata

    store = round0_of(config)
    if store is None or not store.files() or imported_round0(config):
        return
    stored, ours = store.metadata(), store_metadata(with_encoder_preprocessing(config), store, dim)
    changed = [f"{k}: {stored[k]!r} there, {ours[k]!r} here" for k in RESUME_KEYS
               if k not in ("weights", "seed") and k in stored and stored[k] != ours[k]]
    if changed:
        raise ConfigError("run.store_tag", f"{store.directory} holds features extracted with other settings than "
                                           f"this run's ({'; '.join(changed)}): they would mix in one store. Drop "
                                           "--run.store_tag (round 0's folder is then named after this run's "
                                           "encoder and settings), name a store of this encoder, or pass the "
                                           "settings that store was extracted with")


def check_scope(config: TrainConfig) -> None:
    """ConfigError before any work: full fine-tuning (re-extraction from the slides) on imported features."""
    source = imported_round0(config)
    if source and config.finetune.scope == "full" and config.run.rounds > 0:
        raise ConfigError("finetune.scope", f"round 0's features ({config.run.store}, tag {config.run.store_tag!r}) "
                                            f"were imported from {source} h5 files, so there are no slides to "
                                            "re-extract after full fine-tuning; pass --finetune.scope adapter (the "
                                            "encoder stays frozen, an adapter trains on the stored features) or "
                                            "--run.rounds 0 (the aggregator only)")


def keep_scope(config: TrainConfig, state: RunState, run_dir: Path) -> None:
    """ConfigError, before anything of the run is rewritten, when a resumed run's finetune.scope differs from the one
    its state.json recorded at its start: the rounds done so far (features, aggregators, selections) come from the
    other scope, and the rest would mix with them."""
    recorded, scope = state.get("finetune_scope"), config.finetune.scope
    if recorded is not None and recorded != scope:
        raise ConfigError("finetune.scope", f"the run in {run_dir} was started with --finetune.scope {recorded}, and "
                                            f"its finished rounds come from it; switching to {scope} on --resume "
                                            f"would mix the two. Resume with --finetune.scope {recorded}, or start "
                                            f"a new run (another --run.name) with --finetune.scope {scope}")


def miner_name_of(state: RunState) -> str:
    """The run's HardNegativeMiner actor name: a random id kept in state.json, so --resume finds the same actor and
    two runs with the same folder name on one cluster (or sweep trials, all in folders named run) never share one."""
    return f"hnm_miner-{state.get('miner_id') or state.done('miner_id', uuid.uuid4().hex[:16])}"


def initial_encoder(config: TrainConfig, records: list[SlideRecord], run_dir: Path, state: RunState) -> str | None:
    """encoder.weights when given; None for an hf-hub: model (its own pretrained weights: no warm start) and for
    imported features (no encoder runs); else the cached SimCLR warm start (pretrain.method simclr); else random
    init."""
    from hnm_ray.models.encoders import is_pretrained

    if imported_round0(config):
        log.info("round 0's features are imported (%s, tag %s): no encoder runs", config.run.store,
                 config.run.store_tag)
        return None
    if config.encoder.weights:
        return config.encoder.weights
    if is_pretrained(config.encoder):
        return None
    if config.pretrain.method == "none":
        log.warning("no encoder.weights and pretrain.method none: the encoder starts from random init, so round 0 "
                    "features start from noise; pass --encoder.weights or --pretrain.method simclr")
        return None
    index = TileIndex(index_root(config, run_dir), config.tiling)
    return state.once("pretrain", lambda: warm_start(config, records, run_dir, cache_dir(config.run), index))


def initial_head(weights: str | None, run_dir: Path) -> str | None:
    """The projection head round 0's fine-tuning starts from: the SimCLR checkpoint's where the pipeline has one (our
    cached warm start's head; an official checkpoint's `resnet.fc.*`, written to <run>/initial_head.pt), else None
    (a random head)."""
    import torch

    from hnm_ray.models.weights import official_head_state
    from hnm_ray.training.pretrain import warm_start_head

    if weights is None:
        return None
    if warm_start_head(weights).is_file():
        return str(warm_start_head(weights))
    state = official_head_state(weights)
    if not state:
        return None
    buffer = io.BytesIO()  # through storage.write_bytes like every file we write: atomic, never through a link
    torch.save(state, buffer)
    storage.write_bytes(buffer.getvalue(), run_dir / "initial_head.pt")
    return str(run_dir / "initial_head.pt")


def with_encoder_preprocessing(config: TrainConfig) -> TrainConfig:
    """The config with its encoder section `resolved` (an hf-hub:/timm: encoder's own mean, std, input size and
    revision); as it is on imported features (no encoder runs)."""
    from hnm_ray.models.encoders import resolved

    if imported_round0(config):
        return config
    return dataclasses.replace(config, encoder=resolved(config.encoder))


def with_mil_embed(config: TrainConfig, records: list[SlideRecord]) -> TrainConfig:
    """The config with mil.embed resolved (`MILConfig.resolved_embed`): unset (auto), from the number of labelled
    training slides of `records`; as it is when set (a resumed run's config.yaml holds the width its start chose)."""
    if config.mil.embed is not None:
        return config
    slides = labelled_training_slides(records)
    embed = config.mil.resolved_embed(slides)
    log.info("mil.embed unset (auto): %d, for %d labelled training slides (%s %d; recorded in config.yaml)", embed,
             slides, ">=" if embed else "<", EMBED_AUTO_MIN_BAGS)
    return dataclasses.replace(config, mil=dataclasses.replace(config.mil, embed=embed))


def labelled_training_slides(records: list[SlideRecord]) -> int:
    """How many slides of `records` MIL trains on: the labelled ones of the train split."""
    return sum(1 for r in records if r.split == "train" and r.label is not None)


def with_weights(config: TrainConfig, weights: str | None) -> TrainConfig:
    """The config with this round's encoder weights."""
    return dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, weights=weights))


def index_root(config: TrainConfig, run_dir: Path) -> storage.Location:
    """Where the tile index lives: beside round 0's features (the shared store, a folder or URI, when --run.store is set)."""
    return storage.location(config.run.store) if config.run.store else run_dir / "features"


def round_store(config: TrainConfig, run_dir: Path, round_: int, weights: str | None) -> FeatureStore:
    """Where round r's features live: round 0 in the shared store (--store, reusable by other runs and sweep
    trials; its folder --run.store_tag when set), later rounds (this run's fine-tuned encoders or adapters) inside
    the run folder."""
    from hnm_ray.models.encoders import config_tag

    if round_ == 0:
        return FeatureStore(index_root(config, run_dir), config.run.store_tag or config_tag(config.encoder, weights),
                            round=0)
    kind = "adapted" if config.finetune.scope == "adapter" else "finetuned"
    return FeatureStore(run_dir / "features", f"{run_dir.name}-{kind}", round=round_)


def round_features(config: TrainConfig, records: list[SlideRecord], store: FeatureStore, round0: FeatureStore,
                   weights: str | None, adapter: str | None, run_dir: Path) -> Any:
    """Round r's features: with an adapter (adapter scope, after round 0) adapter(round 0's features), reading no
    slide; imported features as they are; else extracted from the slides with the round's encoder."""
    from hnm_ray.training.adapter import adapt_store

    if adapter is not None:
        return adapt_store(round0, store, adapter)
    if imported_round0(config):
        return None
    return extract_features(records, store, with_weights(config, weights), index_root(config, run_dir))


def build_parser():
    """The argument parser of `python -m hnm_ray.train`: --resume, --recipe, --config and one flag per knob."""
    parser = cli_parser("python -m hnm_ray.train", __doc__)
    parser.add_argument("--resume", metavar="RUN", help="continue the run in this folder with its saved config "
                                                        "(knobs given again are applied to the rest and logged)")
    cfg.add_source_arguments(parser)
    cfg.add_arguments(parser, TrainConfig)
    return parser


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, Path]:
    """Recipe, YAML and flags -> config and run folder (`--resume RUN` starts from RUN/config.yaml)."""
    args = build_parser().parse_args(argv)
    resume = staged(args.resume.rstrip("/")) if args.resume and storage.is_uri(args.resume) else args.resume
    saved = saved_config(resume) if resume else None
    config = cfg.load_config(TrainConfig, args, base=saved)
    return config, resolve_run(config, resume, saved)


@entry_point
def main(argv: list[str] | None = None) -> int:
    """CLI entry point of `python -m hnm_ray.train`."""
    config, run_dir = parse_args(argv)
    records = check_inputs(config)  # every input check before Ray starts and before any folder is made
    if config.run.overwrite:
        start_afresh(run_dir)
        config.run.overwrite = False  # done; a --resume of the new run must never delete it
    log.info("run folder: %s%s", run_dir, f" (mirrored to {remote_of(run_dir)})" if remote_of(run_dir) else "")
    with native_stderr_to(run_dir / "ray.log"):
        final = run_job(config, run_dir, records=records)
    print(json.dumps({"run": remote_of(run_dir) or str(run_dir), **{k: final["final"].get(k) for k in
                      ("test_auc", "test_auc_low", "test_auc_high", "test_accuracy", "test_accuracy_low",
                       "test_accuracy_high", "test_n", "test_n_positive", "test_f1", "test_instance_auc",
                       "test_instance_auprc")}}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
