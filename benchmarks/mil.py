"""MIL aggregator training throughput with 1 and 2 Ray Train workers (DDP over bag pairs); prints one JSON line.

A synthetic feature store of 200 bags (100 positive, 100 negative) of 500 tiles x 512-d float16 features
(the paper's ResNet-18 width) is written with FeatureStore.write_slide, so one epoch is 100 pairs = 200 bags.
bags/s = 2 * train_pairs / epoch_seconds, where epoch_seconds is the loop's own time for an epoch's
training steps (Trainer start-up, validation and checkpoints excluded); the median over the epochs after the
first (warm-up) is used. speedup = bags/s(2) / bags/s(1), efficiency = speedup / 2. Both runs give each
worker one CPU (ray.init(num_cpus=2)), so torch runs one thread per worker. A DDP step all-reduces the
aggregator's gradients once per pair, so small bags measure communication; `larger_bags` repeats the
measurement with 100 bags of 4,000 tiles (closer to a real slide at 10-20x), where compute dominates.

    python benchmarks/mil.py [--bags 200] [--tiles 500] [--dim 512] [--epochs 6] > benchmarks/results/mil.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.config import MILConfig
from hnm_ray.training.mil import fit_mil


def synthetic_store(root: Path, bags: int, tiles: int, dim: int,
                    seed: int = 0) -> tuple[FeatureStore, list[SlideRecord]]:
    """`bags` training slides (half positive: 5 % of their tiles shifted) of `tiles` random features each."""
    store = FeatureStore(root, "bench_random", round=0)
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(tiles)))
    grid = pa.table({"tile_id": np.arange(tiles, dtype=np.int32), "x": (np.arange(tiles) % side * 224).astype(np.int32),
                     "y": (np.arange(tiles) // side * 224).astype(np.int32), "level": np.zeros(tiles, np.int8),
                     "size": np.full(tiles, 224, np.int16)})
    records = []
    for i in range(bags):
        label = i % 2
        features = rng.normal(0.0, 1.0, (tiles, dim)).astype(np.float32)
        truth = np.zeros(tiles, np.int8)
        if label:
            truth[rng.choice(tiles, tiles // 20, replace=False)] = 1
            features[truth == 1] += 0.5
        slide_id = f"bench_{i:04d}"
        store.write_slide(slide_id, grid, features.astype(np.float16), truth, {"tile_size": 224, "mpp": 0.5})
        records.append(SlideRecord(slide_id, str(root / f"{slide_id}.svs"), label, "train", None))
    return store, records


def run(store: FeatureStore, records: list[SlideRecord], root: Path, workers: int, epochs: int,
        pairs_per_step: int = 1, cpus_per_worker: float = 1.0) -> dict:
    """Train with `workers` Ray Train workers; bags/s from the loop's per-epoch training time."""
    config = MILConfig(ensemble=1, workers=workers, cpus_per_worker=cpus_per_worker, epochs=epochs,
                       checkpoint_every=epochs, max_failures=0, pairs_per_step=pairs_per_step)
    started = time.perf_counter()
    name = f"bench{workers}_k{pairs_per_step}"
    result = fit_mil(config, store, records, root / name, name=name)
    wall = time.perf_counter() - started
    seconds = [h["epoch_seconds"] for h in result.history]
    pairs = result.history[-1]["train_pairs"]
    steady = float(np.median(seconds[1:] if len(seconds) > 1 else seconds))
    return {"workers": workers, "pairs_per_epoch": pairs, "epoch_seconds": [round(s, 3) for s in seconds],
            "bags_per_s": round(2 * pairs / steady, 1), "wall_s": round(wall, 1),
            "startup_and_reporting_s": round(wall - sum(seconds), 1)}


def main() -> None:
    import ray
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bags", type=int, default=200)
    parser.add_argument("--tiles", type=int, default=500)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--large-bags", type=int, default=100, help="bags of the larger-bag run (0: skip it)")
    parser.add_argument("--large-tiles", type=int, default=4000, help="tiles per bag of the larger-bag run")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory(prefix="hnm_bench_mil_") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        store, records = synthetic_store(root / "store", args.bags, args.tiles, args.dim)
        write_s = time.perf_counter() - started
        load_before = os.getloadavg()
        one = run(store, records, root, 1, args.epochs)
        two = run(store, records, root, 2, args.epochs)
        larger = None
        if args.large_bags:
            big_store, big_records = synthetic_store(root / "big_store", args.large_bags, args.large_tiles, args.dim)
            big = [run(big_store, big_records, root / "big", workers, args.epochs) for workers in (1, 2)]
            ratio = big[1]["bags_per_s"] / big[0]["bags_per_s"]
            larger = {"bags": args.large_bags, "tiles_per_bag": args.large_tiles, "runs": big,
                      "speedup": round(ratio, 2), "efficiency": round(ratio / 2, 2)}
        load_after = os.getloadavg()
    speedup = two["bags_per_s"] / one["bags_per_s"]
    print(json.dumps({
        "benchmark": "mil", "aggregator": "dsmil", "bags": args.bags, "tiles_per_bag": args.tiles, "dim": args.dim,
        "epochs": args.epochs, "store_write_s": round(write_s, 1), "runs": [one, two],
        "speedup": round(speedup, 2), "efficiency": round(speedup / 2, 2), "larger_bags": larger,
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__, "gpu": False,
                    "load_avg_1m_before_after": [round(load_before[0], 1), round(load_after[0], 1)],
                    "note": "2 cores shared with other developers; rates move between runs"},
    }))
    ray.shutdown()


if __name__ == "__main__":
    main()
