"""Slide- and instance-level metrics: AUC, accuracy/precision/recall/F1 at the Youden threshold, AUPRC.

Thresholds are chosen on validation data and passed in to evaluate test data (never picked on test).
A prediction is positive when its score is >= the threshold (scikit-learn's roc_curve convention).
Every dict holds plain floats/ints; undefined values are nan, never an exception.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (accuracy_score, average_precision_score, f1_score, precision_score, recall_score,
                             roc_auc_score, roc_curve)

FALLBACK_THRESHOLD = 0.5


def _binary_inputs(y, p) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(y).reshape(-1)
    scores = np.asarray(p, dtype=np.float64).reshape(-1)
    if labels.size == 0 or labels.size != scores.size:
        raise ValueError(f"need as many labels as scores and at least one of each, got {labels.size} and {scores.size}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {sorted(set(labels.tolist()))[:10]}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain nan or inf")
    return labels.astype(np.int64), scores


def _both_classes(labels: np.ndarray) -> bool:
    return 0 < int(labels.sum()) < labels.size


def youden_threshold(y, p) -> float:
    """ROC-optimal threshold maximising tpr - fpr (Youden's J); 0.5 when y holds a single class."""
    labels, scores = _binary_inputs(y, p)
    if not _both_classes(labels):
        return FALLBACK_THRESHOLD
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    if not np.isfinite(thresholds[best]):
        return float(np.nextafter(scores.max(), np.inf))
    return float(thresholds[best])


def slide_metrics(y, p, threshold: float | None = None) -> dict[str, float]:
    """AUC plus accuracy, precision, recall and F1 at `threshold` (None: Youden threshold on these data)."""
    labels, scores = _binary_inputs(y, p)
    if threshold is None:
        threshold = youden_threshold(labels, scores)
    predicted = (scores >= threshold).astype(np.int64)
    auc = float(roc_auc_score(labels, scores)) if _both_classes(labels) else math.nan
    return {
        "auc": auc,
        "accuracy": float(accuracy_score(labels, predicted)),
        "precision": float(precision_score(labels, predicted, zero_division=0.0)),
        "recall": float(recall_score(labels, predicted, zero_division=0.0)),
        "f1": float(f1_score(labels, predicted, zero_division=0.0)),
        "threshold": float(threshold),
        "n": int(labels.size),
    }


def instance_metrics(truth, scores) -> dict[str, float]:
    """Tile-level AUC and AUPRC where tile truth is known (truth == -1 ignored); nan when not computable."""
    known_truth = np.asarray(truth).reshape(-1)
    all_scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if known_truth.size != all_scores.size:
        raise ValueError(f"need one truth value per score, got {known_truth.size} and {all_scores.size}")
    keep = known_truth != -1
    labels, kept = known_truth[keep], all_scores[keep]
    result = {"instance_auc": math.nan, "instance_auprc": math.nan, "n": int(keep.sum())}
    if labels.size == 0:
        return result
    labels, kept = _binary_inputs(labels, kept)
    if _both_classes(labels):
        result["instance_auc"] = float(roc_auc_score(labels, kept))
        result["instance_auprc"] = float(average_precision_score(labels, kept))
    return result
