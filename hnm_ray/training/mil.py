"""MIL aggregator training on Ray Train: DDP over paired bags + ranking loss.

Each epoch pairs one positive with one negative bag (shuffled, max(#pos, #neg) pairs in all: every bag once, the
smaller class cycled).
Every worker owns a fixed shard of the positive and of the negative bags and pairs within it, so a
worker only ever reads its shard; DDP averages the gradients of the `world` pairs of a step. Bags are read from the
store when a pair (or validation, or the test pass) needs them, through a `BagCache` that keeps the first
`mil.bag_cache_gib` of them in memory: a worker holds at most that, plus the bags of the step in hand and the
`mil.read_ahead` bags read meanwhile in a background thread (default none).
Validation slide metrics are computed every epoch inside the worker; the best epoch (validation
AUC, then loss) is the model kept, with the Youden threshold on validation; with fewer than `mil.min_val_bags`
validation bags of a class, the fixed epoch and threshold 0.5 instead. Reports and checkpoints reach Ray
Train every `checkpoint_every` epochs and at the last. Re-running with the same run folder resumes from the last
checkpoint.

    python -m hnm_ray.training.mil --store STORE --tag TAG --manifest M --out RUN [--mil.epochs 40 ...]
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hnm_ray import config as cfg
from hnm_ray.core import storage
from hnm_ray.config import MILConfig, TrainConfig
from hnm_ray.config.sections import STANDARDIZE_AUTO_SPREAD
from hnm_ray.run.cli import add_store_arguments, entry_point
from hnm_ray.run.cli import parser as cli_parser
from hnm_ray.core.errors import ConfigError, HnmError, StoreError
from hnm_ray.store.bag_cache import GIB, BagCache, check_bag_sizes
from hnm_ray.store.features import Bag, FeatureStore
from hnm_ray.models.aggregators import STD_FLOOR
from hnm_ray.models.inference import _tensor, evaluate_split, save_aggregator
from hnm_ray.models.metrics import FALLBACK_THRESHOLD
from hnm_ray.store.manifest import SlideRecord, load_manifest
from hnm_ray.training.mil_validation import (_keeps, best_val_f1, official_protocol_update, validation_metrics,
                                             validation_selects)

log = logging.getLogger("hnm_ray")

CHECKPOINT_FILE = "mil.pt"
Standardisation = tuple[np.ndarray, np.ndarray, str]  # (mean, scale, the mode used): `standardisation`


@dataclass
class MILResult:
    """A trained aggregator: where it is, its validation threshold and its metrics."""

    model_path: str
    best_epoch: int
    threshold: float
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's reported metrics, resumes included
    official_protocol: dict[str, Any] | None = None  # best TEST AUC over epochs, threshold on test (official report)


def epoch_pairs(pos: list[str], neg: list[str], epoch: int, seed: int, rank: int, world: int) -> list[tuple[str, str]]:
    """This worker's (positive, negative) bag pairs for an epoch: its fixed shards, reshuffled each epoch.

    All workers return the same number of pairs, ceil(max(#pos, #neg) / world): every bag of a worker's shards is
    used, the shorter shard cycled (min(#pos, #neg) pairs left up to half of an unbalanced cohort's bags out).
    """
    steps = math.ceil(max(len(pos), len(neg)) / world) if pos and neg else 0
    my_pos, my_neg = pos[rank::world] or pos, neg[rank::world] or neg
    rng = np.random.default_rng([seed, epoch, rank])
    pos_order = [my_pos[i % len(my_pos)] for i in rng.permutation(max(steps, len(my_pos)))[:steps]] if steps else []
    neg_order = [my_neg[i % len(my_neg)] for i in rng.permutation(max(steps, len(my_neg)))[:steps]] if steps else []
    return list(zip(pos_order, neg_order))


def _hard_negative_bag(store: FeatureStore, loop: dict[str, Any], epoch: int) -> Bag | None:
    """Features of a sample of the miner's global hard negatives (global ranking form), or None if no queue."""
    import ray

    from hnm_ray.mining.miner import get_miner

    if not loop["miner_name"]:
        return None
    try:
        miner = get_miner(loop["miner_name"], create=False)
        table = ray.get(miner.sample.remote(loop["mil"]["global_pool"], loop["seed"] + epoch))
    except HnmError:
        if loop["round"] >= 1 and epoch == 0:
            log.warning("MIL round %d: no miner %r, so the global ranking form has no hard negatives to rank against "
                        "(the actor was lost); it trains without the ranking term", loop["round"], loop["miner_name"])
        return None  # no queue yet (first round): the global form falls back to no ranking term this epoch
    return store.select_tiles(table) if table.num_rows else None


def _pair_step(model, pos: Bag, neg: Bag, hard_x, loss_kw: dict[str, Any], device: str, scale: float) -> float:
    """Forward and backward of one (positive, negative) bag pair: `losses.pair_loss` (+ the global ranking form)."""
    from hnm_ray.training.losses import global_ranking_loss, pair_loss

    pos_out, neg_out = model(_tensor(pos, device)), model(_tensor(neg, device))
    pair_form = loss_kw["ranking"] == "pair"
    loss = pair_loss(pos_out, neg_out, loss_kw["pos_weight"], loss_kw["w_bag"], loss_kw["w_ins"],
                     loss_kw["w_rank"] if pair_form else 0.0, loss_kw["margin"], loss_kw["rank_k"], loss_kw["scale"])
    if loss_kw["w_rank"] > 0 and loss_kw["ranking"] == "global" and hard_x is not None:
        hard_inst, _ = model(hard_x)
        loss = loss + loss_kw["w_rank"] * global_ranking_loss([pos_out[0]], hard_inst, loss_kw["margin"], loss_kw["rank_k"])
    (loss * scale).backward()
    return loss.item()


def bce_weighting(mode: str, n_pos: int, n_neg: int) -> tuple[float | None, float]:
    """(pos_weight, uniform scale) of the BCE terms: pos_weight = #neg/#pos on positive bags, or, as the official
    code's `BCEWithLogitsLoss(ratio)` does (the ratio lands in `weight`), every BCE term scaled by #neg/#pos
    (the ranking term is not: `losses.pair_loss` bce_scale)."""
    ratio = n_neg / max(1, n_pos)
    return (ratio, 1.0) if mode == "pos_weight" else (None, ratio)


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Ray Train body: plain PyTorch on this worker's shard of bags, reporting metrics + checkpoints."""
    import torch

    from hnm_ray.training.losses import bags_bce
    from hnm_ray.models.aggregators import build_standardized
    from hnm_ray.training.checkpointing import latest_checkpoint, load_state, report
    from hnm_ray.training.runner import loop_device, place_and_restore, rank_and_world
    from hnm_ray.training.schedules import scheduler as lr_scheduler

    mc = loop["mil"]
    rank, world = rank_and_world(loop)
    device = loop_device(loop, mc["use_gpu"], "mil.use_gpu")
    torch.manual_seed(loop["seed"])
    # One thread per CPU given (also in the driver, mil.workers 0): a small aggregator gains nothing from more, and a
    # driver on a busy node otherwise spins one OpenMP thread per core (a 40-epoch round: 559 s, 16-38 s with one).
    torch.set_num_threads(max(1, int(mc["cpus_per_worker"])))
    store = FeatureStore(loop["store_root"], loop["tag"], round=loop["round"])
    pos_ids = [s for s, y in loop["train"] if y == 1]
    neg_ids = [s for s, y in loop["train"] if y == 0]
    bags = BagCache(store, round(mc["bag_cache_gib"] * GIB))  # read when needed; the first that fit are kept
    pos_weight, scale = bce_weighting(mc["bce_weight"], len(pos_ids), len(neg_ids))
    loss_kw = {**{k: mc[k] for k in ("w_bag", "w_ins", "w_rank", "margin", "rank_k", "ranking")},
               "pos_weight": None if pos_weight is None else torch.tensor(pos_weight, device=device), "scale": scale}

    model = build_standardized(mc["aggregator"], loop["dim"], embed=mc["embed"], eval_chunk=mc["eval_chunk_tiles"],
                               detach_instance_head=mc["instance_head"] == "detached", hidden=mc["hidden"],
                               dropout=mc["dropout"])
    model.set_statistics(loop["feature_mean"], loop["feature_std"])
    start_epoch, best, official, history = 0, None, None, []
    checkpoint = latest_checkpoint(loop["driver_checkpoints"], CHECKPOINT_FILE)
    state = load_state(checkpoint, CHECKPOINT_FILE) if checkpoint else None
    ddp_model, optimizer, scheduler = place_and_restore(
        model, world, device, lambda params: torch.optim.Adam(params, lr=mc["lr"], weight_decay=mc["weight_decay"]),
        lambda optimizer: lr_scheduler(optimizer, mc["lr_schedule"], mc["epochs"]), state)
    if state is not None:
        start_epoch, best, history = state["epoch"] + 1, state["best"], state.get("history", [])
        official = state.get("official_protocol")
        if rank == 0:
            log.info("MIL: resuming after epoch %d of %d", state["epoch"], mc["epochs"])
    plain_model = getattr(ddp_model, "module", ddp_model)

    def bce(bag_logits, max_logits, labels):
        return scale * bags_bce(bag_logits, max_logits, labels, loss_kw["pos_weight"], mc["w_bag"], mc["w_ins"])

    for epoch in range(start_epoch, mc["epochs"]):
        ddp_model.train()
        hard = _hard_negative_bag(store, loop, epoch) if mc["ranking"] == "global" and mc["w_rank"] > 0 else None
        hard_x = _tensor(hard, device) if hard is not None else None
        losses, started = [], time.perf_counter()
        pairs = epoch_pairs(pos_ids, neg_ids, epoch, loop["seed"], rank, world)
        # With mil.read_ahead, the next bags are read in a background thread while this pair trains.
        stream = bags.iterate([(s, y) for pair in pairs for s, y in zip(pair, (1, 0))], ahead=mc["read_ahead"])
        for step in range(len(pairs)):
            # Gradients of `pairs_per_step` pairs are accumulated locally (no DDP all-reduce) before a step.
            syncs = (step + 1) % mc["pairs_per_step"] == 0 or step == len(pairs) - 1
            with contextlib.nullcontext() if syncs or world == 1 else ddp_model.no_sync():
                losses.append(_pair_step(ddp_model, next(stream), next(stream), hard_x, loss_kw, device,
                                         scale=1.0 / mc["pairs_per_step"]))
            if syncs:
                optimizer.step()
                optimizer.zero_grad()
        scheduler.step()
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                                   "epoch_seconds": time.perf_counter() - started,  # training steps only
                                   "train_pairs": len(pairs) * world, "reported_at": time.time()}
        last_epoch = epoch == mc["epochs"] - 1
        if rank == 0:
            metrics.update(validation_metrics(plain_model, bags.iterate(loop["val"], mc["read_ahead"]), bce, device,
                                              None if loop["val_selects"] else FALLBACK_THRESHOLD))
            if _keeps(metrics, best, mc, loop["val_selects"]):
                best = {**metrics, "model": copy.deepcopy({k: v.cpu() for k, v in plain_model.state_dict().items()})}
            official = official_protocol_update(official, plain_model, bags.iterate(loop["test"], mc["read_ahead"]),
                                                [y for _, y in loop["test"]], epoch, device)
            metrics["best_epoch"] = best["epoch"]
            if epoch == start_epoch:
                log.info("MIL: %d bag reads in the first epoch; %d bags (%.2f GiB) kept in memory (mil.bag_cache_gib "
                         "%g), the others re-read every epoch", bags.reads, len(bags), bags.held_bytes / GIB,
                         mc["bag_cache_gib"])
            history.append(dict(metrics))
        # Validation and the kept epoch are decided here, every epoch; Ray Train hears from us (a report and a
        # checkpoint, ~1 s each) only every `checkpoint_every` epochs and at the last: the same on every rank.
        if not (last_epoch or (epoch + 1) % mc["checkpoint_every"] == 0):
            continue
        state = {"model": plain_model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                 "scheduler": scheduler.state_dict(), "best": best, "official_protocol": official,
                 "history": history, "loop": loop} if rank == 0 else None
        report(metrics, state, CHECKPOINT_FILE, loop["driver_checkpoints"])


def _train_records(records: list[SlideRecord], store: FeatureStore, split: str) -> list[tuple[str, int]]:
    done = store.completed()
    return [(r.slide_id, int(r.label)) for r in records if r.split == split and r.slide_id in done and r.label is not None]


def fit_mil(config: MILConfig, store: FeatureStore, records: list[SlideRecord], run_dir: str | Path,
            name: str = "mil", miner_name: str | None = None, seed: int = 0) -> MILResult:
    """Train the aggregator on the store's bags (in this process, or with `config.workers` Ray Train workers);
    returns the best-validation model, or with `mil.ensemble` K > 1 the ensemble of K of them (seeds seed .. seed +
    K - 1, each trained and resumed as its own run `{name}_member{i}`, at once as Ray tasks where
    `mil_ensemble.fit_members` can) saved as `{name}_aggregator`."""
    val = _train_records(records, store, "val")
    if val and not validation_selects(val, config.min_val_bags):  # said once, not by each member (or its Ray task)
        log.warning("MIL: %d validation slides (%d positive) are too few to pick the epoch and threshold on (mil."
                    "min_val_bags %d of each class): keeping the fixed epoch (mil.fixed_epoch %d) and threshold 0.5",
                    len(val), sum(y for _, y in val), config.min_val_bags, config.fixed_epoch)
    if config.ensemble == 1:
        return fit_member(config, store, records, run_dir, name, miner_name, seed)
    from hnm_ray.training.mil_ensemble import combine_members, fit_members

    members = fit_members(config, store, records, run_dir, name, miner_name, seed,
                          shared_standardisation(config, store, records))
    return combine_members(members, config, store, records, Path(run_dir).resolve() / f"{name}_aggregator")


def shared_standardisation(config: MILConfig, store: FeatureStore,
                           records: list[SlideRecord]) -> Standardisation | None:
    """The ensemble's `standardisation`, computed (and `auto` resolved and logged) once in the driver for its K
    members, which share the training split; None where the training split cannot train (a member says why)."""
    train = _train_records(records, store, "train")
    if {y for _, y in train} != {0, 1}:
        return None
    check_bag_sizes(store, [s for s, _ in train], config.max_bag_gib)  # before any bag is read
    return standardisation(store, [s for s, _ in train], config.standardize)


def fit_member(config: MILConfig, store: FeatureStore, records: list[SlideRecord], run_dir: str | Path,
               name: str = "mil", miner_name: str | None = None, seed: int = 0,
               statistics: Standardisation | None = None) -> MILResult:
    """One aggregator (see `fit_mil`), saved as `{name}_aggregator`; `statistics`: the training split's
    `standardisation` when the caller has it (an ensemble's driver), else computed here."""
    from hnm_ray.training.checkpointing import driver_checkpoint_dir, load_state
    from hnm_ray.training.runner import run_loop

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    train, val, test = (_train_records(records, store, split) for split in ("train", "val", "test"))
    if not any(y == 1 for _, y in train) or not any(y == 0 for _, y in train):
        raise StoreError(f"MIL training needs positive and negative training slides in {store.directory}; "
                         f"found {len(train)} training slides with features. Check the manifest's labels/splits.")
    check_bag_sizes(store, [s for s, _ in train + val + test], config.max_bag_gib)  # before any bag is read
    # mil.embed unset (auto) by a direct caller: from these training bags (a job passes the width its start resolved)
    config = replace(config, embed=config.resolved_embed(len(train)))
    mean, std, standardize = statistics or standardisation(store, [s for s, _ in train], config.standardize)
    selects = validation_selects(val, config.min_val_bags)
    storage = run_dir / "ray_train"
    loop = {"mil": asdict(config), "feature_mean": mean.tolist(), "feature_std": std.tolist(),
            "store_root": str(store.root), "tag": store.encoder_tag, "round": store.round,
            "dim": int(store.metadata()["dim"]), "train": train, "val": val, "test": test, "miner_name": miner_name,
            "val_selects": selects, "seed": seed,
            "driver_checkpoints": driver_checkpoint_dir(config.workers, storage, name)}
    checkpoint = run_loop(train_loop_per_worker, loop, workers=config.workers, use_gpu=config.use_gpu,
                          cpus_per_worker=config.cpus_per_worker, max_failures=config.max_failures, run_dir=run_dir,
                          name=name, checkpoint_file=CHECKPOINT_FILE, what="MIL training").checkpoint
    if checkpoint is None:
        raise HnmError(f"MIL run {name!r} in {storage} reported no checkpoint; delete {storage / name} to start afresh")
    state = load_state(checkpoint, CHECKPOINT_FILE)
    best = state["best"]
    threshold = float(best.get("val_threshold", FALLBACK_THRESHOLD))
    meta = {"aggregator": config.aggregator, "embed": config.embed, "standardize": standardize,
            "hidden": config.hidden, "dropout": config.dropout,
            "dim": loop["dim"], "threshold": threshold, "epoch": best["epoch"], "encoder_tag": store.encoder_tag,
            "eval_chunk_tiles": config.eval_chunk_tiles}
    model_path = save_aggregator(run_dir / f"{name}_aggregator", best["model"], meta)
    metrics = {k: v for k, v in best.items() if k != "model"}
    metrics["val_best_f1"] = best_val_f1(state.get("history", []))
    return MILResult(str(model_path), int(best["epoch"]), threshold, metrics,
                     state.get("history", []), state.get("official_protocol"))


def standardisation(store: FeatureStore, slide_ids: list[str], mode: str) -> Standardisation:
    """(mean, scale, the mode used) the aggregator standardises features with (`mil.standardize`): shared =
    per-feature mean and one scale for all features (the RMS of their stds: a fresh encoder's tiny spread is undone,
    but a feature that barely varies in training is not blown up 100-1000x at test, as per-feature z-scores do;
    measured on MNIST-bags), per_feature = z-scores, auto = `resolved_standardize` of the stds, none = identity (the
    official code)."""
    if mode == "none":
        return np.zeros(1), np.ones(1), mode
    mean, std = feature_statistics(store, slide_ids)
    if mode == "auto":
        mode = resolved_standardize(std)
        log.info("MIL: mil.standardize auto -> %s (training features' std max / median %.3g; per_feature above %g)",
                 mode, std_spread(std), STANDARDIZE_AUTO_SPREAD)
    if mode == "shared":
        std = np.full_like(std, np.sqrt(np.mean(std ** 2)))
    return mean, std, mode


def std_spread(std: np.ndarray) -> float:
    """max / median of the stds of the features that vary (std above Standardized's floor, 1e-6; 1.0 when none):
    the features a ReLU encoder's fine-tuning leaves constant (up to 28 of 128 on the Camelyon16-regime cohort)
    would otherwise lower the median and read as a spread of units."""
    varying = std[std > STD_FLOOR]
    return float(np.max(varying) / np.median(varying)) if len(varying) else 1.0


def resolved_standardize(std: np.ndarray) -> str:
    """mil.standardize auto for these per-feature stds: per_feature when they spread more than STANDARDIZE_AUTO_SPREAD
    (one shared scale would shrink the small-unit features to nothing: birds 0.876 -> 0.949 accuracy per_feature),
    else shared (encoder features and pixels spread 2-3x; per-feature z-scores cost MNIST-bags 0.05-0.11 AUC)."""
    return "per_feature" if std_spread(std) > STANDARDIZE_AUTO_SPREAD else "shared"


def feature_statistics(store: FeatureStore, slide_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over all tiles of these slides, in one streaming pass over the store."""
    total, total_sq, count = 0.0, 0.0, 0
    for slide_id in slide_ids:
        features = store.read_bag(slide_id, as_stored=True).features.astype(np.float64)
        total = total + features.sum(0)
        total_sq = total_sq + (features ** 2).sum(0)
        count += len(features)
    mean = total / max(count, 1)
    return mean, np.sqrt(np.maximum(total_sq / max(count, 1) - mean ** 2, 0.0))


@entry_point
def main(argv: list[str] | None = None) -> int:
    """CLI: train the aggregator on an existing feature store and write RUN/metrics.json."""
    from hnm_ray.run.cluster import init_ray

    parser = cli_parser("python -m hnm_ray.training.mil", __doc__)
    add_store_arguments(parser)
    parser.add_argument("--out", required=True, help="run folder (resumes when it exists)")
    cfg.add_source_arguments(parser)
    cfg.add_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    tree = cfg.load_config(TrainConfig, args)
    if not tree.run.manifest:
        raise ConfigError("run.manifest", "required: pass --manifest PATH (CSV/Parquet with labels and splits)")
    records = load_manifest(tree.run.manifest, seed=tree.run.seed)  # before Ray starts
    init_ray()
    store = FeatureStore(args.store, args.tag, round=args.round)
    result = fit_mil(tree.mil, store, records, args.out, seed=tree.run.seed)
    metrics = {**result.metrics, **evaluate_split(result.model_path, store, records, "test",
                                                       plugin=tree.mil.aggregator)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(json.dumps(metrics, indent=2, default=float), out / "metrics.json")
    log.info("MIL: best epoch %d, test AUC %s -> %s", result.best_epoch, metrics.get("test_auc"), out / "metrics.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
