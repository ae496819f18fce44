"""finetune.negative_classes: the negatives of a round split into k-means classes of their features, fed from
round_rows through the worker's rows to our loop's SupCon (benchmarks/README: SupCon with one negative class
collapsed the projection on the Camelyon16-regime cohort)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from _support import small_config

from hnm_ray.core.errors import ConfigError
from hnm_ray.training.losses import supcon_loss
from hnm_ray.mining.selection import select_positives
from hnm_ray.mining.pseudo_labels import Selection, with_rank
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training import finetune, finetune_rows, tile_batches

CENTRES = np.array([[8.0, 0, 0, 0], [0, 8.0, 0, 0], [0, 0, 8.0, 0]], np.float32)  # three kinds of normal tissue
TILES = 12


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """6 normal slides whose tiles are each of one of three feature clusters (known per tile) and 3 tumour slides."""
    store = FeatureStore(tmp_path_factory.mktemp("negative_classes"), "fixture", round=0)
    rng = np.random.default_rng(3)
    records, negatives, positives, cluster = [], [], [], {}
    for i, name in enumerate([f"normal_{i}" for i in range(6)] + [f"tumor_{i}" for i in range(3)]):
        kinds = rng.integers(0, 3, TILES)
        features = CENTRES[kinds] + rng.normal(0, 0.3, (TILES, 4)).astype(np.float32)
        tiles = pa.table({"tile_id": np.arange(TILES, dtype=np.int32), "x": np.arange(TILES, dtype=np.int32) * 64,
                          "y": np.zeros(TILES, np.int32), "level": np.zeros(TILES, np.int8),
                          "size": np.full(TILES, 64, np.int16)})
        store.write_slide(name, tiles, features)
        records.append(SlideRecord(name, f"/slides/{name}.tif", int(name.startswith("tumor")), "train"))
        part = pa.table({"slide_id": [name] * TILES, "tile_id": np.arange(TILES, dtype=np.int32),
                         "score": rng.uniform(0, 1, TILES).astype(np.float32)})
        if name.startswith("normal"):
            negatives.append(part)
            cluster.update({(name, t): int(k) for t, k in enumerate(kinds)})
        else:
            positives.append(part)
    selection = Selection(pa.concat_tables(negatives), with_rank(select_positives(pa.concat_tables(positives), 0.3,
                                                                                  ratio=1.0)),
                          pa.concat_tables(positives).slice(0, 0), {})
    return {"store": store, "records": records, "selection": selection, "cluster": cluster}


def _rows(cohort, k: int) -> pa.Table:
    config = small_config({"finetune": {"negative_classes": k, "warmup_epochs": 0}})
    return finetune_rows.round_rows(config, cohort["store"], cohort["records"], cohort["selection"], 0, False)


def test_round_rows_give_each_negative_the_class_of_its_feature_cluster_and_the_positives_their_own(cohort):
    rows = _rows(cohort, 3)
    labels, classes = np.asarray(rows["label"]), np.asarray(rows["supcon_class"])
    keys = list(zip(rows["slide_id"].to_pylist(), rows["tile_id"].to_pylist()))
    truth = np.asarray([cohort["cluster"].get(key, -1) for key in keys])
    negative = labels == 0
    assert negative.sum() == 6 * TILES and (classes[~negative] == 3).all()
    # the k-means classes are the feature clusters, up to their numbering
    pairs = set(zip(truth[negative].tolist(), classes[negative].tolist()))
    assert len(pairs) == 3 and {c for _, c in pairs} == {0, 1, 2}
    one = _rows(cohort, 1)  # the paper's rule: the SupCon class is the label
    assert np.array_equal(np.asarray(one["supcon_class"]), np.asarray(one["label"]))


def test_our_loop_contrasts_by_the_rows_supcon_class(cohort, monkeypatch):
    share = tile_batches.worker_share(_rows(cohort, 3), 0, 1)
    assert "supcon_class" in share
    n = len(share["label"])
    batch = {**share, "tiles": np.random.default_rng(0).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
             "error": np.zeros(n, bool)}
    seen = {}

    def objective(z1, z2, labels, fc, epoch, classes=None):
        seen["labels"], seen["classes"] = labels, classes
        return finetune_objective(z1, z2, labels, fc, epoch, classes)

    finetune_objective = finetune.our_objective
    monkeypatch.setattr(finetune, "our_objective", objective)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8))
    fc = {"temperature": 0.1, "warmup_epochs": 0, "augment": "ours", "orientations": "dihedral", "objective": "supcon"}
    loss = finetune.our_loss(batch, model, fc, 1, 1.0, torch.Generator().manual_seed(0), "cpu", True, "rgb_imagenet")
    assert np.array_equal(seen["classes"], share["supcon_class"]) and np.isfinite(float(loss.detach()))
    # the objective: negatives anchor and positives anchor, each view's positives the views of its class
    z1, z2 = torch.randn(n, 8, generator=torch.Generator().manual_seed(1)), torch.randn(n, 8)
    y, c = torch.from_numpy(share["label"].astype(np.int64)), torch.from_numpy(share["supcon_class"].astype(np.int64))
    by_class = finetune_objective(z1, z2, share["label"], fc, 1, share["supcon_class"])
    expected = supcon_loss(z1, z2, c, 0.1, anchor_mask=y == 0) + supcon_loss(z1, z2, c, 0.1, anchor_mask=y == 1)
    assert torch.allclose(by_class, expected)
    assert not torch.allclose(by_class, finetune_objective(z1, z2, share["label"], fc, 1))


def test_negative_classes_with_the_official_loop_is_refused_naming_the_knob():
    with pytest.raises(ConfigError, match="finetune.negative_classes.*applies to --finetune.loop ours"):
        small_config({"finetune": {"negative_classes": 4, "loop": "official"}})
