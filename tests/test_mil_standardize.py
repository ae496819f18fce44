"""mil.standardize auto: per-feature z-scores for features in different units, one shared scale otherwise."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hnm_ray.config import MILConfig, from_tree
from hnm_ray.models.inference import load_aggregator
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training.mil import fit_mil, resolved_standardize, std_spread

# Units of four features: a birds-song-like spread (max / median ~ 1e4) and an encoder-like one (~2x).
MIXED_UNITS = np.array([1e-3, 0.05, 0.1, 500.0])
ONE_UNIT = np.array([0.05, 0.08, 0.1, 0.12])


def store_of(root, scales: np.ndarray, n_bags: int = 24, seed: int = 0) -> tuple[FeatureStore, list[SlideRecord]]:
    """Bags of 6 instances whose features are N(0, 1) x `scales`; a positive bag's first instance shifted."""
    rng = np.random.default_rng(seed)
    store = FeatureStore(root, "units")
    records = []
    for i in range(n_bags):
        label = i % 2
        features = rng.normal(size=(6, len(scales))) * scales
        if label:
            features[0] += 3 * scales
        zeros = pa.array(np.zeros(6, np.int32))
        tiles = pa.table({"tile_id": pa.array(np.arange(6, dtype=np.int32)), "x": zeros, "y": zeros, "level": zeros,
                          "size": zeros})
        store.write_slide(f"bag{i:02d}", tiles, features.astype(np.float32))
        records.append(SlideRecord(f"bag{i:02d}", "", label, "train" if i < 16 else "val" if i < 20 else "test"))
    return store, records


@pytest.mark.parametrize("std,expected", [(ONE_UNIT, "shared"), (MIXED_UNITS, "per_feature"),
                                          (np.array([1.0, 1.0, 9.9]), "shared"),
                                          (np.array([1.0, 1.0, 10.1]), "per_feature"),
                                          # constant features (dead ReLUs) are not a spread of units
                                          (np.array([0.0, 0.0, 0.0, 0.05, 0.1, 0.12]), "shared"),
                                          (np.zeros(4), "shared")])
def test_auto_follows_the_spread_of_the_varying_features(std, expected):
    assert resolved_standardize(std) == expected
    assert std_spread(np.array([2.0, 4.0, 8.0])) == 2.0
    assert std_spread(np.array([0.0, 1e-7, 2.0, 4.0, 8.0])) == 2.0


@pytest.mark.parametrize("scales,z_scored", [(MIXED_UNITS, True), (ONE_UNIT, False)])
def test_default_job_aggregator_standardises_by_the_features_units(tmp_path, scales, z_scored):
    """What fit_mil saves with the default config: each feature's own std for features in different units (one
    shared scale would leave the 1e-3 feature 1e5x below the 500 one), one scale for features in one unit."""
    assert MILConfig().standardize == "auto" and from_tree(MILConfig, {}).standardize == "auto"
    store, records = store_of(tmp_path / "store", scales)
    result = fit_mil(MILConfig(ensemble=1, epochs=1), store, records, tmp_path / "run")
    model, meta = load_aggregator(result.model_path)
    saved = model.std.numpy()
    assert meta["standardize"] == ("per_feature" if z_scored else "shared")  # the mode auto chose, in the model file
    train = np.concatenate([store.read_bag(r.slide_id).features for r in records if r.split == "train"])
    per_feature = train.std(0)
    if z_scored:
        np.testing.assert_allclose(saved, per_feature, rtol=1e-4)
    else:
        np.testing.assert_allclose(saved, np.full(len(scales), np.sqrt(np.mean(per_feature ** 2))), rtol=1e-4)
