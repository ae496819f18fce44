"""Slide and instance metrics on small hand-worked examples, and nan handling."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hnm_ray.metrics import instance_metrics, slide_metrics, youden_threshold

# 4 negatives, 3 positives. Youden's J = tpr - fpr at each threshold (predict positive when p >= t):
#   t=0.9: 1/3 - 0 = .333   t=0.7: 2/3 - 0 = .667   t=0.65: 2/3 - 1/4 = .417
#   t=0.5: 1 - 1/4 = .750 (best)   t=0.3: 1 - 1/2 = .5   t=0.2: .25   t=0.1: 0
Y = [0, 0, 0, 0, 1, 1, 1]
P = [0.1, 0.2, 0.3, 0.65, 0.5, 0.7, 0.9]


def test_youden_threshold_hand_example():
    assert youden_threshold(Y, P) == pytest.approx(0.5)


def test_slide_metrics_at_youden_threshold():
    m = slide_metrics(Y, P)
    # predicted positive: 0.65 (FP), 0.5, 0.7, 0.9 (TP) -> TP 3, FP 1, TN 3, FN 0
    assert m["threshold"] == pytest.approx(0.5)
    assert m["auc"] == pytest.approx(11 / 12)  # 0.5 beats 3 of 4 negatives, 0.7 and 0.9 beat all 4
    assert m["accuracy"] == pytest.approx(6 / 7)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(6 / 7)  # 2 * 0.75 * 1 / 1.75
    assert m["n"] == 7


def test_slide_metrics_with_given_validation_threshold():
    m = slide_metrics(Y, P, threshold=0.8)
    # only 0.9 predicted positive -> TP 1, FP 0, TN 4, FN 2
    assert m["threshold"] == 0.8
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(0.5)


def test_metrics_are_plain_json_floats():
    m = slide_metrics(np.array(Y), np.array(P, dtype=np.float32))
    assert all(type(v) in (float, int) for v in m.values())
    assert json.loads(json.dumps(m)) == pytest.approx(m)


def test_single_class_gives_nan_auc_not_a_crash():
    m = slide_metrics([0, 0, 0], [0.2, 0.7, 0.4])
    assert math.isnan(m["auc"])
    assert m["threshold"] == 0.5
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert youden_threshold([1, 1], [0.3, 0.9]) == 0.5
    json.dumps(m)


def test_youden_threshold_is_finite_when_scores_are_inverted():
    threshold = youden_threshold([1, 0], [0.2, 0.8])
    assert math.isfinite(threshold) and threshold > 0.8


def test_slide_metrics_rejects_bad_input():
    with pytest.raises(ValueError):
        slide_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        slide_metrics([0, 1], [0.1])
    with pytest.raises(ValueError):
        slide_metrics([], [])
    with pytest.raises(ValueError):
        slide_metrics([0, 1], [0.1, float("nan")])


def test_instance_metrics_hand_example_ignores_unknown_truth():
    truth = [-1, 0, 1, 1, 0, -1]
    scores = [5.0, 0.1, 0.8, 0.3, 0.35, -5.0]
    m = instance_metrics(np.array(truth, dtype=np.int8), scores)
    assert m["n"] == 4
    assert m["instance_auc"] == pytest.approx(0.75)  # 0.8 beats both negatives, 0.3 beats one
    # ranked: 0.8 (pos, P=1, R=1/2), 0.35 (neg), 0.3 (pos, P=2/3, R=1) -> AP = 1/2 * 1 + 1/2 * 2/3
    assert m["instance_auprc"] == pytest.approx(5 / 6)


def test_instance_metrics_nan_when_not_computable():
    m = instance_metrics([-1, -1], [0.2, 0.3])
    assert m["n"] == 0 and math.isnan(m["instance_auc"]) and math.isnan(m["instance_auprc"])
    m = instance_metrics([0, 0, -1], [0.2, 0.3, 0.4])
    assert m["n"] == 2 and math.isnan(m["instance_auc"]) and math.isnan(m["instance_auprc"])
    with pytest.raises(ValueError):
        instance_metrics([0, 1], [0.2])


@pytest.mark.parametrize("seed", range(6))
def test_numpy_metrics_equal_scikit_learn_with_ties(seed):
    """The numpy ROC/AUC/AP/counts equal scikit-learn's on random data with many tied scores."""
    from sklearn.metrics import (average_precision_score, f1_score, precision_score, recall_score, roc_auc_score,
                                 roc_curve)

    from hnm_ray.metrics import roc_points

    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(n), 1)  # ~10 distinct values: ties within and across classes
    fpr, tpr, thresholds = roc_points(labels, scores)
    want_fpr, want_tpr, want_thresholds = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, want_fpr)
    np.testing.assert_allclose(tpr, want_tpr)
    np.testing.assert_array_equal(thresholds, want_thresholds)
    m = slide_metrics(labels, scores)
    predicted = (scores >= m["threshold"]).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["precision"] == pytest.approx(precision_score(labels, predicted, zero_division=0.0))
    assert m["recall"] == pytest.approx(recall_score(labels, predicted, zero_division=0.0))
    assert m["f1"] == pytest.approx(f1_score(labels, predicted, zero_division=0.0))
    instance = instance_metrics(labels, scores)
    assert instance["instance_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert instance["instance_auprc"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
