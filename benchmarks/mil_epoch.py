"""Where a MIL epoch's time goes at Camelyon16 bag sizes, as ratios within one process; prints one JSON line.

Takes the first `--bags` training bags of the `scale.py` store (median ~8k tiles x 512-d float16; written to
`--store` if absent, reused otherwise) and runs `fit_mil` in-process (`mil.workers 0`, one torch thread) on them,
2 epochs each time (the first a warm-up, the second's training-step seconds kept: the loop's own `epoch_seconds`),
with `mil.bag_cache_gib` scaled so the cache keeps the share of the training bags it keeps at full scale
(0.5 GiB of the 270 training bags' ~2.1 GiB of float16 features, as `BagCache` keeps them). Variants run
round-robin, `--reps` times, in the same process, so the machine's load moves them alike; the JSON has every
epoch's seconds, the median per variant and its ratio to the baseline (the first variant).

- `read_ahead_0` vs `read_ahead_2`: the loop reads each pair's bags when it needs them, or the next pair in a
  background thread while it trains on this one (`mil.read_ahead`).
- `pure_read` / `pure_step`: the same bags read once each (`FeatureStore.read_bag`), and the training steps on bags
  already in memory (the loop with the whole cohort cached): the two parts an epoch is made of.

    PYTHONPATH=. python benchmarks/mil_epoch.py --store /tmp/scale_store --out benchmarks/results/mil_epoch.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.scale import reuse_store, write_store
from hnm_ray.config import MILConfig
from hnm_ray.mining.scoring import count_tiles
from hnm_ray.training.mil import fit_mil

FULL_TRAIN_GIB = 2.15  # float16 features of the 270 training bags of the full-scale store
DEFAULT_CACHE_GIB = MILConfig.bag_cache_gib


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="the scale.py store folder (written there when absent)")
    parser.add_argument("--slides", type=int, default=400)
    parser.add_argument("--median-tiles", type=int, default=8000)
    parser.add_argument("--max-tiles", type=int, default=40000)
    parser.add_argument("--bags", type=int, default=60, help="training bags used (the first of the split)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON line to this file")
    args = parser.parse_args()

    root = Path(args.store)
    store, records = (reuse_store(root, args.slides, args.median_tiles, args.max_tiles, 0)
                      or write_store(root, args.slides, args.median_tiles, args.max_tiles, 0))
    train = [r for r in records if r.split == "train"][: args.bags]
    tiles = count_tiles(store, [r.slide_id for r in train])
    float16_gib = tiles * 512 * 2 / 2 ** 30
    cache_gib = DEFAULT_CACHE_GIB * float16_gib / FULL_TRAIN_GIB
    base = MILConfig(ensemble=1, workers=0, epochs=2, checkpoint_every=2, bag_cache_gib=cache_gib)
    variants = {"read_ahead_0": replace(base, read_ahead=0), "read_ahead_2": replace(base, read_ahead=2),
                "pure_step": replace(base, bag_cache_gib=2 * float16_gib)}
    seconds: dict[str, list[float]] = {name: [] for name in [*variants, "pure_read"]}
    with tempfile.TemporaryDirectory(prefix="hnm_mil_epoch_") as tmp:
        for rep in range(args.reps):
            for name, config in variants.items():
                result = fit_mil(config, store, train, Path(tmp) / f"{name}_{rep}", name=name)
                seconds[name].append(round(result.history[-1]["epoch_seconds"], 2))
            started = time.perf_counter()
            for r in train:
                store.read_bag(r.slide_id)
            seconds["pure_read"].append(round(time.perf_counter() - started, 2))
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    line = json.dumps({
        "benchmark": "mil_epoch", "bags": len(train), "tiles": tiles, "float16_gib": round(float16_gib, 2),
        "bag_cache_gib": round(cache_gib, 3), "aggregator": base.aggregator, "seconds": seconds,
        "median_seconds": medians, "tiles_per_s": {k: round(tiles / v) for k, v in medians.items()},
        "ratio_to_read_ahead_0": {k: round(v / medians["read_ahead_0"], 3) for k, v in medians.items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_avg_1m_end": round(os.getloadavg()[0], 1)},
    })
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
