"""The steps of one round of Algorithm 1 that `hnm_ray.train.run_job` chains: the aggregator (paper steps 2-3),
mining behind the update gate (steps 4-6) and the encoder's or adapter's fine-tuning (step 7)."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from hnm_ray.config import TrainConfig
from hnm_ray.core import storage
from hnm_ray.mining.pseudo_labels import Selection, mine_round
from hnm_ray.mining.selection import adopt_round, positive_ratio
from hnm_ray.models.inference import evaluate_split
from hnm_ray.models.metrics import INTERVAL_KEYS, describe
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training.finetune import fit_finetune
from hnm_ray.training.finetune_rows import round_rows
from hnm_ray.training.mil import fit_mil
from hnm_ray.training.official_steps import UNCERTAIN_NEGATIVE

log = logging.getLogger("hnm_ray")


def train_aggregator(config: TrainConfig, store: FeatureStore, records: list[SlideRecord], run_dir: Path, round_: int,
                     weights: str | None, miner_name: str, adapter: str | None = None) -> dict[str, Any]:
    """Paper steps 2-3: the aggregator of this round, evaluated on test with our protocol and the official one
    (`weights`, `adapter`: the encoder and adapter the round's features came from)."""
    fitted = fit_mil(config.mil, store, records, run_dir, name=f"mil_round{round_}", miner_name=miner_name,
                     seed=config.run.seed)
    validation = evaluate_split(fitted.model_path, store, records, "val", fitted.threshold,  # + n and intervals
                                config.mil.aggregator)
    result = {"round": round_, "best_epoch": fitted.best_epoch,
              **{k: v for k, v in fitted.metrics.items() if k.startswith("val_")},
              **{k: v for k, v in validation.items() if k.removeprefix("val_") in INTERVAL_KEYS},
              **evaluate_split(fitted.model_path, store, records, "test", fitted.threshold, config.mil.aggregator),
              "official_protocol": fitted.official_protocol, "model_path": fitted.model_path,
              "encoder_weights": weights, "adapter_weights": adapter}
    storage.write_bytes(json.dumps(result, indent=2, default=float), run_dir / f"metrics_round{round_}.json")
    log.info("round %d: val %s; test %s; test instance AUC %.3f", round_, describe(result, "val_"),
             describe(result, "test_"), result.get("test_instance_auc", np.nan))
    return result


def mine(config: TrainConfig, store: FeatureStore, records: list[SlideRecord], result: dict[str, Any],
         adopted: dict[str, Any] | None, run_dir: Path, round_: int, miner_name: str) -> dict[str, Any]:
    """Paper steps 4-6 behind the update gate: this round's selection, or the last adopted one when the gate
    (mining.update_gate: the best validation F1 over the round's MIL epochs not worse than the best so far) keeps the
    old pseudo labels."""
    val_f1 = gate_f1(result)
    if config.mining.update_gate and adopted is not None and not adopt_round(val_f1, adopted["val_f1"]):
        log.info("round %d: update gate keeps round %d's pseudo labels (val F1 %.3f < %.3f)", round_,
                 adopted["round"], val_f1, adopted["val_f1"])
        return adopted
    last_epoch = (round_ + 1) * config.finetune.epochs_per_round - 1
    # Uncertain negatives: the lowest r_t of the round's last epoch (ours); every candidate for the official loop,
    # which keeps the lowest r_t of them afresh each epoch.
    max_ratio = 1.0 if config.finetune.loop == "official" else positive_ratio(
        last_epoch, config.finetune.warmup_epochs, config.total_finetune_epochs, config.mining.ro, config.mining.rT)
    selection = mine_round(config.mining, store, records, result["model_path"], run_dir, round_, miner_name, max_ratio,
                           plugin=config.mil.aggregator)
    folder = selection.save(run_dir / f"selection_round{round_}")
    return {"round": round_, "val_f1": val_f1 if not math.isnan(val_f1) else -1.0, "folder": str(folder),
            "stats": selection.stats, "hard_negatives": selection.hard_negatives.num_rows,
            "positives": selection.positives.num_rows, "uncertain": selection.uncertain.num_rows}


def gate_f1(result: dict[str, Any]) -> float:
    """The F1 the update gate compares: the best validation F1 over all MIL epochs of the round (as officially), the
    kept epoch's for rounds recorded before it was kept."""
    return float(result.get("val_best_f1", result.get("val_f1", float("nan"))))


def finetune_round(config: TrainConfig, store: FeatureStore, records: list[SlideRecord], selection: Selection,
                   run_dir: Path, round_: int, weights: str | None, head: str | None,
                   uncertain_joined: bool, round0: FeatureStore | None = None,
                   adapter: str | None = None) -> dict[str, Any]:
    """Paper step 7: SupCon fine-tuning of the encoder on this round's hard negatives and positives (+ the uncertain
    negatives once `uncertain_joined`: officially after the first adopted pseudo-label update); with
    finetune.scope adapter, of the adapter (from `adapter`) on those rows' features in `round0`."""
    from hnm_ray.mining.selection import positive_rank_floor
    from hnm_ray.training.adapter import fit_adapter

    epochs = config.finetune.epochs_per_round
    rows = round_rows(config, store, records, selection, round_, uncertain_joined)
    started = time.perf_counter()
    span = {"name": f"finetune_round{round_}", "first_epoch": round_ * epochs, "last_epoch": (round_ + 1) * epochs,
            "total_epochs": config.total_finetune_epochs,
            "positive_floor": positive_rank_floor(selection.positives.num_rows, config.mining.min_positives)}
    if config.finetune.scope == "adapter":
        out = fit_adapter(config, rows, round0 or store, weights, adapter, head, run_dir, **span)
    else:
        out = fit_finetune(config, rows, weights, run_dir, head_weights=head, **span)
    seconds = time.perf_counter() - started
    return {"encoder_weights": out.encoder_weights, "head_weights": out.head_weights,
            "adapter_weights": out.adapter_weights,
            "hard_negatives": selection.hard_negatives.num_rows, "positives": selection.positives.num_rows,
            "uncertain_negatives": int(np.sum(rows["kind"].to_numpy() == UNCERTAIN_NEGATIVE)),
            "tiles_per_epoch": rows.num_rows, "seconds": seconds,
            "seconds_per_epoch": seconds / epochs, "miner": selection.stats,
            "last": out.history[-1] if out.history else {}}

