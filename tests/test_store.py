"""Feature store: schema and metadata, round trip, atomic writes, resume listing, errors.jsonl, Ray view."""
from __future__ import annotations

import errno
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hnm_ray.core.errors import StoreError
from hnm_ray.store.features import FeatureStore, bags, feature_schema
from hnm_ray.store.manifest import SlideRecord

META = {"encoder": "small_cnn", "tile_size": 224, "mpp": 0.5, "level": 0}


def _tiles(n: int, offset: int = 0) -> pa.Table:
    """A tile grid table as slides.grid makes it (with an extra column the store does not keep)."""
    ids = np.arange(n, dtype=np.int32)
    return pa.table({"tile_id": ids, "x": (ids * 224 + offset).astype(np.int32), "y": np.full(n, 448, np.int32),
                     "level": np.zeros(n, np.int8), "size": np.full(n, 224, np.int16),
                     "tissue_fraction": np.ones(n, np.float32)})


def _embeddings(n: int, dim: int, dtype: str, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(dtype)


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return FeatureStore(tmp_path / "features", "small_cnn-abc123", round=2)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_schema_metadata_and_values(store, tmp_path, dtype):
    emb = _embeddings(5, 8, dtype)
    truth = np.array([1, 0, -1, 1, 0], np.int8)
    path = store.write_slide("slide_a", _tiles(5), emb, truth, META)
    assert path == tmp_path / "features" / "small_cnn-abc123" / "round=2" / "slide_a.parquet"
    schema = pq.read_schema(path)
    assert schema.equals(feature_schema(8, dtype))
    assert schema.field("embedding").type == pa.list_(pa.float16() if dtype == "float16" else pa.float32(), 8)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    chunks = {c.path_in_schema: c for c in map(pq.ParquetFile(path).metadata.row_group(0).column, range(8))}
    assert not chunks["embedding.list.element"].has_dictionary_page, "plain embeddings read ~4x faster (bag_cache)"
    assert chunks["embedding.list.element"].compression == "UNCOMPRESSED", "zstd: 1/3 of the disk's write speed"
    assert chunks["slide_id"].has_dictionary_page and chunks["truth"].compression == "ZSTD"
    meta = store.metadata()
    assert meta == {**META, "encoder_tag": "small_cnn-abc123", "round": 2, "dim": 8, "dtype": dtype}

    bag = store.read_bag("slide_a", label=1)
    assert bag.features.dtype == np.float32 and bag.features.shape == (5, 8)
    np.testing.assert_array_equal(bag.features, emb.astype(np.float32))
    np.testing.assert_array_equal(bag.tile_ids, np.arange(5))
    np.testing.assert_array_equal(bag.coords, np.stack([np.arange(5) * 224, np.full(5, 448)], axis=1))
    assert bag.coords.dtype == np.int32 and bag.tile_ids.dtype == np.int32
    np.testing.assert_array_equal(bag.truth, truth)
    assert (bag.slide_id, bag.label, len(bag)) == ("slide_a", 1, 5)
    table = store.read_table("slide_a")
    assert table.column("slide_id").to_pylist() == ["slide_a"] * 5
    assert table.schema.field("level").type == pa.int8() and table.schema.field("size").type == pa.int16()


def test_a_store_written_before_reads_the_same(store):
    """Slide files of stores written before the embedding column was left uncompressed (every column zstd)."""
    emb = _embeddings(4, 8, "float32", seed=3)
    table = store._slide_table("old", _tiles(4), emb, None, META)
    store.directory.mkdir(parents=True)
    pq.write_table(table, store.slide_path("old"), compression="zstd",
                   use_dictionary=[c for c in table.column_names if c != "embedding"])
    store.write_slide("new", _tiles(4), emb, None, META)
    old, new = store.read_bag("old"), store.read_bag("new")
    for key in ("features", "tile_ids", "coords", "truth"):
        np.testing.assert_array_equal(getattr(old, key), getattr(new, key))
    both = store.select_tiles(pa.table({"slide_id": ["old", "new"], "tile_id": [1, 1]}))
    np.testing.assert_array_equal(both.features, emb[[1, 1]])
    assert store.metadata()["dim"] == 8


def test_truth_defaults_to_unknown_and_bad_inputs_name_the_slide(store):
    store.write_slide("s1", _tiles(3), _embeddings(3, 4, "float32"))
    assert store.read_bag("s1").truth.tolist() == [-1, -1, -1]
    with pytest.raises(StoreError, match="slide 's2'.*do not fit 3 tiles"):
        store.write_slide("s2", _tiles(3), _embeddings(4, 4, "float32"))
    with pytest.raises(StoreError, match="slide 's3'.*NaN"):
        store.write_slide("s3", _tiles(1), np.full((1, 4), np.nan, np.float32))
    with pytest.raises(StoreError, match="slide 'a/b'.*not usable as a file name"):
        store.write_slide("a/b", _tiles(1), _embeddings(1, 4, "float32"))
    with pytest.raises(StoreError, match="lacks columns"):
        store.write_slide("s4", _tiles(2).drop_columns(["x"]), _embeddings(2, 4, "float32"))
    assert store.completed() == {"s1"}


def test_missing_and_unreadable_files_raise_store_errors_with_the_fix(store):
    with pytest.raises(StoreError, match="slide 'nope'.*no feature store at .*hnm_ray.extract"):
        store.read_bag("nope")
    with pytest.raises(StoreError, match="no slide files"):
        store.metadata()
    store.write_slide("good", _tiles(2), _embeddings(2, 4, "float16"))
    with pytest.raises(StoreError, match="slide 'other': features not in"):
        store.read_bag("other")
    store.slide_path("broken").write_bytes(b"not parquet at all")
    with pytest.raises(StoreError, match="slide 'broken': cannot read .*delete the file"):
        store.read_bag("broken")


def test_failed_write_leaves_no_partial_file_and_keeps_the_previous_one(store, monkeypatch):
    store.write_slide("s", _tiles(2), _embeddings(2, 4, "float32", seed=1))
    before = store.slide_path("s").read_bytes()

    def disk_full(table, where, **kwargs):
        where.write(b"PAR1 partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    with pytest.raises(StoreError, match="slide 's'.*No space left on device.*Free disk space"):
        store.write_slide("s", _tiles(3), _embeddings(3, 4, "float32"))
    with pytest.raises(StoreError, match="slide 't'"):
        store.write_slide("t", _tiles(3), _embeddings(3, 4, "float32"))
    assert sorted(p.name for p in store.directory.iterdir()) == ["s.parquet"]
    assert store.slide_path("s").read_bytes() == before
    assert store.completed() == {"s"}


def test_completed_ignores_temp_files_and_removes_stale_ones(store):
    store.write_slide("done", _tiles(2), _embeddings(2, 4, "float32"))
    fresh = store.directory / ".live.0123456789ab.parquet.tmp"
    stale = store.directory / ".killed.0123456789ab.parquet.tmp"
    fresh.write_bytes(b"PAR1 being written")
    stale.write_bytes(b"PAR1 half")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert store.completed() == {"done"}
    assert fresh.exists() and not stale.exists()
    assert [p.name for p in store.files()] == ["done.parquet"]


def test_errors_jsonl_appends_one_object_per_line(store):
    assert store.errors() == []
    store.record_error("s1", "index", "no tissue")
    store.record_error("s2", "extract", "corrupt JPEG tile")
    with open(store.errors_path, "a") as handle:
        handle.write('{"slide_id": "s3", "sta')  # a line cut short by a killed writer
    lines = store.errors_path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["slide_id"] == "s1"
    entries = store.errors()
    assert [(e["slide_id"], e["stage"], e["cause"]) for e in entries] == [
        ("s1", "index", "no tissue"), ("s2", "extract", "corrupt JPEG tile")]
    assert all(set(e) == {"slide_id", "stage", "cause", "time"} for e in entries)


def test_select_tiles_and_bags_helper(store):
    store.write_slide("a", _tiles(4), _embeddings(4, 3, "float32", seed=1))
    store.write_slide("b", _tiles(3, offset=7), _embeddings(3, 3, "float32", seed=2))
    selection = pa.table({"slide_id": ["b", "a", "b", "a"], "tile_id": pa.array([2, 3, 0, 0], pa.int32()),
                          "score": [0.9, 0.8, 0.7, 0.6]})
    picked = store.select_tiles(selection, name="hard_negatives", label=0)
    expected = np.stack([store.read_bag("b").features[2], store.read_bag("a").features[3],
                         store.read_bag("b").features[0], store.read_bag("a").features[0]])
    np.testing.assert_array_equal(picked.features, expected)
    assert picked.tile_ids.tolist() == [2, 3, 0, 0] and picked.coords[0].tolist() == [2 * 224 + 7, 448]
    assert (picked.slide_id, picked.label) == ("hard_negatives", 0)
    with pytest.raises(StoreError, match="slide 'a': some selected tile ids"):
        store.select_tiles(pa.table({"slide_id": ["a"], "tile_id": [9]}))
    records = [SlideRecord("a", "/x/a.tif", 1, "train"), SlideRecord("c", "/x/c.tif", 0, "train"),
               SlideRecord("b", "/x/b.tif", 0, "val")]
    assert [(b.slide_id, b.label, len(b)) for b in bags(store, records, skip_missing=True)] == [("a", 1, 4), ("b", 0, 3)]
    with pytest.raises(StoreError, match="slide 'c'"):
        list(bags(store, records))


def test_store_rejects_unsafe_tags_and_rounds(tmp_path):
    with pytest.raises(StoreError, match="encoder tag"):
        FeatureStore(tmp_path, "../escape")
    with pytest.raises(StoreError, match="round"):
        FeatureStore(tmp_path, "tag", round=-1)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_dataset_is_a_ray_data_view_over_complete_files(store, ray_session):
    store.write_slide("a", _tiles(4), _embeddings(4, 6, "float16"))
    store.write_slide("b", _tiles(3), _embeddings(3, 6, "float16"))
    (store.directory / ".c.0123456789ab.parquet.tmp").write_bytes(b"PAR1 partial")
    store.record_error("c", "extract", "killed")
    ds = store.dataset(columns=["slide_id", "tile_id", "embedding"])
    rows = ds.take_all()
    assert len(rows) == 7
    assert sorted({r["slide_id"] for r in rows}) == ["a", "b"]
    assert np.asarray(rows[0]["embedding"]).shape == (6,)
