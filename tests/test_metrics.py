"""Slide and instance metrics on small hand-worked examples, and nan handling."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hnm_ray.models.metrics import (bootstrap_auc_interval, describe, instance_metrics, paired_auc_difference, roc_auc,
                                    slide_metrics, wilson_interval, with_intervals, youden_threshold)

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
    assert m["n"] == 7 and m["n_positive"] == 3


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

    from hnm_ray.models.metrics import roc_points

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


def test_wilson_interval_hand_values():
    # Wilson (1927): centre (k + z^2/2) / (n + z^2), half-width z sqrt(k(n-k)/n + z^2/4) / (n + z^2), z = 1.96
    assert wilson_interval(16, 16) == pytest.approx((0.8064, 1.0), abs=1e-4)  # all 16 right is not "surely 100 %"
    assert wilson_interval(6, 7) == pytest.approx((0.4869, 0.9743), abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_bootstrap_auc_interval_equals_a_plain_resampling_reference_and_is_seeded():
    """The vectorised stratified bootstrap gives what resampling the slides one by one and calling roc_auc gives, for
    the same draws; the same seed gives the same interval."""
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(9), np.ones(7)].astype(int)
    p = np.round(rng.random(16) + 0.3 * y, 1)  # rounded: ties between classes
    draws = np.random.default_rng(0)
    pos, neg = p[y == 1], p[y == 0]
    pos_counts = draws.multinomial(pos.size, np.full(pos.size, 1 / pos.size), size=2000)
    neg_counts = draws.multinomial(neg.size, np.full(neg.size, 1 / neg.size), size=2000)
    reference = [roc_auc(np.r_[np.ones(pc.sum()), np.zeros(nc.sum())].astype(int),
                         np.r_[np.repeat(pos, pc), np.repeat(neg, nc)]) for pc, nc in zip(pos_counts, neg_counts)]
    low, high = bootstrap_auc_interval(y, p)
    assert (low, high) == pytest.approx(tuple(np.quantile(reference, [0.025, 0.975])))
    assert low < roc_auc(y, p) < high and bootstrap_auc_interval(y, p) == (low, high)
    assert bootstrap_auc_interval(y[:4].tolist() + [1], p[:5]) != (low, high)
    assert all(math.isnan(v) for v in bootstrap_auc_interval([0, 0], [0.1, 0.2]))


def test_paired_auc_difference_resamples_the_same_slides_for_both_and_says_when_a_gain_is_shown():
    """The paired interval equals resampling the slides one by one and differencing roc_auc of both score sets on the
    same draws; the same scores twice give exactly 0; a clear gain on many slides is shown (low > 0), a small one on
    few slides is not; one class gives nan."""
    rng = np.random.default_rng(5)
    y = np.r_[np.zeros(10), np.ones(8)].astype(int)
    before, after = rng.random(18) + 0.2 * y, rng.random(18) + 0.5 * y
    draws = np.random.default_rng(0)
    pos_counts = draws.multinomial(8, np.full(8, 1 / 8), size=2000)
    neg_counts = draws.multinomial(10, np.full(10, 1 / 10), size=2000)

    def resampled(p, pc, nc):
        return roc_auc(np.r_[np.ones(pc.sum()), np.zeros(nc.sum())].astype(int),
                       np.r_[np.repeat(p[y == 1], pc), np.repeat(p[y == 0], nc)])

    reference = [resampled(after, pc, nc) - resampled(before, pc, nc) for pc, nc in zip(pos_counts, neg_counts)]
    gain = paired_auc_difference(y, before, after)
    assert (gain["low"], gain["high"]) == pytest.approx(tuple(np.quantile(reference, [0.025, 0.975])))
    assert gain["difference"] == pytest.approx(roc_auc(y, after) - roc_auc(y, before))
    assert (gain["n"], gain["n_positive"]) == (18, 8)
    assert paired_auc_difference(y, before, before) == {"difference": 0.0, "low": 0.0, "high": 0.0, "n": 18,
                                                        "n_positive": 8}
    many = np.r_[np.zeros(200), np.ones(200)].astype(int)
    noise = rng.random(400)
    assert paired_auc_difference(many, noise, noise + 0.5 * many)["low"] > 0
    assert paired_auc_difference(y, before, before + 0.05 * y * rng.random(18))["low"] <= 0
    assert math.isnan(paired_auc_difference([1, 1], [0.1, 0.2], [0.3, 0.4])["difference"])


def test_with_intervals_carries_n_positives_and_intervals_and_describe_says_them():
    m = with_intervals(Y, P, threshold=0.8)
    assert (m["n"], m["n_positive"]) == (7, 3)
    assert m["auc_low"] <= m["auc"] <= m["auc_high"] and m["accuracy_low"] <= m["accuracy"] <= m["accuracy_high"]
    assert (m["accuracy_low"], m["accuracy_high"]) == pytest.approx(wilson_interval(5, 7))
    line = describe({f"test_{k}": v for k, v in m.items()}, "test_")
    assert line.startswith(f"AUC {m['auc']:.3f} ({m['auc_low']:.2f}-{m['auc_high']:.2f}), accuracy 0.714")
    assert line.endswith("[95 % CI; 7 slides, 3 tumour]")
    json.dumps(m)
