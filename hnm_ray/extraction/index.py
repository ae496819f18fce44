"""The tile index stage: per slide, the tile grid (tissue detection) and tile truth, computed once per cohort and
tiling and written as Parquet (atomically, like the store) under `<root>/index/<tiling-tag>/<slide_id>.parquet`.
Extraction of every round, SimCLR pre-training and fine-tuning read it; only missing slides are computed."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from hnm_ray.core import storage
from hnm_ray.config import TilingConfig
from hnm_ray.core.errors import HnmError
from hnm_ray.run.progress import Progress
from hnm_ray.store.features import FeatureStore, write_table_atomically
from hnm_ray.store.manifest import SlideRecord

log = logging.getLogger("hnm_ray")

INDEX_FAILED = -1  # tile_id of the one row that carries a slide's index failure down the extraction stream
T = TypeVar("T")


def tiling_tag(tiling: TilingConfig) -> str:
    """A folder name for one tiling: tile size, level/mpp and a digest of every tiling and tissue knob."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(tiling), sort_keys=True).encode()).hexdigest()[:10]
    where = f"mpp{tiling.mpp:g}" if tiling.mpp is not None else f"level{tiling.level}"
    return f"t{tiling.tile_size}-{where}-{digest}"


class TileIndex:
    """The stored tile index of one tiling: one Parquet file per slide, complete or absent."""

    def __init__(self, root: str | Path, tiling: TilingConfig) -> None:
        self.tiling = tiling
        self.directory = storage.join(storage.location(root), "index", tiling_tag(tiling))

    def path(self, slide_id: str) -> storage.Location:
        """Where a slide's index lives (a URI when the root is on object storage)."""
        return storage.join(self.directory, f"{slide_id}.parquet")

    def has(self, slide_id: str) -> bool:
        """Whether the slide's index was written."""
        return storage.is_file(self.path(slide_id))

    def read(self, slide_id: str) -> pa.Table:
        """A slide's stored index."""
        return storage.read_table(self.path(slide_id))

    def write(self, slide_id: str, table: pa.Table) -> None:
        """Store a slide's index (temp file + rename)."""
        write_table_atomically(table, self.path(slide_id))


def slide_indexes(records: list[SlideRecord], index: TileIndex, errors: FeatureStore,
                  cpus_per_task: float = 0.5) -> dict[str, pa.Table]:
    """Every slide's tile index: read when stored, else computed by one Ray task per slide and stored. A slide
    that fails is recorded in `errors`' errors.jsonl and left out."""
    stored = {r.slide_id: with_path(index.read(r.slide_id), r.path) for r in records if index.has(r.slide_id)}
    missing = [r for r in records if r.slide_id not in stored]
    if missing:
        for slide_id, table in compute_indexes(missing, index.tiling, errors, cpus_per_task).items():
            index.write(slide_id, table)
            stored[slide_id] = table
    return stored


def tile_index(record: SlideRecord, tiling: TilingConfig) -> pa.Table:
    """The tile index of one slide: grid columns + slide_id, path and tile truth from its annotation."""
    from hnm_ray.slides.annotation import load_annotation, tile_truth
    from hnm_ray.slides.grid import tile_grid
    from hnm_ray.slides.reader import open_slide

    with open_slide(record.path, slide_id=record.slide_id, device="cpu") as reader:  # validates the slide
        grid = tile_grid(reader, tiling)
        level0 = reader.info.level_dimensions[0]
        downsamples = reader.info.level_downsamples
    n = grid.num_rows
    truth = np.full(n, -1, dtype=np.int8)
    if record.annotation:
        mask = load_annotation(record.annotation)
        extent = (grid["size"].to_numpy().astype(np.float64) * np.asarray(downsamples)[grid["level"].to_numpy()]).astype(np.int64)
        truth = tile_truth(mask, level0, grid["x"].to_numpy(), grid["y"].to_numpy(), int(extent[0]))
    return grid.append_column("truth", pa.array(truth, pa.int8())).add_column(
        0, "path", pa.array([record.path] * n, pa.string())
    ).add_column(0, "slide_id", pa.array([record.slide_id] * n, pa.string()))


def index_or_error(record: SlideRecord, tiling: TilingConfig) -> tuple[str, pa.Table | None, str | None]:
    """Ray task body: a slide's tile index, or the error that stops it. The slide is read in a child process, so a
    slide that crashes its reader (a segfault in a decoder, the OOM killer) fails alone and the job goes on."""
    from hnm_ray.slides import annotation, grid  # noqa: F401 - imported once here, not in every forked child
    from hnm_ray.slides.reader import choose_backend

    choose_backend(record.path)  # imports the slide's reader backend (cuCIM: ~1 s) here, once, for the same reason
    try:
        return in_child_process(_index_or_error, record, tiling)
    except ChildProcessError as exc:
        return record.slide_id, None, (f"slide {record.slide_id!r}: the process reading it died ({exc}); the file "
                                       "may be corrupt or crafted to exhaust memory: check or re-export it")


def _index_or_error(record: SlideRecord, tiling: TilingConfig) -> tuple[str, pa.Table | None, str | None]:
    try:
        return record.slide_id, tile_index(record, tiling), None
    except HnmError as exc:
        return record.slide_id, None, str(exc)
    except Exception as exc:  # noqa: BLE001 - any decoder failure must name the slide, not kill the job
        return record.slide_id, None, f"slide {record.slide_id!r}: {type(exc).__name__}: {exc}"


def in_child_process(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` run in a forked child process (a few ms: the modules are already imported); ChildProcessError
    naming the exit code or signal when the child dies instead of returning. The result travels pickled. The child
    only decodes the slide and leaves with os._exit (multiprocessing's fork), never touching Ray or torch."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, function, args))
    child.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        child.join()
        code = child.exitcode
        cause = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        raise ChildProcessError(cause) from None
    finally:
        receive.close()
    child.join()
    return result


def _child(send: Any, function: Callable[..., Any], args: tuple) -> None:
    send.send(function(*args))
    send.close()


def with_path(table: pa.Table, path: str) -> pa.Table:
    """A stored index with the slide's current path (the cohort folder may have moved since it was written)."""
    column = table.column_names.index("path")
    return table.set_column(column, "path", pa.array([str(path)] * table.num_rows, pa.string()))


def compute_indexes(records: list[SlideRecord], tiling: TilingConfig, errors: FeatureStore,
                    cpus_per_task: float) -> dict[str, pa.Table]:
    """Tile index of each slide, one Ray task each; failed slides are recorded in `errors` and left out."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # placement_group=None: inside a Tune trial, child tasks would otherwise be captured by the trial's tiny
    # placement group (0.01 CPU) and never fit; the index tasks ask the cluster for their own CPUs.
    task = ray.remote(num_cpus=cpus_per_task, max_retries=1)(index_or_error).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    refs = [task.remote(r, tiling) for r in records]
    progress = Progress("tile index (slides)", len(refs))
    out: dict[str, pa.Table] = {}
    while refs:
        ready, refs = ray.wait(refs, num_returns=1)
        slide_id, table, error = ray.get(ready[0])
        if error is not None:
            errors.record_error(slide_id, "index", error)
            log.warning("skipping %s", error)
        else:
            out[slide_id] = table
        progress.update(1)
    return out
