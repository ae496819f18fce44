"""Slide manifests: read a CSV/Parquet manifest, check every row, and split slides.

A manifest has the columns `slide_id` (unique, usable as a file name), `path`, `label` (0/1),
optionally `split` (train/val/test; absent -> seeded stratified split) and `annotation` (a tumour
mask aligned to the slide, for tile truth). Relative paths resolve against the manifest's folder.
Every bad row and column is reported at once, in one ManifestError.
"""
from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hnm_ray.core.errors import ConfigError, ManifestError

SPLITS = ("train", "val", "test")
PREDICT = "predict"
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs")
MAX_NAME_LENGTH = 200
_SAFE_NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]*")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")
_LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


@dataclass(frozen=True)
class SlideRecord:
    """One slide of a cohort: id, absolute path, label (None when unknown), split and optional annotation."""

    slide_id: str
    path: str
    label: int | None
    split: str
    annotation: str | None = None


def name_problem(name: str) -> str | None:
    """Why `name` cannot be used as a file name in the feature store (None when it can)."""
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"is longer than {MAX_NAME_LENGTH} characters"
    if not _SAFE_NAME.fullmatch(name):
        return ("is not usable as a file name: use letters, digits, '.', '_', '+', '-' "
                "(not starting with '.' or '-')")
    return None


def load_manifest(path: str | Path, require_labels: bool = True, seed: int = 0, val_fraction: float = 0.25,
                  test_fraction: float = 0.25, check_files: bool = True) -> list[SlideRecord]:
    """Read and validate a CSV/Parquet manifest; raises one ManifestError listing every bad row and column."""
    _check_fractions(val_fraction, test_fraction)
    path = Path(path).expanduser()
    table = _read_table(path)
    base = path.resolve().parent
    columns = set(table.column_names)
    problems = [f"missing column {name!r}" for name in ("slide_id", "path") if name not in columns]
    if require_labels and "label" not in columns:
        problems.append("missing column 'label' (0/1 slide labels are required for training; "
                        "to score unlabelled slides use python -m hnm_ray.predict --slides with a folder of slides "
                        "or this manifest)")
    rows = table.to_pylist()
    records, row_problems = _check_rows(rows, base, columns, require_labels, check_files)
    problems += row_problems + _duplicate_problems(rows)
    if problems:
        raise ManifestError(str(path), problems)
    if "split" not in columns:
        records = stratified_split(records, seed, val_fraction, test_fraction)
    return records


def require_both_classes(records: list[SlideRecord], source: str | Path, split: str = "train") -> None:
    """ManifestError unless the `split` slides hold both classes: MIL trains on positive and negative bags, so a
    one-class cohort is refused before any slide is extracted."""
    counts = [sum(1 for r in records if r.split == split and r.label == label) for label in (0, 1)]
    if min(counts) == 0:
        raise ManifestError(str(source), [
            f"the {split} split has {counts[0]} negative (label 0) and {counts[1]} positive (label 1) slides; "
            f"training needs both classes: add slides of the missing class, or change the split column"])


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(key, f"must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError("val_fraction", f"val_fraction + test_fraction must be < 1 to leave training slides, "
                                          f"got {val_fraction} + {test_fraction}")


def _read_table(path: Path) -> pa.Table:
    """The manifest as an Arrow table (CSV columns read as text, so every value can be checked)."""
    if not path.is_file():
        raise ManifestError(str(path), ["file not found; pass the path of a CSV or Parquet manifest"])
    is_parquet = path.suffix.lower() in (".parquet", ".pq")
    try:
        if is_parquet:
            import pyarrow.parquet as pq

            return pq.read_table(path)
        import pyarrow.csv as pacsv

        text = {name: pa.string() for name in ("slide_id", "path", "label", "split", "annotation")}
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=text, strings_can_be_null=True))
    except (pa.ArrowException, OSError) as exc:
        kind = "Parquet" if is_parquet else "CSV (with a header row)"
        raise ManifestError(str(path), [f"cannot be read as {kind}: {exc}"]) from exc


def _text(value: Any) -> str:
    """A cell as stripped text ('' for missing values)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _label(value: Any) -> int | None:
    """0/1 from int, float, bool or text cells; None when the cell is empty; ValueError otherwise."""
    text = _text(value)
    if not text:
        return None
    if text.lower() not in _LABELS:
        raise ValueError(text)
    return _LABELS[text.lower()]


def _resolve(base: Path, value: str) -> str:
    """An absolute path: relative paths resolve against the manifest's folder."""
    return os.path.abspath(base / Path(value).expanduser())


def _check_rows(rows: list[dict[str, Any]], base: Path, columns: set[str], require_labels: bool,
                check_files: bool) -> tuple[list[SlideRecord], list[str]]:
    """Records of the rows and the problems of every bad row."""
    records: list[SlideRecord] = []
    problems: list[str] = []
    for number, row in enumerate(rows, start=1):
        slide_id = _text(row.get("slide_id"))
        where = f"row {number}" + (f" (slide_id {slide_id!r})" if slide_id else "")
        found: list[str] = []
        if "slide_id" in columns and (reason := name_problem(slide_id)):
            found.append(f"slide_id {reason}" if slide_id else "slide_id is empty")
        path = _text(row.get("path"))
        if "path" in columns and not path:
            found.append("path is empty")
        elif path:
            path = _resolve(base, path)
            if check_files and not os.path.exists(path):
                found.append(f"slide file not found: {path}")
        label = None
        try:
            label = _label(row.get("label"))
            if label is None and require_labels and "label" in columns:
                found.append("label is missing (must be 0 or 1)")
        except ValueError as exc:
            found.append(f"label {exc.args[0]!r} is not 0 or 1")
        split = _text(row.get("split")).lower()
        if "split" in columns and split not in SPLITS:
            found.append(f"split {split!r} is not one of {', '.join(SPLITS)}" if split else
                         "split is empty (use train, val or test, or drop the split column for a seeded stratified split)")
        annotation = _text(row.get("annotation")) or None
        if annotation:
            annotation = _resolve(base, annotation)
            if check_files and not os.path.exists(annotation):
                found.append(f"annotation file not found: {annotation}")
        problems += [f"{where}: {p}" for p in found]
        records.append(SlideRecord(slide_id, path, label, split or PREDICT, annotation))
    return records, problems


def _duplicate_problems(rows: list[dict[str, Any]]) -> list[str]:
    """One problem per slide_id that appears on more than one row."""
    seen: dict[str, list[int]] = defaultdict(list)
    for number, row in enumerate(rows, start=1):
        if slide_id := _text(row.get("slide_id")):
            seen[slide_id].append(number)
    return [f"rows {', '.join(map(str, numbers))}: duplicate slide_id {slide_id!r}"
            for slide_id, numbers in seen.items() if len(numbers) > 1]


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) for one class of n slides: rounded fractions, >= 1 each where a training slide remains."""
    n_val = math.floor(n * val_fraction + 0.5)
    n_test = math.floor(n * test_fraction + 0.5)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    if test_fraction > 0 and n >= 3:
        n_test = max(n_test, 1)
    while n_val + n_test > max(n - 1, 0):
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def stratified_split(records: list[SlideRecord], seed: int = 0, val_fraction: float = 0.25,
                     test_fraction: float = 0.25) -> list[SlideRecord]:
    """Seeded split of labeled records into train/val/test per class (unlabeled ones -> 'predict'), order kept.

    The assignment depends on the slide ids and the seed only, not on the manifest's row order.
    """
    split_of: dict[str, str] = {}
    for label in (0, 1):
        ids = sorted(r.slide_id for r in records if r.label == label)
        order = np.random.default_rng([seed, label]).permutation(len(ids))
        n_val, n_test = split_counts(len(ids), val_fraction, test_fraction)
        names = ["val"] * n_val + ["test"] * n_test + ["train"] * (len(ids) - n_val - n_test)
        split_of.update({ids[i]: name for i, name in zip(order, names)})
    return [SlideRecord(r.slide_id, r.path, r.label, split_of.get(r.slide_id, PREDICT), r.annotation) for r in records]


def records_from_folder(folder: str | Path, extensions: tuple[str, ...] = SLIDE_EXTENSIONS,
                        recursive: bool = False) -> list[SlideRecord]:
    """Unlabeled records (split 'predict') of the slide files in `folder`; slide_id = file name stem made safe."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ManifestError(str(folder), ["folder not found; pass a folder of slide files"])
    suffixes = {e.lower() for e in extensions}
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir())
                   if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))
    if not files:
        raise ManifestError(str(folder), [f"no slide files with extensions {', '.join(sorted(suffixes))}"])
    by_id: dict[str, list[Path]] = defaultdict(list)
    for file in files:
        by_id[safe_name(file.stem)].append(file)
    problems = [f"files {', '.join(str(f) for f in paths)} all map to slide_id {slide_id!r}; rename them"
                for slide_id, paths in by_id.items() if len(paths) > 1]
    if problems:
        raise ManifestError(str(folder), problems)
    return [SlideRecord(slide_id, os.path.abspath(paths[0]), None, PREDICT, None) for slide_id, paths in by_id.items()]


def safe_name(text: str) -> str:
    """`text` turned into a name accepted by `name_problem` (unsafe characters -> '_')."""
    name = _UNSAFE_CHARS.sub("_", text).lstrip(".-")[:MAX_NAME_LENGTH]
    return name or "_"
