"""The feature store: one Parquet file per slide per round, written atomically.

Layout: `<root>/<encoder_tag>/round=<r>/<slide_id>.parquet` with the columns of `feature_schema` (the embedding
column plain and uncompressed, the others zstd; stores written before, with the embedding zstd too, read the same),
and the extraction settings (encoder tag, tile size, mpp, dim, dtype) as JSON in the file's schema metadata. The
root is a folder or an object-storage URI (`s3://bucket/features`, see `hnm_ray.core.storage`). A slide file is written
atomically (locally: a hidden temp name in the same folder, renamed; on object storage: one upload that becomes
visible when complete), so a slide is either complete or absent and a killed job resumes by skipping `completed()`
slides. Failures go to `errors.jsonl` in the same folder, one JSON object a line (on object storage: one object a
record).
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hnm_ray.core import storage
from hnm_ray.core.errors import StoreError
from hnm_ray.core.storage import Location
from hnm_ray.store.manifest import SlideRecord, name_problem

log = logging.getLogger("hnm_ray")

METADATA_KEY = b"hnm_ray"
SUFFIX = ".parquet"
TEMP_SUFFIX = ".parquet.tmp"
STALE_TEMP_SECONDS = 600.0
GRID_TYPES = {"tile_id": pa.int32(), "x": pa.int32(), "y": pa.int32(), "level": pa.int8(), "size": pa.int16()}
EMBEDDING_TYPES = {"float16": pa.float16(), "float32": pa.float32()}


def feature_schema(dim: int, dtype: str = "float16", metadata: dict[str, Any] | None = None) -> pa.Schema:
    """Schema of a slide's feature file: grid columns, embedding fixed_size_list<dtype>[dim], truth int8 (-1 unknown)."""
    if dtype not in EMBEDDING_TYPES:
        raise StoreError(f"embedding dtype {dtype!r} is not supported; use one of {sorted(EMBEDDING_TYPES)}")
    fields = [pa.field("slide_id", pa.string()), *(pa.field(k, t) for k, t in GRID_TYPES.items()),
              pa.field("embedding", pa.list_(EMBEDDING_TYPES[dtype], dim)), pa.field("truth", pa.int8())]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, default=str)} if metadata else None)




@dataclass(eq=False)
class Bag:
    """One MIL bag: a slide's tile features (N, D) float32 (or as stored, where asked: `widened` makes them float32)
    with tile ids, level-0 coords (x, y), tile truth and label."""

    slide_id: str
    features: np.ndarray
    tile_ids: np.ndarray
    coords: np.ndarray
    truth: np.ndarray
    label: int | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def widened(self) -> Bag:
        """This bag with float32 features of its own (itself when they are float32 and writable: a bag as stored may
        be a read-only view of Arrow's buffer, which a torch tensor must not share)."""
        if self.features.dtype == np.float32 and self.features.flags.writeable:
            return self
        return replace(self, features=self.features.astype(np.float32))


def bag_from_table(table: pa.Table, slide_id: str, label: int | None = None, as_stored: bool = False) -> Bag:
    """A Bag from rows of feature files (embeddings widened to float32, or in the stored dtype when `as_stored`)."""
    embedding = table.column("embedding").combine_chunks()
    dim = embedding.type.list_size
    values = embedding.flatten().to_numpy(zero_copy_only=False)
    return Bag(
        slide_id=slide_id,
        features=(values if as_stored else values.astype(np.float32)).reshape(table.num_rows, dim),
        tile_ids=table.column("tile_id").to_numpy().astype(np.int32),
        coords=np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1).astype(np.int32),
        truth=table.column("truth").to_numpy().astype(np.int8),
        label=label,
    )


class FeatureStore:
    """Per-slide Parquet feature files of one encoder and round: write atomically, list, read bags, log errors."""

    def __init__(self, root: str | Path, encoder_tag: str, round: int = 0) -> None:
        if reason := name_problem(encoder_tag):
            raise StoreError(f"encoder tag {encoder_tag!r} {reason}; use models.encoders.encoder_tag() to make one")
        if int(round) < 0:
            raise StoreError(f"round must be >= 0, got {round}")
        self.root = storage.location(root)
        self.encoder_tag = encoder_tag
        self.round = int(round)
        self.directory = storage.join(self.root, encoder_tag, f"round={self.round}")
        self.errors_path = storage.join(self.directory, "errors.jsonl")

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.directory)!r})"

    def slide_path(self, slide_id: str) -> Location:
        """Path (URI on object storage) of a slide's feature file (StoreError when slide_id is not a safe file name)."""
        if reason := name_problem(slide_id):
            raise StoreError(f"slide {slide_id!r}: slide_id {reason}; fix it in the manifest")
        return storage.join(self.directory, f"{slide_id}{SUFFIX}")

    def files(self) -> list[Location]:
        """The complete slide files of this round, sorted (temp files of unfinished writes are not listed)."""
        return storage.list_files(self.directory, SUFFIX)

    def completed(self) -> set[str]:
        """Slide ids with a complete feature file; removes stale temp files left by killed writers."""
        self.clean_temp()
        return {storage.name(p)[: -len(SUFFIX)] for p in self.files()}

    def clean_temp(self, older_than_s: float = STALE_TEMP_SECONDS) -> list[Path]:
        """Remove temp files of writers killed mid-write (older than `older_than_s`, so live writers are safe).
        Object stores have none: an upload cut short never becomes an object."""
        if storage.is_uri(self.directory) or not self.directory.is_dir():
            return []
        cutoff = time.time() - older_than_s
        removed = []
        for path in self.directory.glob(f".*{TEMP_SUFFIX}"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed %d stale temp file(s) from %s", len(removed), self.directory)
        return removed

    def write_slide(self, slide_id: str, tiles: pa.Table, embeddings: np.ndarray, truth: np.ndarray | None = None,
                    metadata: dict[str, Any] | None = None) -> Location:
        """Write one slide's file atomically (temp name + os.replace, or one upload); returns its path. Embeddings are
        not dictionary-encoded (float features hardly repeat, and a bag of them reads ~4x faster plain: the MIL loop
        re-reads the bags its cache does not hold every epoch), not compressed (zstd saves ~6 % of float32 features
        at a third of the disk's write speed: benchmarks/import_h5.py) and carry no min/max statistics."""
        final = self.slide_path(slide_id)
        table = self._slide_table(slide_id, tiles, embeddings, truth, metadata or {})
        others = [c for c in table.column_names if c != "embedding"]
        try:
            storage.write_table(table, final, dictionary=others, statistics=others,
                                compression={**dict.fromkeys(others, "zstd"), "embedding": "none"})
        except OSError as exc:
            raise StoreError(f"slide {slide_id!r}: cannot write features to {final}: {exc}; nothing was kept for this "
                             "slide. Free disk space / check permissions of the store folder, then re-run (finished "
                             "slides are skipped)") from exc
        return final

    def ensure_writable(self) -> None:
        """Create this round's folder and write a probe file in it; StoreError naming the folder and cause otherwise."""
        probe = storage.join(self.directory, f".write-probe.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
        try:
            storage.write_bytes(b"hnm-ray", probe)
            storage.delete(probe)
        except OSError as exc:
            if not storage.is_uri(probe):
                storage.unlink_quietly(probe)
            raise StoreError(f"feature store {self.directory} is not writable: {exc}. Pass an output folder you can "
                             f"write to (and with free space); for object storage, {storage.ENV_HELP}") from exc

    def _slide_table(self, slide_id: str, tiles: pa.Table, embeddings: np.ndarray, truth: np.ndarray | None,
                     metadata: dict[str, Any]) -> pa.Table:
        """The Arrow table of one slide, checked against the schema (StoreError naming the slide otherwise)."""
        missing = [c for c in GRID_TYPES if c not in tiles.column_names]
        embeddings = np.asarray(embeddings)
        n = tiles.num_rows
        if missing:
            raise StoreError(f"slide {slide_id!r}: tile table lacks columns {missing}; pass the tile grid table")
        if embeddings.ndim != 2 or embeddings.shape[0] != n:
            raise StoreError(f"slide {slide_id!r}: embeddings of shape {embeddings.shape} do not fit {n} tiles; "
                             "expected (n_tiles, dim)")
        if embeddings.dtype not in (np.float16, np.float32):
            embeddings = embeddings.astype(np.float32)
        if not np.isfinite(embeddings).all():
            raise StoreError(f"slide {slide_id!r}: embeddings contain NaN or inf; check the encoder weights, "
                             "or store float32 when float16 overflows")
        truth = np.full(n, -1, np.int8) if truth is None else np.asarray(truth)
        if truth.shape != (n,):
            raise StoreError(f"slide {slide_id!r}: truth of shape {truth.shape} does not fit {n} tiles")
        dtype, dim = str(embeddings.dtype), int(embeddings.shape[1])
        schema = feature_schema(dim, dtype, {**metadata, "encoder_tag": self.encoder_tag, "round": self.round,
                                             "dim": dim, "dtype": dtype})
        flat = pa.array(np.ascontiguousarray(embeddings).reshape(-1))
        try:
            columns = [pa.array(np.full(n, slide_id, dtype=object), pa.string()),
                       *(tiles.column(k).cast(t) for k, t in GRID_TYPES.items()),
                       pa.FixedSizeListArray.from_arrays(flat, dim), pa.array(truth.astype(np.int8), pa.int8())]
        except (pa.ArrowInvalid, OverflowError) as exc:
            raise StoreError(f"slide {slide_id!r}: tile table values do not fit the store schema: {exc}") from exc
        return pa.Table.from_arrays(columns, schema=schema)

    def read_table(self, slide_id: str, columns: list[str] | None = None) -> pa.Table:
        """A slide's feature file as an Arrow table (StoreError naming the slide and the fix when absent/unreadable)."""
        path = self.slide_path(slide_id)
        if not storage.is_file(path):
            where = f"not in {self.directory}" if self.files() else f"no feature store at {self.directory}"
            raise StoreError(f"slide {slide_id!r}: features {where}; run `python -m hnm_ray.extract --out {self.root}` "
                             f"with this encoder (tag {self.encoder_tag!r}) and round {self.round} first")
        try:
            # One thread: a slide file's time is its one embedding column, so Arrow's pool only adds hand-offs (an 8k
            # x 512 bag read in 0.034 s instead of 0.073 s on a busy 2-core node, the same on a quiet one), and the
            # MIL loop's reader thread leaves the other core to the training step.
            table = storage.read_table(path, columns=columns, use_threads=False)
        except (pa.ArrowException, OSError) as exc:
            raise StoreError(f"slide {slide_id!r}: cannot read {path}: {exc}; delete the file and re-run extraction "
                             "to rewrite it") from exc
        if columns is None and not isinstance(table.schema.field("embedding").type, pa.FixedSizeListType):
            raise StoreError(f"slide {slide_id!r}: {path} is not a hnm-ray feature file; delete it and re-run extraction")
        return table

    def read_bag(self, slide_id: str, label: int | None = None, as_stored: bool = False) -> Bag:
        """A slide's bag: features float32 (N, D) (in the stored dtype when `as_stored`), tile ids, coords (N, 2),
        truth, and the given label."""
        table = self.read_table(slide_id)
        try:
            return bag_from_table(table, slide_id, label, as_stored)
        except KeyError as exc:
            raise StoreError(f"slide {slide_id!r}: feature file lacks column {exc}; delete it and re-run extraction") from exc

    def select_tiles(self, selection: pa.Table, name: str = "selection", label: int | None = None) -> Bag:
        """Features of the (slide_id, tile_id) rows of `selection` across slides, in its row order, as one Bag."""
        slide_ids = np.asarray(selection.column("slide_id").to_pylist(), dtype=object)
        tile_ids = selection.column("tile_id").to_numpy().astype(np.int64)
        parts, positions = [], []
        for slide_id in dict.fromkeys(slide_ids.tolist()):
            rows = np.flatnonzero(slide_ids == slide_id)
            table = self.read_table(slide_id)
            stored = table.column("tile_id").to_numpy()
            order = np.argsort(stored, kind="stable")
            found = np.searchsorted(stored, tile_ids[rows], sorter=order).clip(0, len(stored) - 1)
            index = order[found] if len(stored) else found
            if not len(stored) or not np.array_equal(stored[index], tile_ids[rows]):
                raise StoreError(f"slide {slide_id!r}: some selected tile ids are not in its feature file "
                                 f"(round {self.round}); the selection comes from another round or encoder")
            parts.append(table.take(pa.array(index)))
            positions.append(rows)
        if not parts:
            dim = int(self.metadata()["dim"])
            return Bag(name, np.zeros((0, dim), np.float32), np.zeros(0, np.int32), np.zeros((0, 2), np.int32),
                       np.zeros(0, np.int8), label)
        merged = pa.concat_tables(parts).take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))
        return bag_from_table(merged, name, label)

    def metadata(self) -> dict[str, Any]:
        """The extraction metadata (encoder tag, tile size, mpp, dim, dtype, ...) stored with the slide files."""
        files = self.files()
        if not files:
            raise StoreError(f"no slide files in {self.directory}; run `python -m hnm_ray.extract --out {self.root}` first")
        try:
            raw = storage.read_schema(files[0]).metadata or {}
            return json.loads(raw[METADATA_KEY])
        except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
            raise StoreError(f"{files[0]}: no readable hnm-ray metadata ({exc}); delete the file and re-run extraction") from exc

    def record_error(self, slide_id: str, stage: str, cause: str) -> None:
        """Append one failure (slide_id, stage, cause, time) to errors.jsonl (StoreError when it cannot)."""
        entry = {"slide_id": str(slide_id), "stage": stage, "cause": str(cause),
                 "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            storage.append_record(self.errors_path, json.dumps(entry))
        except OSError as exc:
            raise StoreError(f"slide {slide_id!r}: cannot record its {stage} failure ({cause}) in {self.errors_path}: "
                             f"{exc}. Free disk space / check permissions of the store folder") from exc

    def errors(self) -> list[dict[str, Any]]:
        """Every recorded failure, oldest first (a line cut short by a killed writer is skipped)."""
        return storage.read_records(self.errors_path)

    def dataset(self, columns: list[str] | None = None, slide_ids: list[str] | None = None, **read_kwargs: Any):
        """A `ray.data.read_parquet` view over this round's complete slide files (or those of `slide_ids`), optionally
        only `columns`. The filesystem travels with the read tasks, so they reach object storage like the driver."""
        import ray.data

        files = self.files() if slide_ids is None else [self.slide_path(s) for s in slide_ids]
        if not files:
            raise StoreError(f"no slide files in {self.directory}; run `python -m hnm_ray.extract --out {self.root}` first")
        fs, _ = storage.filesystem(self.directory)
        ds = ray.data.read_parquet([storage.filesystem(p)[1] for p in files], filesystem=fs, **read_kwargs)
        return ds.select_columns(columns) if columns else ds


def bags(store: FeatureStore, records: Iterable[SlideRecord], skip_missing: bool = False) -> Iterator[Bag]:
    """The bags of `records` (labels from the records); slides without features raise, or are skipped if asked."""
    done = store.completed() if skip_missing else None
    for record in records:
        if done is None or record.slide_id in done:
            yield store.read_bag(record.slide_id, label=record.label)


def write_table_atomically(table: pa.Table, final: Location) -> Location:
    """Write `table` as zstd Parquet, complete or absent (temp + fsync + rename locally, one upload on object
    storage). OSError (disk full, read-only) propagates with no temp file left behind."""
    return storage.write_table(table, final)


def imported_format(store: FeatureStore) -> str | None:
    """The h5 format a store's features were imported from (its metadata's `source_format`), None for features
    extracted from slides or an empty store."""
    if not store.files():
        return None
    return store.metadata().get("source_format")
