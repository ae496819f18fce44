"""Model files that run no code (safetensors + JSON), and the inference helpers used by training, scoring, predict."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from hnm_ray.core.errors import HnmError, ModelFileError
from hnm_ray.models.inference import evaluate_bags, instance_logits, load_aggregator, save_aggregator
from hnm_ray.models.aggregators import build_standardized
from hnm_ray.store.features import Bag


def _model(name: str = "dsmil", dim: int = 12):
    torch.manual_seed(0)
    model = build_standardized(name, dim, hidden=8, dropout=0.0)
    model.set_statistics(np.linspace(-1, 1, dim), np.linspace(0.5, 2, dim))
    return model.eval()


def _meta(name: str = "dsmil", dim: int = 12) -> dict:
    return {"aggregator": name, "hidden": 8, "dropout": 0.0, "dim": dim, "threshold": 0.4, "epoch": 3,
            "encoder_tag": "small_cnn"}


@pytest.mark.parametrize("name", ["dsmil", "dsmil_its2clr", "abmil"])
def test_saved_aggregator_loads_back_with_the_same_outputs(tmp_path, name):
    model = _model(name)
    path = save_aggregator(tmp_path / "agg", model.state_dict(), _meta(name))
    assert path.name == "agg.safetensors" and (tmp_path / "agg.json").is_file()
    loaded, meta = load_aggregator(tmp_path / "agg")
    assert meta["threshold"] == 0.4 and meta["aggregator"] == name
    bag = torch.randn(7, 12)
    for a, b in zip(model(bag), loaded(bag)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert load_aggregator(path)[1] == meta  # the .safetensors path works as well as the stem


def test_a_pickle_crafted_to_run_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "aggregator.pt"
    evil.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(ModelFileError, match="safetensors") as info:
        load_aggregator(evil)
    assert isinstance(info.value, HnmError) and not marker.exists()
    # A .safetensors name over pickled bytes is not a model either, and nothing runs.
    (tmp_path / "fake.safetensors").write_bytes(evil.read_bytes())
    (tmp_path / "fake.json").write_text(json.dumps(_meta()))
    with pytest.raises(ModelFileError, match="cannot be read"):
        load_aggregator(tmp_path / "fake")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["dsmil", "dsmil_its2clr", "abmil"])
def test_instance_logits_of_mixed_slides_equal_each_bags_own(name):
    model = _model(name)
    bags = [Bag(slide_id=f"s{i}", features=np.random.default_rng(i).normal(size=(n, 12)).astype(np.float32),
                tile_ids=np.arange(n, dtype=np.int32), coords=np.zeros((n, 2), np.int32),
                truth=np.full(n, -1, np.int8), label=i % 2) for i, n in enumerate((5, 9, 3))]
    _, per_bag = evaluate_bags(model, bags)
    mixed = instance_logits(model, torch.from_numpy(np.concatenate([b.features for b in bags])))
    np.testing.assert_allclose(mixed.numpy(), np.concatenate(per_bag), rtol=0, atol=1e-5)


def _many_bags(tmp_path, monkeypatch):
    """A store of 8 small bags (test split, half tumour), a saved aggregator, and the most bags alive at once since
    (a list, read after the stage): FeatureStore.read_bag counts the bags whose features are still referenced (by the
    bag, a batch or a tensor)."""
    import gc
    import weakref

    import pyarrow as pa

    from hnm_ray.store.features import FeatureStore
    from hnm_ray.store.manifest import SlideRecord

    store = FeatureStore(tmp_path / "store", "small_cnn")
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        grid = pa.table({"tile_id": np.arange(6, dtype=np.int32), "x": np.arange(6, dtype=np.int32) * 8,
                         "y": np.zeros(6, np.int32), "level": np.zeros(6, np.int8), "size": np.full(6, 8, np.int16)})
        store.write_slide(f"s{i}", grid, rng.normal(size=(6, 12)).astype(np.float16), np.full(6, i % 2, np.int8))
        records.append(SlideRecord(f"s{i}", str(tmp_path / f"s{i}.svs"), i % 2, "test"))
    model_path = save_aggregator(tmp_path / "agg", _model().state_dict(), _meta())
    alive, most = [0], [0]
    read_bag = FeatureStore.read_bag

    def counted(self, slide_id, label=None, as_stored=False):
        gc.collect()  # a bag nothing refers to any more is gone before the next is read
        bag = read_bag(self, slide_id, label, as_stored)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(bag.features, lambda: alive.__setitem__(0, alive[0] - 1))
        return bag

    monkeypatch.setattr(FeatureStore, "read_bag", counted)
    return store, records, model_path, most


def test_evaluating_a_split_reads_its_bags_one_at_a_time(tmp_path, monkeypatch):
    """evaluate_split, tile_threshold and split_probabilities stream the split: at most two bags are alive at a time
    (a split held whole as a list of bags is 129 x ~8k x 512 float32 = ~2 GiB at Camelyon16 scale)."""
    from hnm_ray.models.inference import evaluate_split, split_probabilities, tile_threshold

    store, records, model_path, most = _many_bags(tmp_path, monkeypatch)
    metrics = evaluate_split(model_path, store, records, "test")
    assert metrics["test_n"] == 8 and metrics["test_instance_n"] == 24
    tile_threshold(model_path, store, records, "test")
    labels, probs, ids = split_probabilities(model_path, store, records, None)
    assert ids == [f"s{i}" for i in range(8)] and labels.tolist() == [i % 2 for i in range(8)] and len(probs) == 8
    assert most[0] <= 2, f"{most[0]} of 8 bags were held at once"  # the one in use and the one being read


def test_scoring_every_tile_and_the_reports_slide_outputs_read_bags_one_at_a_time(tmp_path, monkeypatch):
    """Issue 25 item 4, the streaming paths without a test: scoring every tile in the driver (score_tiles in process,
    what mining runs on one node) and the report's heatmaps + QuPath files (write_slide_outputs, here without slide
    images) hold one bag at a time plus the one being read, never the split."""
    from hnm_ray.report.slides import Thresholds, write_slide_outputs
    from hnm_ray.mining.scoring import score_tiles

    store, records, model_path, most = _many_bags(tmp_path, monkeypatch)
    table = score_tiles(model_path, store, records, tmp_path / "scores.parquet", in_process=True)
    assert table.num_rows == 48
    assert most[0] <= 2, f"scoring held {most[0]} of 8 bags at once"
    most[0] = 0
    pictures = {r.slide_id: tmp_path / "heatmaps" / f"{r.slide_id}.png" for r in records[:2]}
    scored = write_slide_outputs(model_path, store, records, tmp_path / "qupath", pictures, Thresholds(0.5, 0.5))
    assert len(scored) == 8 and len(list((tmp_path / "qupath").glob("*.geojson"))) == 8
    assert most[0] <= 2, f"the report held {most[0]} of 8 bags at once"
