"""Manifest validation: every bad row in one error, path resolution, seeded stratified split, folders."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hnm_ray.core.errors import ConfigError, ManifestError
from hnm_ray.store.manifest import load_manifest, records_from_folder, split_counts


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def _write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _cohort(folder: Path, n_pos: int, n_neg: int) -> Path:
    """A manifest without a split column over empty slide files."""
    lines = ["slide_id,path,label"]
    for i in range(n_pos + n_neg):
        _touch(folder, f"s{i:02d}.tif")
        lines.append(f"s{i:02d},s{i:02d}.tif,{int(i < n_pos)}")
    return _write_csv(folder / "manifest.csv", lines)


def test_good_manifest_resolves_paths_against_its_folder(tmp_path):
    _touch(tmp_path, "slides/a.tif", "slides/b.svs", "masks/a.png")
    manifest = _write_csv(tmp_path / "m.csv", [
        "slide_id,path,label,split,annotation",
        "a,slides/a.tif,1,train,masks/a.png",
        f"b,{tmp_path / 'slides/b.svs'},0,val,",
    ])
    a, b = load_manifest(manifest)
    assert (a.slide_id, a.path, a.label, a.split, a.annotation) == (
        "a", str(tmp_path / "slides/a.tif"), 1, "train", str(tmp_path / "masks/a.png"))
    assert (b.slide_id, b.path, b.label, b.split, b.annotation) == ("b", str(tmp_path / "slides/b.svs"), 0, "val", None)


def test_every_bad_row_is_reported_in_one_error(tmp_path):
    _touch(tmp_path, "ok.tif", "dup.tif", "label.tif", "split.tif", "name.tif", "nolabel.tif")
    manifest = _write_csv(tmp_path / "m.csv", [
        "slide_id,path,label,split",
        "ok,ok.tif,1,train",
        "dup,dup.tif,0,train",
        "dup,dup.tif,1,val",
        "badlabel,label.tif,2,train",
        "gone,missing.tif,0,test",
        "badsplit,split.tif,1,training",
        "a/b,name.tif,0,train",
        "nolabel,nolabel.tif,,train",
        ",ok.tif,0,train",
    ])
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    problems = info.value.problems
    text = str(info.value)
    expected = [
        ("rows 2, 3", "duplicate slide_id 'dup'"),
        ("row 4 (slide_id 'badlabel')", "label '2' is not 0 or 1"),
        ("row 5 (slide_id 'gone')", "slide file not found"),
        ("row 6 (slide_id 'badsplit')", "split 'training' is not one of"),
        ("row 7 (slide_id 'a/b')", "not usable as a file name"),
        ("row 8 (slide_id 'nolabel')", "label is missing"),
        ("row 9", "slide_id is empty"),
    ]
    for where, what in expected:
        assert any(p.startswith(where) and what in p for p in problems), (where, what, problems)
        assert what in text
    assert len(problems) == len(expected)


def test_missing_columns_are_reported_with_the_row_problems(tmp_path):
    manifest = _write_csv(tmp_path / "m.csv", ["slide_id,label", "a,1", "b,3"])
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    problems = info.value.problems
    assert "missing column 'path'" in problems
    assert any("label '3' is not 0 or 1" in p for p in problems)
    with pytest.raises(ManifestError, match="missing column 'label'"):
        load_manifest(_write_csv(tmp_path / "n.csv", ["slide_id,path", "a,a.tif"]), check_files=False)


def test_missing_manifest_and_unlabeled_prediction_manifest(tmp_path):
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(tmp_path / "nope.csv")
    _touch(tmp_path, "a.tif")
    (record,) = load_manifest(_write_csv(tmp_path / "p.csv", ["slide_id,path", "a,a.tif"]), require_labels=False)
    assert (record.label, record.split) == (None, "predict")


def test_parquet_manifest_with_numeric_and_boolean_labels(tmp_path):
    _touch(tmp_path, "a.tif", "b.tif", "c.tif")
    table = pa.table({"slide_id": ["a", "b", "c"], "path": ["a.tif", "b.tif", "c.tif"], "label": [1.0, 0.0, None],
                      "split": ["train", "val", "test"]})
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="row 3 .*label is missing"):
        load_manifest(tmp_path / "m.parquet")
    records = load_manifest(tmp_path / "m.parquet", require_labels=False)
    assert [r.label for r in records] == [1, 0, None]
    pq.write_table(table.set_column(2, "label", pa.array([True, False, True])), tmp_path / "b.parquet")
    assert [r.label for r in load_manifest(tmp_path / "b.parquet")] == [1, 0, 1]


def test_stratified_split_is_seeded_stratified_and_row_order_free(tmp_path):
    manifest = _cohort(tmp_path, n_pos=8, n_neg=12)
    first = {r.slide_id: r.split for r in load_manifest(manifest, seed=3)}
    assert first == {r.slide_id: r.split for r in load_manifest(manifest, seed=3)}
    assert first != {r.slide_id: r.split for r in load_manifest(manifest, seed=4)}
    lines = manifest.read_text().splitlines()
    shuffled = _write_csv(tmp_path / "shuffled.csv", [lines[0], *reversed(lines[1:])])
    assert first == {r.slide_id: r.split for r in load_manifest(shuffled, seed=3)}
    counts = Counter((r.split, r.label) for r in load_manifest(manifest, seed=3))
    assert counts == {("train", 1): 4, ("val", 1): 2, ("test", 1): 2, ("train", 0): 6, ("val", 0): 3, ("test", 0): 3}


def test_tiny_cohort_keeps_both_classes_in_train_and_val_where_possible(tmp_path):
    records = load_manifest(_cohort(tmp_path, n_pos=2, n_neg=3))
    labels_in = {split: {r.label for r in records if r.split == split} for split in ("train", "val", "test")}
    assert labels_in["train"] == {0, 1} and labels_in["val"] == {0, 1}
    assert labels_in["test"] == {0}
    assert split_counts(1, 0.25, 0.25) == (0, 0)
    assert split_counts(3, 0.25, 0.25) == (1, 1)
    with pytest.raises(ConfigError, match="val_fraction"):
        load_manifest(tmp_path / "manifest.csv", val_fraction=0.5, test_fraction=0.5)


def test_records_from_folder_makes_safe_unique_ids(tmp_path):
    _touch(tmp_path, "b.svs", "a slide.TIF", "notes.txt", ".hidden.tif")
    records = records_from_folder(tmp_path)
    assert [(r.slide_id, Path(r.path).name, r.label, r.split) for r in records] == [
        ("a_slide", "a slide.TIF", None, "predict"), ("b", "b.svs", None, "predict")]
    _touch(tmp_path, "a_slide.tif")
    with pytest.raises(ManifestError, match="all map to slide_id 'a_slide'"):
        records_from_folder(tmp_path)
    with pytest.raises(ManifestError, match="no slide files"):
        records_from_folder(tmp_path, extensions=(".ndpi",))
