"""The tile index as the source of the extraction stream: one Ray Data read task per slide.

Each read task reads the slide's stored index or computes it (tissue detection + grid) and stores it, then yields
the slide's tile rows. Ray Data runs these tasks while the decode and encoder actors already work on earlier
slides, so tissue detection overlaps decoding/encoding instead of preceding it. Every row carries `n_tiles` (the
slide's tile count, so the consumer knows when a slide is complete) and `error`; a slide whose index fails yields
one row with `tile_id` -1 and the error, so the driver records and skips it without losing the stream.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from hnm_ray.extraction.encoder_pool import INDEX_TASK_CPUS
from hnm_ray.extraction.index import INDEX_FAILED, TileIndex, index_or_error
from hnm_ray.store.manifest import SlideRecord

STREAM_COLUMNS = ("slide_id", "path", "tile_id", "x", "y", "level", "size", "n_tiles", "error")


def index_rows(record: SlideRecord, index: TileIndex) -> pa.Table:
    """The stream rows of one slide: its stored index, else computed and stored first; one error row on failure."""
    if index.has(record.slide_id):
        table = index.read(record.slide_id)
    else:
        _, table, error = index_or_error(record, index.tiling)
        if table is None:
            return error_row(record, str(error))
        index.write(record.slide_id, table)
    n = table.num_rows
    return pa.table({
        "slide_id": pa.array([record.slide_id] * n, pa.string()),
        "path": pa.array([str(record.path)] * n, pa.string()),
        "tile_id": table["tile_id"], "x": table["x"], "y": table["y"], "level": table["level"], "size": table["size"],
        "n_tiles": pa.array(np.full(n, n, np.int64)),
        "error": pa.array([""] * n, pa.string()),
    })


def error_row(record: SlideRecord, error: str) -> pa.Table:
    """The single row that carries a slide's index failure down the stream."""
    return pa.table({
        "slide_id": pa.array([record.slide_id], pa.string()), "path": pa.array([str(record.path)], pa.string()),
        "tile_id": pa.array([INDEX_FAILED], pa.int32()), "x": pa.array([0], pa.int32()), "y": pa.array([0], pa.int32()),
        "level": pa.array([0], pa.int8()), "size": pa.array([1], pa.int16()), "n_tiles": pa.array([0], pa.int64()),
        "error": pa.array([error], pa.string()),
    })


class TileIndexSource(Datasource):
    """A Ray Data datasource: one read task per slide yielding `index_rows` (see `tile_stream`)."""

    def __init__(self, records: list[SlideRecord], index: TileIndex) -> None:
        self.records = records
        self.index = index

    def estimate_inmemory_data_size(self) -> int | None:
        """Unknown before the index is computed."""
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list:
        """One read task per slide, whatever `parallelism` asks: a slide is the unit of tissue detection."""
        def task(record: SlideRecord) -> ReadTask:
            def read() -> Iterable[pa.Table]:
                yield index_rows(record, self.index)

            return ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                                input_files=(str(record.path),)))

        return [task(r) for r in self.records]




def tile_stream(records: list[SlideRecord], index: TileIndex):
    """A Ray Dataset of the tile rows of `records` (STREAM_COLUMNS), indexed as the stream is consumed."""
    import ray

    return ray.data.read_datasource(TileIndexSource(records, index), num_cpus=INDEX_TASK_CPUS,
                                    override_num_blocks=max(1, len(records)))
