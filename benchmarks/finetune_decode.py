"""Fine-tuning's tile decoding on a cohort of many slides: the slide readers a worker keeps open (one JSON line).

A fine-tuning epoch (and the SimCLR warm start) visits its rows in a random order, so each batch of 64 tiles draws
from dozens of slides. This decodes the same random batches (`tile_batches.decoded_batches`, as a worker does) of
`--tiles` tiles of the cohort's training slides for `--epochs` epochs, with the readers a worker now keeps open
(`share_readers`, `finetune.open_slides`) and, in the same process, with the LRU of 4 readers it used to keep
(the baseline); passes alternate, the pixels are checked equal.

    python -m benchmarks.finetune_decode [--cohort-dir DIR] [--tiles 4096] [--epochs 2] [--out F]

Default cohort: the Camelyon16-regime cohort (benchmarks/cohorts/camelyon.py, 270 training slides, 64 px tiles).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from hnm_ray.config import FinetuneConfig, TilingConfig
from hnm_ray.extraction.decode import TileReaders
from hnm_ray.extraction.index import tile_index
from hnm_ray.store.manifest import load_manifest
from hnm_ray.training.pretrain import sample_tile_rows
from hnm_ray.training.tile_batches import decoded_batches, epoch_order, fixed_batches, share_readers, worker_share

OLD_CAPACITY = 4  # the LRU every worker kept before finetune.open_slides


def training_rows(folder: Path, tile_size: int, tiles: int, seed: int) -> pa.Table:
    """`tiles` random tile rows of the cohort's training slides, as the warm start samples them."""
    records = [r for r in load_manifest(folder / "manifest.csv", seed=seed) if r.split == "train"]
    index = {r.slide_id: tile_index(r, TilingConfig(tile_size=tile_size)) for r in records}
    return sample_tile_rows(index, tiles, seed)


def decode_epochs(share: dict[str, np.ndarray], readers: TileReaders, tile_size: int, epochs: int,
                  batch_size: int) -> tuple[list[float], int]:
    """Tiles/s of each epoch of random batches through one set of readers, and a checksum of every pixel read."""
    rates, checksum = [], 0
    for epoch in range(epochs):
        batches = fixed_batches(epoch_order(len(share["tile_id"]), 0, epoch), batch_size)
        started, n = time.perf_counter(), 0
        for batch in decoded_batches(share, batches, tile_size, readers):
            n += len(batch["tile_id"])
            checksum += int(batch["tiles"].sum(dtype=np.int64))
        rates.append(n / (time.perf_counter() - started))
    return rates, checksum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort-dir", type=Path, default=None, help="a cohort folder (default: the cached "
                                                                      "Camelyon16-regime cohort)")
    parser.add_argument("--tile-size", type=int, default=64)
    parser.add_argument("--tiles", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes of each setting")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.cohort_dir is None:
        from benchmarks.cohorts import cached_cohort
        args.cohort_dir = cached_cohort("camelyon")
    share = worker_share(training_rows(args.cohort_dir, args.tile_size, args.tiles, 0), 0, 1)
    batch = FinetuneConfig().batch_size
    runs: dict[str, list] = {"lru_4": [], "share_readers": []}
    checksums = set()
    for _ in range(args.repeats):
        for name in runs:
            readers = TileReaders(device="cpu", capacity=OLD_CAPACITY) if name == "lru_4" \
                else share_readers(share, FinetuneConfig().open_slides)
            with readers:  # each setting's files closed before the next pass
                rates, checksum = decode_epochs(share, readers, args.tile_size, args.epochs, batch)
            runs[name].append({"tiles_per_s": [round(r, 1) for r in rates], "readers": readers.capacity})
            checksums.add(checksum)
    best = {name: max(sum(r["tiles_per_s"]) / len(r["tiles_per_s"]) for r in rs) for name, rs in runs.items()}
    line = {"benchmark": "finetune_decode", "cohort": str(args.cohort_dir), "tiles": len(share["tile_id"]),
            "slides": len(np.unique(share["path"])), "epochs": args.epochs, "batch_size": batch,
            "same_pixels": len(checksums) == 1, "runs": runs,
            "best_mean_tiles_per_s": {k: round(v, 1) for k, v in best.items()},
            "ratio_share_readers_vs_lru_4": round(best["share_readers"] / best["lru_4"], 2),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    print(json.dumps(line))
    if args.out:
        Path(args.out).write_text(json.dumps(line, indent=1) + "\n")


if __name__ == "__main__":
    main()
