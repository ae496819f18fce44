"""Decoded tile batches for fine-tuning, read inside each Ray Train worker.

Each worker of our loop takes an equal share of the round's tile rows (rank::world, cut to the same length on every
worker so DDP steps stay in lockstep) and visits them in an order seeded by (seed, epoch); the official loop's
workers take their part of each official step (`official_steps`). The next batch is decoded with cuCIM in a
background thread while the current one trains. Nothing is started per epoch (no Ray Data pipeline, no actor
pool): an epoch costs its decode + augment + forward/backward, and a rerun or a resume sees the same batches.
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from hnm_ray.extraction.decode import TileReaders, decode_batch, readers_within_file_limit

ROW_COLUMNS = ("slide_id", "path", "tile_id", "x", "y", "level", "size", "label", "pos_rank", "kind", "score",
               "supcon_class")


def worker_share(rows: pa.Table, rank: int, world: int) -> dict[str, np.ndarray]:
    """This worker's rows as numpy columns: every `world`-th row from `rank`, all shares cut to the same length."""
    per_worker = rows.num_rows // world if world > 1 else rows.num_rows
    indices = np.arange(rank, rows.num_rows, world)[:per_worker]
    share = rows.take(indices)
    return {k: share[k].to_numpy(zero_copy_only=False) for k in ROW_COLUMNS}


def share_readers(share: dict[str, np.ndarray], open_slides: int) -> TileReaders:
    """Slide readers for a worker's share (CPU decode): as many kept open as it has slides, up to `open_slides`
    (finetune.open_slides) and the open-file limit. An epoch visits the share in random order, each batch drawing
    from many slides; an LRU smaller than the share's slides re-opens most of them every batch."""
    slides = len(np.unique(share["path"]))
    return TileReaders(device="cpu", capacity=max(4, min(open_slides, slides, readers_within_file_limit())))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of a worker's rows in one epoch (the same on a rerun and after a resume)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def fixed_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """`order` cut into batches of `batch_size` rows (the last one shorter)."""
    return [order[start: start + batch_size] for start in range(0, len(order), batch_size)]


def decoded_batches(share: dict[str, np.ndarray], batches: list[np.ndarray], tile_size: int, readers: TileReaders,
                    decode_workers: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The batches of `share` (each an array of row indices), each with `tiles` (B, S, S, 3) uint8 and per-row
    `error`; the next batch is decoded in a thread while the caller trains on the current one."""
    # Rows of one slide next to each other inside a batch: one reader call per slide (the batch's content and
    # the epoch's order of batches are unchanged by this).
    def load(i: int) -> dict[str, np.ndarray]:
        rows = batches[i][np.argsort(share["path"][batches[i]], kind="stable")]
        batch = {k: v[rows] for k, v in share.items()}
        batch["tiles"], batch["error"] = decode_batch(readers, batch, tile_size, decode_workers)
        return batch

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-decode") as pool:
        pending = None
        for i in range(len(batches)):
            pending = pending or pool.submit(load, i)
            batch = pending.result()
            pending = pool.submit(load, i + 1) if i + 1 < len(batches) else None
            yield batch
