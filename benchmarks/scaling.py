"""Scaling of the three distributed stages with 1 and 2 workers on this machine (prints one JSON line).

extraction (encoder actors), MIL training (Ray Train workers, DDP) and encoder fine-tuning (Ray Train
workers fed by Ray Data decode actors) on the demo cohort; efficiency = speedup / workers. Rates come
from inside the loops (epoch time without Trainer start-up) where the stage reports them.

    python benchmarks/scaling.py [--out benchmarks/results/scaling.json]
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

from hnm_ray.run.cluster import init_ray
from hnm_ray.config import JobConfig, TrainConfig, from_tree
from hnm_ray.extract import extract_features
from hnm_ray.models.encoders import config_tag
from hnm_ray.run.run_folder import demo_manifest
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord, load_manifest
from hnm_ray.training.finetune import fit_finetune
from hnm_ray.training.finetune_rows import tile_rows
from hnm_ray.training.official_steps import HARD_NEGATIVE, POSITIVE
from mil import run as mil_run  # benchmarks/mil.py, beside this script
from mil import synthetic_store

CPUS_PER_WORKER = 0.75  # two workers + a 0.5-CPU decode actor fit on 2 CPUs


def extraction(records: list[SlideRecord], root: Path, workers: int) -> float:
    """Pipeline tiles/s with `workers` encoder actors (tile index included)."""
    config = from_tree(TrainConfig, {"encoder": {"name": "small_cnn"},
                                     "extract": {"num_encoders": workers, "cpus_per_encoder": CPUS_PER_WORKER,
                                                 "dtype": "float32"}})
    store = FeatureStore(root / f"x{workers}", config_tag(config.encoder), round=0)
    return extract_features(records, store, config).tiles_per_second


def mil(root: Path, workers: int, pairs_per_step: int) -> float:
    """Bags/s of aggregator training on 200 synthetic bags x 500 tiles x 512-d (benchmarks/mil.py's store)."""
    store_root = root / "mil_store"
    if not store_root.exists():
        synthetic_store(store_root, 200, 500, 512)
    store = FeatureStore(store_root, "bench_random", round=0)
    records = [SlideRecord(s, str(store_root / f"{s}.svs"), int(s.split("_")[1]) % 2, "train", None)
               for s in sorted(store.completed())]
    return mil_run(store, records, root, workers, 5, pairs_per_step, CPUS_PER_WORKER)["bags_per_s"]


def finetune(store: FeatureStore, records, root: Path, workers: int) -> float:
    """Tiles/s of SupCon fine-tuning (two views a tile) on 512 tiles streamed from the slides."""
    import pyarrow as pa

    tables = []
    for r in records:
        if r.split == "train" and r.slide_id in store.completed():
            ids = store.read_table(r.slide_id, columns=["tile_id"])["tile_id"]
            tables.append(pa.table({"slide_id": [r.slide_id] * len(ids), "tile_id": ids}))
    chosen = pa.concat_tables(tables)
    chosen = chosen.take(np.random.default_rng(0).choice(chosen.num_rows, min(512, chosen.num_rows), replace=False))
    half = chosen.num_rows // 2
    positives = chosen.slice(half).append_column("pos_rank", pa.array(np.zeros(chosen.num_rows - half, np.float32)))
    rows = tile_rows(store, records, [(chosen.slice(0, half), HARD_NEGATIVE), (positives, POSITIVE)], 0)
    config = from_tree(TrainConfig, {"encoder": {"name": "small_cnn"}, "tiling": {"tile_size": 224},
                                     "finetune": {"workers": workers, "cpus_per_worker": CPUS_PER_WORKER,
                                                  "batch_size": 32, "warmup_epochs": 0}})
    out = fit_finetune(config, rows, None, root / f"ft{workers}", name=f"ft{workers}", first_epoch=0,
                       last_epoch=2, total_epochs=2)
    return rows.num_rows / out.history[-1]["epoch_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    init_ray(num_cpus=2)
    root = Path(tempfile.mkdtemp(prefix="hnm_scaling_"))
    manifest = demo_manifest(JobConfig())
    records = load_manifest(manifest)
    started = time.perf_counter()
    stages: dict[str, dict[str, float]] = {"extraction_tiles_per_s": {}, "mil_bags_per_s": {},
                                           "mil_bags_per_s_8_pairs_per_step": {}, "finetune_tiles_per_s": {}}
    for workers in (1, 2):
        stages["extraction_tiles_per_s"][str(workers)] = extraction(records, root, workers)
    store = FeatureStore(root / "x1", "small_cnn", round=0)
    for workers in (1, 2):
        stages["mil_bags_per_s"][str(workers)] = mil(root, workers, 1)
        stages["mil_bags_per_s_8_pairs_per_step"][str(workers)] = mil(root, workers, 8)
        stages["finetune_tiles_per_s"][str(workers)] = finetune(store, records, root, workers)
    summary = {name: {"1": rates["1"], "2": rates["2"], "speedup": rates["2"] / rates["1"],
                      "efficiency": rates["2"] / rates["1"] / 2} for name, rates in stages.items()}
    job = JobConfig()
    line = {"benchmark": "scaling", "cohort": f"demo ({job.demo_slides} slides, {job.demo_size} px)",
            "cpus_per_worker": CPUS_PER_WORKER,
            "stages": summary, "seconds": time.perf_counter() - started,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": False}}
    print(json.dumps(line))
    if args.out:
        Path(args.out).write_text(json.dumps(line, indent=1) + "\n")


if __name__ == "__main__":
    main()
