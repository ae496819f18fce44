"""`mil.ensemble`: a round's trained aggregators combined into one model (`models.ensemble`), with a validation
threshold and validation metrics of its own (the members' are each one draw's)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from hnm_ray.config import MILConfig
from hnm_ray.models.ensemble import AggregatorEnsemble
from hnm_ray.models.inference import evaluate_bags, load_aggregator, read_bags, save_aggregator, split_records
from hnm_ray.models.metrics import FALLBACK_THRESHOLD, slide_metrics
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training.mil import MILResult
from hnm_ray.training.mil_validation import validation_selects


def combine_members(members: list[MILResult], config: MILConfig, store: FeatureStore, records: list[SlideRecord],
                    path: Path) -> MILResult:
    """Save the members as one `AggregatorEnsemble` at `path` (safetensors + JSON) and return it as the round's
    model: its threshold is the Youden threshold of its own validation probabilities (0.5 when the validation split
    has fewer than mil.min_val_bags of a class), its val_* metrics its own, its epoch the members' median; the
    official protocol's numbers are the members' means."""
    loaded = [load_aggregator(member.model_path, config.aggregator) for member in members]
    model = AggregatorEnsemble([aggregator for aggregator, _ in loaded])
    val = split_records(store, records, "val")
    metrics: dict[str, Any] = {}
    threshold = FALLBACK_THRESHOLD
    if val:
        probs, _ = evaluate_bags(model, read_bags(store, val))
        selects = validation_selects([(r.slide_id, int(r.label)) for r in val], config.min_val_bags)
        metrics = {f"val_{k}": v for k, v in slide_metrics([r.label for r in val], probs,
                                                            None if selects else FALLBACK_THRESHOLD).items()}
        threshold = metrics["val_threshold"]
        metrics["val_best_f1"] = metrics["val_f1"]  # the update gate's input: the ensemble's F1 at its threshold
    losses = [m.metrics["val_loss"] for m in members if "val_loss" in m.metrics]
    if losses:
        metrics["val_loss"] = float(np.mean(losses))
    epochs = [member.best_epoch for member in members]
    metrics["val_auc_members"] = [m.metrics.get("val_auc") for m in members]
    meta = {**loaded[0][1], "members": len(members), "threshold": threshold, "epoch": statistics.median_low(epochs),
            "member_epochs": epochs}
    model_path = save_aggregator(path, model.state_dict(), meta)
    return MILResult(str(model_path), meta["epoch"], threshold, metrics, members[0].history,
                     mean_official_protocol([member.official_protocol for member in members]))


def mean_official_protocol(reports: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The members' official-protocol reports (best TEST epoch each) as their means, and how many were averaged."""
    if not reports or any(report is None for report in reports):
        return None
    keys = [k for k, v in reports[0].items() if isinstance(v, (int, float))]
    return {**{k: float(np.mean([report[k] for report in reports])) for k in keys}, "members": len(reports)}
