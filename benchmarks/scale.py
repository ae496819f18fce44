"""Camelyon16-scale stages after extraction on one node (issue 25, first piece); prints one JSON line.

Writes a seeded synthetic store through the product's FeatureStore: `--slides` slides whose tile counts are
log-normal (median `--median-tiles`, sigma 0.54 so the largest of 400 draws is ~5x the median, as Camelyon16's
~8k median and ~40k largest bag; clipped to [median/20, `--max-tiles`]), 512-d float16, the Camelyon16 split
(129/399 test, 10 % of the rest validation, the rest training; half of each split tumour). Tumour slides carry a
planted signal: a log-normal fraction (median 5 %, 0.5-50 %) of their tiles is shifted by +0.5 in 16 of the 512
features.
Then it times the real stages, each with seconds, rows/s, the 1-minute load average at its end (other jobs on a
shared machine) and peak RSS and private memory (RSS - shared) of the driver and of the Ray workers below it by role
(`extract.RssSampler`: psutil over the process tree, every 0.1 s in a thread):

- `read_bags`: `FeatureStore.read_bag` of every slide once, one at a time: what the MIL loop pays per epoch for the
  bags its cache does not keep (median and largest bag's seconds).

- `mil`: `fit_mil` in-process (`mil.workers 0`, the default), `--epochs` epochs, bags read through the loop's
  `BagCache` of `--bag-cache-gib` (default `mil.bag_cache_gib`); epoch seconds are the loop's own (validation, test
  and checkpoints excluded; the re-reads of uncached training bags included); the stage's RSS is that of the whole
  call.
- `evaluate`: `evaluate_split` on validation and on test, each bag through the model whole (the JSON names the largest).
- `score_topk`: `score_tiles` in-process (the one-node path) pushing negative-slide logits to the real
  `HardNegativeMiner` actor, then its exact global top-k (k = ceil(neg_ratio x negative tiles)).
- `miner_snapshot_restore`: the miner's `save` to an .npz, the actor killed, a new one `restore`d from the file
  (its threshold checked equal).
- `finetune_rows`: the round's fine-tuning rows as the product selects them from the scores and the restored miner
  (hard negatives, positives drawn from the pseudo labels; `finetune_rows.round_rows`, default config).
- `mil_N_workers`: `fit_mil` with `--mil-workers` Ray Train workers (DDP, 1 CPU each), the same epochs; Ray Train
  workers' RSS as `train_worker` (the larger of the two).

`--store DIR` keeps the store in DIR and reuses it when a previous run wrote it with the same parameters (the
full-scale store takes 10+ minutes to write on a shared machine).

    PYTHONPATH=. python benchmarks/scale.py --slides 400 --median-tiles 2000 --max-tiles 10000 \
        --out benchmarks/results/scale_905k.json
    PYTHONPATH=. python benchmarks/scale.py --store /tmp/scale_store --out benchmarks/results/scale.json  # full scale
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks.extract import RssSampler
from hnm_ray.config import MILConfig
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord

DIM = 512
SIGMA = 0.54  # log-normal spread of tile counts: max of 400 draws ~ exp(2.97 * 0.54) = 5x the median
TEST_FRACTION = 129 / 399  # Camelyon16: 270 training, 129 test slides
NEG_RATIO = 0.2
SIGNAL_DIMS = 16  # tumour tiles: +0.5 in these features (a shift of 2 sd in norm: learnable, not trivial)
GIB = 2 ** 30
PARAMS_FILE = "scale_params.json"  # the parameters a kept store (--store) was written with


@contextmanager
def stage(results: dict, name: str, rows: int):
    """Time the block; record seconds, rows/s and peak RSS / private MiB of the driver and of each Ray worker role."""
    record: dict = results.setdefault(name, {})
    with RssSampler() as rss:
        started = time.perf_counter()
        yield record
        seconds = time.perf_counter() - started
    record.update(seconds=round(seconds, 2), rows=rows, rows_per_s=round(rows / seconds),
                  load_avg_1m=round(os.getloadavg()[0], 1), **rss.result())


def tile_counts(slides: int, median: int, largest: int, rng: np.random.Generator) -> np.ndarray:
    """Long-tailed tile counts (log-normal around `median`, clipped to [median/20, largest])."""
    return np.clip(np.round(median * np.exp(SIGMA * rng.standard_normal(slides))), max(median // 20, 1),
                   largest).astype(int)


def plan(slides: int, median: int, largest: int, seed: int) -> tuple[np.random.Generator, np.ndarray, list[str]]:
    """The seeded generator (after drawing the tile counts), the tile counts and the split of every slide."""
    rng = np.random.default_rng(seed)
    counts = tile_counts(slides, median, largest, rng)
    n_test = round(slides * TEST_FRACTION)
    n_val = round((slides - n_test) * 0.1)
    return rng, counts, ["test"] * n_test + ["val"] * n_val + ["train"] * (slides - n_test - n_val)


def slide_records(root: Path, splits: list[str]) -> list[SlideRecord]:
    """Manifest records of the synthetic slides (label: odd index = tumour)."""
    return [SlideRecord(f"scale_{i:04d}", str(root / f"scale_{i:04d}.svs"), i % 2, split)
            for i, split in enumerate(splits)]


def write_store(root: Path, slides: int, median: int, largest: int,
                seed: int) -> tuple[FeatureStore, list[SlideRecord]]:
    """The synthetic store and its manifest records (see the module doc)."""
    rng, counts, splits = plan(slides, median, largest, seed)
    store = FeatureStore(root, "scale_synthetic", round=0)
    records = slide_records(root, splits)
    for record, n in zip(records, counts):
        side = int(np.ceil(np.sqrt(n)))
        grid = pa.table({"tile_id": np.arange(n, dtype=np.int32), "x": (np.arange(n) % side * 224).astype(np.int32),
                         "y": (np.arange(n) // side * 224).astype(np.int32), "level": np.zeros(n, np.int8),
                         "size": np.full(n, 224, np.int16)})
        features = rng.standard_normal((n, DIM), dtype=np.float32)
        truth = np.zeros(n, np.int8)
        if record.label:
            fraction = float(np.clip(0.05 * np.exp(rng.standard_normal()), 0.005, 0.5))
            truth[rng.choice(n, max(1, round(n * fraction)), replace=False)] = 1
            features[np.ix_(truth == 1, np.arange(SIGNAL_DIMS))] += 0.5
        store.write_slide(record.slide_id, grid, features.astype(np.float16), truth, {"tile_size": 224, "mpp": 0.5})
    (root / PARAMS_FILE).write_text(json.dumps({"slides": slides, "median": median, "largest": largest, "seed": seed}))
    return store, records


def reuse_store(root: Path, slides: int, median: int, largest: int,
                seed: int) -> tuple[FeatureStore, list[SlideRecord]] | None:
    """The store a previous run wrote at `root` with the same parameters (None: none, or other parameters)."""
    params = root / PARAMS_FILE
    if not params.is_file() or json.loads(params.read_text()) != {"slides": slides, "median": median,
                                                                  "largest": largest, "seed": seed}:
        return None
    store = FeatureStore(root, "scale_synthetic", round=0)
    records = slide_records(root, plan(slides, median, largest, seed)[2])
    return (store, records) if store.completed() >= {r.slide_id for r in records} else None


def finetune_rows(store: FeatureStore, records: list[SlideRecord], scores: pa.Table, miner) -> pa.Table:
    """The round's fine-tuning rows as the product selects them (`pseudo_labels.mine_round` after scoring, then
    `finetune_rows.round_rows` with the default config): the miner's hard negatives and the positives drawn from the
    positive slides' pseudo labels."""
    import ray

    from hnm_ray.config import MiningConfig, TrainConfig
    from hnm_ray.mining.selection import select_positives
    from hnm_ray.mining.pseudo_labels import Selection, with_rank
    from hnm_ray.training.finetune_rows import round_rows

    hard = ray.get(miner.hard_negatives.remote())
    positive_ids = [r.slide_id for r in records if r.split == "train" and r.label == 1]
    on_positive = scores.filter(pc.is_in(scores["slide_id"], pa.array(positive_ids))).select(
        ["slide_id", "tile_id", "score"])
    positives = with_rank(select_positives(on_positive, MiningConfig.threshold, ratio=1.0))
    selection = Selection(hard, positives, on_positive.slice(0, 0), {})
    return round_rows(TrainConfig(), store, records, selection, 0, uncertain_joined=False)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    import ray
    import torch

    from hnm_ray.models.inference import evaluate_split
    from hnm_ray.mining.miner import get_miner
    from hnm_ray.mining.scoring import count_tiles, score_tiles
    from hnm_ray.training.mil import fit_mil

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=400)
    parser.add_argument("--median-tiles", type=int, default=8000)
    parser.add_argument("--max-tiles", type=int, default=40000)
    parser.add_argument("--epochs", type=int, default=2, help="MIL epochs (the first is a warm-up)")
    parser.add_argument("--bag-cache-gib", type=float, default=MILConfig.bag_cache_gib,
                        help="mil.bag_cache_gib of the MIL stage")
    parser.add_argument("--read-ahead", type=int, default=MILConfig.read_ahead, help="mil.read_ahead of the MIL stages")
    parser.add_argument("--mil-workers", type=int, default=2, help="Ray Train workers of the last stage (<= 1: skip it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="folder for the store and runs (default: a temp folder)")
    parser.add_argument("--store", default=None, help="keep the store in this folder and reuse it when a previous run "
                                                      "wrote it with the same --slides/--median-tiles/--max-tiles/--seed "
                                                      "(write_store is then not timed)")
    parser.add_argument("--out", default=None, help="also write the JSON line to this file")
    args = parser.parse_args()

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="hnm_scale_", dir=args.workdir) as tmp:
        root = Path(tmp)
        store_root = Path(args.store) if args.store else root / "store"
        kept = reuse_store(store_root, args.slides, args.median_tiles, args.max_tiles, args.seed)
        with stage(results, "write_store", 0):
            store, records = kept or write_store(store_root, args.slides, args.median_tiles, args.max_tiles, args.seed)
        if kept:
            results["write_store"] = {"reused": str(store_root)}
        counts = {r.slide_id: count_tiles(store, [r.slide_id]) for r in records}
        by_split = {s: [r for r in records if r.split == s] for s in ("train", "val", "test")}
        n_tiles = sum(counts.values())
        if not kept:
            results["write_store"].update(rows=n_tiles, rows_per_s=round(n_tiles / results["write_store"]["seconds"]))
        store_bytes = disk_bytes(FeatureStore(store_root, "scale_synthetic").directory)
        train_tiles = sum(counts[r.slide_id] for r in by_split["train"])
        with stage(results, "read_bags", n_tiles) as rec:
            read_seconds = []
            for r in records:
                started = time.perf_counter()
                store.read_bag(r.slide_id)
                read_seconds.append(time.perf_counter() - started)
        largest = max(records, key=lambda r: counts[r.slide_id])
        rec.update(bags=len(records), median_bag_seconds=round(float(np.median(read_seconds)), 4),
                   largest_bag=counts[largest.slide_id],
                   largest_bag_seconds=round(read_seconds[records.index(largest)], 3))

        config = MILConfig(workers=0, epochs=args.epochs, checkpoint_every=args.epochs,
                           bag_cache_gib=args.bag_cache_gib, read_ahead=args.read_ahead)
        with stage(results, "mil", train_tiles * args.epochs) as rec:
            mil = fit_mil(config, store, records, root / "mil", name="scale")
        seconds = [h["epoch_seconds"] for h in mil.history]
        results["mil"].update(train_bags=len(by_split["train"]), bag_cache_gib=args.bag_cache_gib,
                              read_ahead=args.read_ahead,
                              float16_gib_of_train_bags=round(train_tiles * DIM * 2 / GIB, 2),
                              epoch_seconds=[round(s, 2) for s in seconds],
                              epoch_tiles_per_s=round(train_tiles / seconds[-1]),
                              val_auc=mil.metrics.get("val_auc"))

        for split in ("val", "test"):
            split_tiles = sum(counts[r.slide_id] for r in by_split[split])
            with stage(results, f"evaluate_{split}", split_tiles) as rec:
                metrics = evaluate_split(mil.model_path, store, records, split)
            rec.update(bags=len(by_split[split]), largest_bag=max(counts[r.slide_id] for r in by_split[split]),
                       slide_auc=round(metrics[f"{split}_auc"], 3),
                       instance_auc=round(metrics[f"{split}_instance_auc"], 3))

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="hnm_ray",
                 configure_logging=False)
        try:
            train = by_split["train"]
            negatives = [r.slide_id for r in train if r.label == 0]
            miner = get_miner("scale_miner")
            k = ray.get(miner.begin_round.remote(count_tiles(store, negatives), NEG_RATIO))
            with stage(results, "score_topk", train_tiles) as rec:
                table = score_tiles(mil.model_path, store, train, root / "scores.parquet", miner_name="scale_miner",
                                    in_process=True)
                threshold = ray.get(miner.threshold.remote())
            rec.update(k=k, scored_rows=table.num_rows, miner_state_bytes=ray.get(miner.stats.remote())["memory_bytes"])
            neg_logits = np.sort(table.filter(pc.is_in(table["slide_id"], pa.array(negatives)))["logit"]
                                 .to_numpy())
            assert threshold == float(neg_logits[len(neg_logits) - k]), "miner threshold is not the exact k-th logit"

            snapshot = root / "miner_snapshot.npz"
            with stage(results, "miner_snapshot_restore", k) as rec:
                ray.get(miner.save.remote(str(snapshot)))
                ray.kill(miner)
                restored = get_miner("scale_miner_restored")
                restored_stats = ray.get(restored.restore.remote(str(snapshot)))
            assert ray.get(restored.threshold.remote()) == threshold, "the restored miner lost its threshold"
            rec.update(snapshot_bytes=snapshot.stat().st_size, restored_size=restored_stats["size"])

            with stage(results, "finetune_rows", 0) as rec:
                rows = finetune_rows(store, records, table, restored)
            rec.update(rows=rows.num_rows, rows_per_s=round(rows.num_rows / rec["seconds"]),
                       hard_negatives=k, positives=int(pc.sum(pc.equal(rows["label"], 1)).as_py()))
            ray.kill(restored)

            if args.mil_workers > 1:
                config = replace(config, workers=args.mil_workers, epochs=args.epochs, checkpoint_every=args.epochs)
                with stage(results, f"mil_{args.mil_workers}_workers", train_tiles * args.epochs) as rec:
                    mil2 = fit_mil(config, store, records, root / "mil_workers", name="scale_workers")
                seconds = [h["epoch_seconds"] for h in mil2.history]
                rec.update(epoch_seconds=[round(s, 2) for s in seconds],
                           epoch_tiles_per_s=round(train_tiles / seconds[-1]),
                           val_auc=mil2.metrics.get("val_auc"))
        finally:
            ray.shutdown()

    sizes = np.asarray(list(counts.values()))
    print_line = {
        "benchmark": "scale", "slides": args.slides, "median_tiles_arg": args.median_tiles,
        "max_tiles_arg": args.max_tiles, "dim": DIM, "dtype": "float16", "seed": args.seed, "tiles": int(n_tiles),
        "bag_tiles": {"median": int(np.median(sizes)), "max": int(sizes.max()), "min": int(sizes.min())},
        "splits": {s: len(v) for s, v in by_split.items()}, "store_bytes": store_bytes,
        "store_gib": round(store_bytes / GIB, 3), "stages": results,
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "ray": ray.__version__,
                    "gpu": False, "load_avg_1m_end": round(os.getloadavg()[0], 1)},
    }
    line = json.dumps(print_line)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
