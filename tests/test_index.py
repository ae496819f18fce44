"""The tile index stage: stored once per cohort + tiling, read back by later rounds without tissue detection."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from hnm_ray.extraction import index as index_stage
from hnm_ray.config import TilingConfig
from hnm_ray.extraction.index import TileIndex, slide_indexes, tiling_tag
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord


def _table(slide_id: str, n: int) -> pa.Table:
    return pa.table({"slide_id": [slide_id] * n, "path": ["/old/place.svs"] * n,
                     "tile_id": pa.array(np.arange(n), pa.int32()), "x": pa.array(np.arange(n) * 224, pa.int32()),
                     "y": pa.array(np.zeros(n), pa.int32()), "truth": pa.array(np.full(n, -1), pa.int8())})


def test_tiling_tag_changes_with_every_tiling_knob():
    base = tiling_tag(TilingConfig())
    assert base == tiling_tag(TilingConfig()) and base.startswith("t224-level0-")
    for other in (TilingConfig(tile_size=64), TilingConfig(min_tissue=0.2), TilingConfig(level=None, mpp=2.0),
                  TilingConfig(stride=112)):
        assert tiling_tag(other) != base


def test_stored_indexes_are_read_back_without_tissue_detection(tmp_path, monkeypatch):
    index = TileIndex(tmp_path, TilingConfig())
    index.write("a", _table("a", 3))
    index.write("b", _table("b", 5))
    assert not list(index.directory.glob(".*tmp"))

    def no_tiling(*args, **kwargs):
        raise AssertionError("tissue detection ran although every slide's index is stored")

    monkeypatch.setattr(index_stage, "compute_indexes", no_tiling)
    records = [SlideRecord(slide_id=s, path=f"/new/{s}.svs", label=0, split="train") for s in ("a", "b")]
    tables = slide_indexes(records, index, FeatureStore(tmp_path / "store", "t"))
    assert {s: t.num_rows for s, t in tables.items()} == {"a": 3, "b": 5}
    assert tables["a"]["path"].to_pylist() == ["/new/a.svs"] * 3  # the slide's current path, not the stored one


def test_only_missing_slides_are_computed_and_then_stored(tmp_path, monkeypatch):
    index = TileIndex(tmp_path, TilingConfig())
    index.write("a", _table("a", 2))
    asked = []

    def fake_compute(records, tiling, errors, cpus):
        asked.extend(r.slide_id for r in records)
        return {r.slide_id: _table(r.slide_id, 4) for r in records}

    monkeypatch.setattr(index_stage, "compute_indexes", fake_compute)
    records = [SlideRecord(slide_id=s, path=f"{s}.svs", label=0, split="train") for s in ("a", "b")]
    slide_indexes(records, index, FeatureStore(tmp_path / "store", "t"))
    assert asked == ["b"] and index.has("b") and index.read("b").num_rows == 4


def test_the_extraction_stream_reads_stored_indexes_computes_missing_ones_and_carries_failures(tmp_path, monkeypatch,
                                                                                             demo_cohort):
    from hnm_ray.extraction import index_stream
    from hnm_ray.extraction.index import INDEX_FAILED
    from hnm_ray.store.manifest import load_manifest

    index = TileIndex(tmp_path, TilingConfig())
    real = load_manifest(demo_cohort)[0]
    missing = SlideRecord(slide_id="gone", path=str(tmp_path / "gone.tiff"), label=1, split="train")
    computed = index_stream.index_rows(real, index)  # no stored index: tissue detection, then stored
    n = computed.num_rows
    assert index.has(real.slide_id) and n == index.read(real.slide_id).num_rows > 0
    stored = SlideRecord(slide_id="a", path="/new/a.svs", label=0, split="train")
    index.write("a", index.read(real.slide_id))

    def no_tiling(*args, **kwargs):
        raise AssertionError("tissue detection ran for a slide whose index is stored")

    monkeypatch.setattr(index_stream, "index_or_error", no_tiling)
    rows = index_stream.index_rows(stored, index)
    assert rows.column_names == list(index_stream.STREAM_COLUMNS)
    assert rows["tile_id"].to_pylist() == computed["tile_id"].to_pylist() and set(rows["n_tiles"].to_pylist()) == {n}
    assert set(rows["path"].to_pylist()) == {"/new/a.svs"} and set(rows["slide_id"].to_pylist()) == {"a"}
    assert set(rows["error"].to_pylist()) == {""}
    monkeypatch.undo()
    failed = index_stream.index_rows(missing, index)
    assert failed.num_rows == 1 and failed["tile_id"][0].as_py() == INDEX_FAILED and failed["n_tiles"][0].as_py() == 0
    assert "gone" in failed["error"][0].as_py() and not index.has("gone")
