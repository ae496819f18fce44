"""Slide- and instance-level metrics: AUC, accuracy/precision/recall/F1 at the Youden threshold, AUPRC, and how sure
they are (n slides, n positive, 95 % intervals).

Thresholds are chosen on validation data and passed in to evaluate test data (never picked on test).
A prediction is positive when its score is >= the threshold (scikit-learn's roc_curve convention).
Every dict holds plain floats/ints; undefined values are nan, never an exception.

Intervals (`slide_intervals`, INTERVALS says the same in words for reports): slide AUC by a seeded stratified
bootstrap over slides (2,000 resamples, each keeping the split's numbers of positive and negative slides;
percentile interval), accuracy by the Wilson score interval of (slides called right) / n at the fixed threshold.
When every resample separates the classes, the AUC interval is the point [1, 1]: it then says that no resample of
these n slides mixed them, and n says how much that is worth (the accuracy interval stays honest: 16 of 16 right
gives 0.81-1.00).

The ROC curve, AUC, average precision and the counts behind accuracy/precision/recall/F1 are computed here in
numpy (one sort): the MIL stage evaluates validation and test bags every epoch, and scikit-learn's input
validation cost ~14 ms per call there, two thirds of the stage on the demo. They equal scikit-learn's values
(tests compare them).
"""
from __future__ import annotations

import math

import numpy as np

FALLBACK_THRESHOLD = 0.5
Z95 = 1.959963984540054  # standard normal quantile of 0.975
BOOTSTRAP_RESAMPLES = 2000
INTERVAL_KEYS = ("auc_low", "auc_high", "accuracy_low", "accuracy_high")
INTERVALS = ("95 % intervals: slide AUC by a stratified bootstrap over slides (2,000 resamples, seed 0, percentile), "
             "accuracy by the Wilson score interval at the fixed threshold")


def _binary_inputs(y, p) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(y).reshape(-1)
    scores = np.asarray(p, dtype=np.float64).reshape(-1)
    if labels.size == 0 or labels.size != scores.size:
        raise ValueError(f"need as many labels as scores and at least one of each, got {labels.size} and {scores.size}")
    if not ((labels == 0) | (labels == 1)).all():
        raise ValueError(f"labels must be 0/1, got values {sorted(set(labels.tolist()))[:10]}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain nan or inf")
    return labels.astype(np.int64), scores


def _both_classes(labels: np.ndarray) -> bool:
    return 0 < int(labels.sum()) < labels.size


def _counts_by_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, false positives, threshold) when predicting positive at score >= each distinct score."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_labels.size - 1]
    true_positives = np.cumsum(sorted_labels)[last_of_value]
    return true_positives, last_of_value + 1 - true_positives, sorted_scores[last_of_value]


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest first, after a first point (0, 0, inf): scikit-learn's
    `roc_curve(..., drop_intermediate=False)` for 0/1 labels holding both classes."""
    true_positives, false_positives, thresholds = _counts_by_threshold(labels, scores)
    tpr = np.r_[0.0, true_positives / true_positives[-1]]
    fpr = np.r_[0.0, false_positives / false_positives[-1]]
    return fpr, tpr, np.r_[np.inf, thresholds]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids; tied scores count one half), for 0/1 labels holding both classes."""
    fpr, tpr, _ = roc_points(labels, scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as a step sum, sum_n (R_n - R_n-1) P_n (scikit-learn's
    `average_precision_score`), for 0/1 labels holding both classes."""
    true_positives, false_positives, _ = _counts_by_threshold(labels, scores)
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0  # scikit-learn's zero_division=0.0


def youden_threshold(y, p) -> float:
    """ROC-optimal threshold maximising tpr - fpr (Youden's J); 0.5 when y holds a single class."""
    labels, scores = _binary_inputs(y, p)
    if not _both_classes(labels):
        return FALLBACK_THRESHOLD
    fpr, tpr, thresholds = roc_points(labels, scores)
    best = int(np.argmax(tpr - fpr))
    if not np.isfinite(thresholds[best]):
        return float(np.nextafter(scores.max(), np.inf))
    return float(thresholds[best])


def slide_metrics(y, p, threshold: float | None = None) -> dict[str, float]:
    """AUC plus accuracy, precision, recall and F1 at `threshold` (None: Youden threshold on these data)."""
    labels, scores = _binary_inputs(y, p)
    if threshold is None:
        threshold = youden_threshold(labels, scores)
    predicted = scores >= threshold
    positive = labels == 1
    true_pos = int(np.sum(predicted & positive))
    false_pos, false_neg = int(np.sum(predicted & ~positive)), int(np.sum(~predicted & positive))
    return {
        "auc": roc_auc(labels, scores) if _both_classes(labels) else math.nan,
        "accuracy": float(np.mean(predicted == positive)),
        "precision": _ratio(true_pos, true_pos + false_pos),
        "recall": _ratio(true_pos, true_pos + false_neg),
        "f1": _ratio(2 * true_pos, 2 * true_pos + false_pos + false_neg),
        "threshold": float(threshold),
        "n": int(labels.size),
        "n_positive": int(positive.sum()),
    }


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion successes / n ((nan, nan) when n is 0)."""
    if n == 0:
        return math.nan, math.nan
    share, z2 = successes / n, Z95 * Z95
    centre = (share + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _bootstrap_aucs(labels: np.ndarray, scores: list[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """(resamples, len(scores)) AUCs of each score set over one stratified bootstrap of the slides: each resample
    draws the positives from the positives and the negatives from the negatives (with replacement), the same draw for
    every score set (paired), so every resample has an AUC. The AUC of a resample is the count-weighted Mann-Whitney
    sum over (positive, negative) pairs, ties 1/2. `labels` must hold both classes."""
    rng = np.random.default_rng(seed)
    n_pos, n_neg = int(np.sum(labels == 1)), int(np.sum(labels == 0))
    pos_counts = rng.multinomial(n_pos, np.full(n_pos, 1 / n_pos), size=resamples).astype(np.float64)
    neg_counts = rng.multinomial(n_neg, np.full(n_neg, 1 / n_neg), size=resamples).astype(np.float64)
    out = np.empty((resamples, len(scores)))
    for k, score in enumerate(scores):
        pos, neg = score[labels == 1], score[labels == 0]
        wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        out[:, k] = np.sum((pos_counts @ wins) * neg_counts, axis=1) / (n_pos * n_neg)
    return out


def bootstrap_auc_interval(y, p, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the slide AUC over a stratified bootstrap of the slides (`_bootstrap_aucs`).
    (nan, nan) when y holds a single class."""
    labels, scores = _binary_inputs(y, p)
    if not _both_classes(labels):
        return math.nan, math.nan
    low, high = np.quantile(_bootstrap_aucs(labels, [scores], resamples, seed)[:, 0], [0.025, 0.975])
    return float(low), float(high)


def paired_auc_difference(y, p_before, p_after, resamples: int = BOOTSTRAP_RESAMPLES,
                          seed: int = 0) -> dict[str, float]:
    """AUC(p_after) - AUC(p_before) on the same slides and its 95 % percentile interval over a paired stratified
    bootstrap (each resample scores both on the same slides): whether a later round's gain on validation is more than
    these slides can tell. nan when y holds a single class."""
    labels, before = _binary_inputs(y, p_before)
    _, after = _binary_inputs(y, p_after)
    out = {"difference": math.nan, "low": math.nan, "high": math.nan, "n": int(labels.size),
           "n_positive": int(np.sum(labels == 1))}
    if not _both_classes(labels):
        return out
    aucs = _bootstrap_aucs(labels, [before, after], resamples, seed)
    low, high = np.quantile(aucs[:, 1] - aucs[:, 0], [0.025, 0.975])
    out.update(difference=roc_auc(labels, after) - roc_auc(labels, before), low=float(low), high=float(high))
    return out


def slide_intervals(y, p, threshold: float) -> dict[str, float]:
    """auc_low/auc_high (stratified bootstrap over slides) and accuracy_low/accuracy_high (Wilson) at `threshold`."""
    labels, scores = _binary_inputs(y, p)
    auc_low, auc_high = bootstrap_auc_interval(labels, scores)
    accuracy_low, accuracy_high = wilson_interval(int(np.sum((scores >= threshold) == (labels == 1))), labels.size)
    return {"auc_low": auc_low, "auc_high": auc_high, "accuracy_low": accuracy_low, "accuracy_high": accuracy_high}


def with_intervals(y, p, threshold: float | None = None) -> dict[str, float]:
    """`slide_metrics` plus its 95 % intervals (`slide_intervals`): the numbers a report shows."""
    metrics = slide_metrics(y, p, threshold)
    return {**metrics, **slide_intervals(y, p, metrics["threshold"])}


def describe(metrics: dict[str, float], prefix: str = "") -> str:
    """One line of a metrics dict for people: 'AUC 0.875 (95 % CI 0.70-1.00), accuracy 0.812 (0.57-0.93), 16 slides,
    8 tumour'; `prefix` picks keys such as 'test_'."""
    def number(key: str) -> str:
        value, low, high = (metrics.get(f"{prefix}{key}{s}", math.nan) for s in ("", "_low", "_high"))
        return f"{value:.3f} ({low:.2f}-{high:.2f})" if not math.isnan(low) else f"{value:.3f}"

    n, positives = metrics.get(f"{prefix}n", 0), metrics.get(f"{prefix}n_positive")
    tumour = f", {positives} tumour" if positives is not None else ""
    return f"AUC {number('auc')}, accuracy {number('accuracy')} [95 % CI; {n} slides{tumour}]"


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
        result["instance_auc"] = roc_auc(labels, kept)
        result["instance_auprc"] = average_precision(labels, kept)
    return result
