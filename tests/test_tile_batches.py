"""Fine-tuning batches decoded inside the Train worker: equal shares, seeded epoch order, prefetch = plain decode."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from hnm_ray.config import TilingConfig
from hnm_ray.extraction.decode import TileReaders, decode_batch
from hnm_ray.extraction.index import tile_index
from hnm_ray.store.manifest import load_manifest
from hnm_ray.training.finetune_rows import TILE_ROW_SCHEMA
from hnm_ray.training.tile_batches import ROW_COLUMNS, decoded_batches, epoch_order, fixed_batches, worker_share


@pytest.fixture(scope="module")
def rows(demo_cohort) -> pa.Table:
    """Fine-tuning rows of the first three demo slides, interleaved (as the driver's shuffled table is)."""
    parts = []
    for record in load_manifest(demo_cohort, require_labels=False)[:3]:
        grid = tile_index(record, TilingConfig())
        n = grid.num_rows
        parts.append(pa.table({"slide_id": grid["slide_id"], "path": grid["path"], "tile_id": grid["tile_id"],
                               "x": grid["x"], "y": grid["y"], "level": grid["level"], "size": grid["size"],
                               "label": pa.array(np.zeros(n, np.int8)), "pos_rank": pa.array(np.zeros(n, np.float32)),
                               "kind": pa.array(np.zeros(n, np.int8)),
                               "score": pa.array(np.zeros(n, np.float32)),
                               "supcon_class": pa.array(np.zeros(n, np.int16))}, schema=TILE_ROW_SCHEMA))
    table = pa.concat_tables(parts)
    return table.take(np.random.default_rng(0).permutation(table.num_rows))


def test_worker_shares_are_disjoint_equal_and_cover_all_but_the_remainder(rows):
    shares = [worker_share(rows, rank, 3) for rank in range(3)]
    lengths = {len(s["tile_id"]) for s in shares}
    assert lengths == {rows.num_rows // 3}  # DDP needs the same number of batches on every worker
    keys = [(s, t) for share in shares for s, t in zip(share["slide_id"], share["tile_id"])]
    assert len(set(keys)) == len(keys) == 3 * (rows.num_rows // 3)
    assert len(worker_share(rows, 0, 1)["tile_id"]) == rows.num_rows


def test_epoch_order_depends_on_seed_and_epoch_only():
    np.testing.assert_array_equal(epoch_order(50, 3, 7), epoch_order(50, 3, 7))
    assert sorted(epoch_order(50, 3, 7)) == list(range(50))
    assert not np.array_equal(epoch_order(50, 3, 7), epoch_order(50, 3, 8))
    assert not np.array_equal(epoch_order(50, 3, 7), epoch_order(50, 4, 7))


def test_decoded_batches_hold_every_row_once_with_the_pixels_a_plain_decode_reads(rows):
    share = worker_share(rows, 0, 1)
    order = epoch_order(len(share["tile_id"]), 0, 0)
    readers = TileReaders()
    batches = list(decoded_batches(share, fixed_batches(order, 16), 224, readers))
    assert [len(b["tile_id"]) for b in batches[:-1]] == [16] * (len(batches) - 1)
    # each batch holds the rows of its slice of the epoch order (grouped by slide inside the batch)
    for i, batch in enumerate(batches):
        expected = order[i * 16: (i + 1) * 16]
        assert sorted(zip(batch["slide_id"], batch["tile_id"])) == sorted(
            zip(share["slide_id"][expected], share["tile_id"][expected]))
        assert set(batch) >= set(ROW_COLUMNS) | {"tiles", "error"} and not any(batch["error"])
    first = batches[0]
    plain, errors = decode_batch(TileReaders(), {k: first[k] for k in ROW_COLUMNS}, 224, 1)
    np.testing.assert_array_equal(first["tiles"], plain)
    assert first["tiles"].shape == (16, 224, 224, 3) and first["tiles"].std() > 0


@pytest.mark.ray
def test_fine_tuning_defaults_to_this_process_on_one_cpu_node_and_splits_its_cpus(ray_session):
    from hnm_ray.training.finetune import finetune_workers, worker_cpus

    assert finetune_workers(None, use_gpu=False) == 0  # one node, no GPU fine-tuning: no worker group to start
    assert finetune_workers(None, use_gpu=True) == 1
    assert finetune_workers(3, use_gpu=False) == 3
    assert worker_cpus(None, 0) == worker_cpus(None, 1) == 2.0  # the session's 2 CPUs: all of them for one process
    assert worker_cpus(None, 2) == 1.0 and worker_cpus(None, 1, reserved=0.01) == 1.0 and worker_cpus(0.5, 4) == 0.5


@pytest.fixture(scope="module")
def rows_of_six_slides(demo_cohort) -> pa.Table:
    """4 tiles (64 px) of each of six demo slides as fine-tuning rows, interleaved."""
    parts = []
    for record in load_manifest(demo_cohort, require_labels=False)[:6]:
        grid = tile_index(record, TilingConfig(tile_size=64)).slice(0, 4)
        n = grid.num_rows
        parts.append(pa.table({"slide_id": grid["slide_id"], "path": grid["path"], "tile_id": grid["tile_id"],
                               "x": grid["x"], "y": grid["y"], "level": grid["level"], "size": grid["size"],
                               "label": pa.array(np.arange(n) % 2, pa.int8()),
                               "pos_rank": pa.array(np.zeros(n, np.float32)),
                               "kind": pa.array(np.arange(n) % 2, pa.int8()),
                               "score": pa.array(np.zeros(n, np.float32)),
                               "supcon_class": pa.array(np.arange(n) % 2, pa.int16())}, schema=TILE_ROW_SCHEMA))
    table = pa.concat_tables(parts)
    return table.take(np.random.default_rng(0).permutation(table.num_rows))


@pytest.mark.timeout(300)
def test_fine_tuning_opens_each_slide_of_its_rows_once_however_the_batches_mix_them(rows_of_six_slides, tmp_path,
                                                                                    monkeypatch):
    from _support import small_config

    from hnm_ray.slides import reader
    from hnm_ray.training.finetune import fit_finetune

    opened: list[str] = []
    real_open = reader.open_slide
    monkeypatch.setattr(reader, "open_slide", lambda path, **kw: opened.append(path) or real_open(path, **kw))
    config = small_config({"tiling": {"tile_size": 64}, "finetune": {"workers": 0, "batch_size": 8,
                                                                     "cpus_per_worker": 1}})
    files_before = len(os.listdir("/proc/self/fd"))
    fit_finetune(config, rows_of_six_slides, None, tmp_path, "ft", first_epoch=0, last_epoch=2, total_epochs=2)
    # 2 epochs of 3 batches, each from ~5 of the 6 slides: an LRU of 4 readers re-opened slides in most batches
    assert sorted(opened) == sorted(set(rows_of_six_slides["path"].to_pylist()))
    # in this process (workers 0: a laptop's job) every round would otherwise leave its readers' files open
    assert len(os.listdir("/proc/self/fd")) <= files_before


def test_a_workers_open_slides_stay_within_the_knob_its_share_and_the_open_file_limit(rows_of_six_slides, monkeypatch):
    import resource

    from hnm_ray.training.tile_batches import share_readers

    share = worker_share(rows_of_six_slides, 0, 1)
    assert share_readers(share, 256).capacity == 6  # no more readers than the share has slides
    assert share_readers(share, 5).capacity == 5
    monkeypatch.setattr(resource, "getrlimit", lambda what: (268, 4096))  # room for (268 - 256) // 3 = 4 readers
    assert share_readers(share, 256).capacity == 4
