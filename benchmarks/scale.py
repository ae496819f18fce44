"""Camelyon16-scale stages after extraction on one node (issue 25, first piece); prints one JSON line.

Writes a seeded synthetic store through the product's FeatureStore: `--slides` slides whose tile counts are
log-normal (median `--median-tiles`, sigma 0.54 so the largest of 400 draws is ~5x the median, as Camelyon16's
~8k median and ~40k largest bag; clipped to [median/20, `--max-tiles`]), `--dim` (512) float16, the Camelyon16 split
(129/399 test, 10 % of the rest validation, the rest training; half of each split tumour). Tumour slides carry a
planted signal: a log-normal fraction (median 5 %, 0.5-50 %) of their tiles is shifted by +0.5 in 16 of the
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
- `evaluate`: `evaluate_split` on validation and on test (bags above `mil.eval_chunk_tiles` scored in chunks; the JSON
  names the largest).
- `score_topk`: `score_tiles` in-process (the one-node path) pushing negative-slide logits to the real
  `HardNegativeMiner` actor, then its exact global top-k (k = ceil(neg_ratio x negative tiles)).
- `miner_snapshot_restore`: the miner's `save` to an .npz, the actor killed, a new one `restore`d from the file
  (its threshold checked equal).
- `finetune_rows`: the round's fine-tuning rows as the product selects them from the scores and the restored miner
  (hard negatives, positives drawn from the pseudo labels; `finetune_rows.round_rows`, default config).
- `mil_N_workers`: `fit_mil` with `--mil-workers` Ray Train workers (DDP, 1 CPU each), the same epochs; Ray Train
  workers' RSS as `train_worker` (the larger of the two).
- `report`: the end of a job (`outputs.finish`) on the validation and test slides: tile threshold, test ROC, a heatmap
  of every test slide and a QuPath file of every slide (the store has no slide images: drawn from its coordinates),
  report.html.
- `tune`: the product's sweep (`hnm_ray.tune.run_sweep`) of 2 trials (`mil.w_rank` 0 vs 0.1, `run.rounds` 0,
  `--tune-epochs`) on the store as the shared round-0 store; per trial its seconds and peak RSS, and whether the
  store's files are unchanged (nothing copied or rewritten).

`--stages` runs a subset (the stages that need an aggregator without `mil` train one, not timed, or reuse
`--aggregator`); `--out` is rewritten after every stage.

`--store DIR` keeps the store in DIR and reuses it when a previous run wrote it with the same parameters (the
full-scale store takes 10+ minutes to write on a shared machine).

    PYTHONPATH=. python benchmarks/scale.py --slides 400 --median-tiles 2000 --max-tiles 10000 \
        --out benchmarks/results/scale_905k.json
    PYTHONPATH=. python benchmarks/scale.py --store /tmp/scale_store --out benchmarks/results/scale.json  # full scale
    PYTHONPATH=. python benchmarks/scale.py --store /tmp/scale_store --stages report --aggregator /tmp/agg.safetensors \
        --out benchmarks/results/scale_report.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv  # noqa: F401 - pa.csv.write_csv

from benchmarks.extract import RssSampler
from hnm_ray.config import MILConfig
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord

DIM = 512  # default --dim
SIGMA = 0.54  # log-normal spread of tile counts: max of 400 draws ~ exp(2.97 * 0.54) = 5x the median
TEST_FRACTION = 129 / 399  # Camelyon16: 270 training, 129 test slides
NEG_RATIO = 0.2
SIGNAL_DIMS = 16  # tumour tiles: +0.5 in these features (a shift of 2 sd in norm: learnable, not trivial)
GIB = 2 ** 30
PARAMS_FILE = "scale_params.json"  # the parameters a kept store (--store) was written with


@contextmanager
def stage(results: dict, name: str, rows: int, done: Callable[[], None] | None = None):
    """Time the block; record seconds, rows/s and peak RSS / private MiB of the driver and of each Ray worker role;
    then call `done` (the partial results written out)."""
    record: dict = results.setdefault(name, {})
    with RssSampler() as rss:
        started = time.perf_counter()
        yield record
        seconds = time.perf_counter() - started
    record.update(seconds=round(seconds, 2), rows=rows, rows_per_s=round(rows / seconds),
                  load_avg_1m=round(os.getloadavg()[0], 1), **rss.result())
    if done is not None:
        done()


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


def write_store(root: Path, slides: int, median: int, largest: int, seed: int,
                dim: int = DIM) -> tuple[FeatureStore, list[SlideRecord]]:
    """The synthetic store of `dim`-d float16 features and its manifest records (see the module doc)."""
    rng, counts, splits = plan(slides, median, largest, seed)
    store = FeatureStore(root, "scale_synthetic", round=0)
    records = slide_records(root, splits)
    for record, n in zip(records, counts):
        side = int(np.ceil(np.sqrt(n)))
        grid = pa.table({"tile_id": np.arange(n, dtype=np.int32), "x": (np.arange(n) % side * 224).astype(np.int32),
                         "y": (np.arange(n) // side * 224).astype(np.int32), "level": np.zeros(n, np.int8),
                         "size": np.full(n, 224, np.int16)})
        features = rng.standard_normal((n, dim), dtype=np.float32)
        truth = np.zeros(n, np.int8)
        if record.label:
            fraction = float(np.clip(0.05 * np.exp(rng.standard_normal()), 0.005, 0.5))
            truth[rng.choice(n, max(1, round(n * fraction)), replace=False)] = 1
            features[np.ix_(truth == 1, np.arange(SIGNAL_DIMS))] += 0.5
        store.write_slide(record.slide_id, grid, features.astype(np.float16), truth, {"tile_size": 224, "mpp": 0.5})
    (root / PARAMS_FILE).write_text(json.dumps({"slides": slides, "median": median, "largest": largest, "seed": seed,
                                                "dim": dim}))
    return store, records


def reuse_store(root: Path, slides: int, median: int, largest: int, seed: int,
                dim: int = DIM) -> tuple[FeatureStore, list[SlideRecord]] | None:
    """The store a previous run wrote at `root` with the same parameters (None: none, or other parameters; a
    parameters file without `dim` is from before --dim: 512)."""
    params = root / PARAMS_FILE
    if not params.is_file() or {"dim": DIM, **json.loads(params.read_text())} != {
            "slides": slides, "median": median, "largest": largest, "seed": seed, "dim": dim}:
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


def store_files(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its size: a stage that copied or rewrote the store would change it."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def write_manifest(path: Path, store: FeatureStore, records: list[SlideRecord]) -> Path:
    """A manifest of the records whose `path` is the slide's feature file (the store has no slide images: the
    imported-features case, where README says to point `path` at the features when the slide is not at hand)."""
    rows = [{"slide_id": r.slide_id, "path": str(store.slide_path(r.slide_id)), "label": r.label, "split": r.split}
            for r in records]
    pa.csv.write_csv(pa.Table.from_pylist(rows), path)
    return path


def write_report(run_dir: Path, store: FeatureStore, records: list[SlideRecord], mil, metrics: dict) -> dict:
    """The end of a job as the product runs it (`outputs.finish`) on the validation and test slides of the store:
    the tile threshold (validation), test ROC, a heatmap of every test slide (run.heatmaps = their number), a QuPath
    file of every slide given, report.html. `mil`: the fitted aggregator; `metrics`: its evaluation (may be empty)."""
    from hnm_ray import config as cfg
    from hnm_ray.config import TrainConfig
    from hnm_ray.report.outputs import finish
    from hnm_ray.run.run_folder import CONFIG_FILE

    chosen = [r for r in records if r.split in ("val", "test")]
    config = TrainConfig()
    config.run.rounds = 0
    config.run.heatmaps = sum(r.split == "test" for r in chosen)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(config, run_dir / CONFIG_FILE)
    result = {"round": 0, "best_epoch": mil.best_epoch, **mil.metrics, **metrics,
              "official_protocol": mil.official_protocol, "model_path": mil.model_path}
    return finish(run_dir, [result], chosen, [store], {}, config)


def tune_sweep(work: Path, store_root: Path, store: FeatureStore, records: list[SlideRecord], epochs: int):
    """A 2-trial grid sweep (`hnm_ray.tune.run_sweep`, the product's sweep) of mil.w_rank 0 vs 0.1 on the shared
    store: MIL only (run.rounds 0, `epochs` MIL epochs), one trial at a time; the round-0 store is the one every trial
    reads (run.store / run.store_tag: nothing is extracted, no slide is read)."""
    from hnm_ray import config as cfg
    from hnm_ray.tune import TuneConfig, run_sweep

    tree = {"run": {"manifest": str(write_manifest(work / "manifest.csv", store, records)), "store": str(store_root),
                    "store_tag": store.encoder_tag, "rounds": 0, "name": "scale_sweep"},
            "encoder": {"name": "resnet18_in"},  # 512-d like the store (check_store_tag); no encoder runs
            "pretrain": {"method": "none"}, "tiling": {"mpp": 0.5}, "extract": {"dtype": "float16"},
            "mil": {"epochs": epochs},
            "sweep": {"search": "grid", "num_samples": 1, "w_ranks": [0.0, 0.1], "neg_ratios": [0.2],
                      "margins": [1.0], "rank_ks": [5], "storage_path": str(work / "tune"),
                      "sweep_name": "scale_sweep"}}
    return run_sweep(cfg.from_tree(TuneConfig, tree))


def trained_aggregator(path: str | None, config: MILConfig, store: FeatureStore, records: list[SlideRecord],
                       root: Path):
    """The MILResult of the aggregator at `path` (safetensors) when there is one; else one fitted now (not timed) and,
    with `path`, copied there for the next run. Returns it and the record of where it came from."""
    import shutil

    from hnm_ray.models.inference import load_aggregator
    from hnm_ray.training.mil import MILResult, fit_mil

    if path and Path(path).is_file():
        meta = load_aggregator(path)[1]
        return (MILResult(path, meta["epoch"], meta["threshold"], {"val_threshold": meta["threshold"]}),
                {"reused": path})
    started = time.perf_counter()
    mil = fit_mil(config, store, records, root / "mil", name="scale")
    record = {"untimed": True, "epochs": config.epochs, "seconds": round(time.perf_counter() - started, 1),
              "val_auc": mil.metrics.get("val_auc")}
    if path:
        for suffix in (".safetensors", ".json"):
            shutil.copyfile(Path(mil.model_path).with_suffix(suffix), Path(path).with_suffix(suffix))
        mil.model_path = path
    return mil, record


def summary(args: argparse.Namespace, counts: dict[str, int], by_split: dict[str, list], store_bytes: int,
            stages: list[str], results: dict, store_unchanged: bool | None) -> dict:
    """The JSON line: the store, the stages' records, the machine (`store_unchanged` None: the run is not over)."""
    import ray
    import torch

    sizes = np.asarray(list(counts.values()))
    return {
        "benchmark": "scale", "slides": args.slides, "median_tiles_arg": args.median_tiles,
        "max_tiles_arg": args.max_tiles, "dim": args.dim, "dtype": "float16", "seed": args.seed,
        "tiles": int(sizes.sum()),
        "bag_tiles": {"median": int(np.median(sizes)), "max": int(sizes.max()), "min": int(sizes.min())},
        "splits": {s: len(v) for s, v in by_split.items()}, "store_bytes": store_bytes,
        "store_gib": round(store_bytes / GIB, 3), "stages_run": stages, "finished": store_unchanged is not None,
        "store_files_unchanged": store_unchanged, "stages": results,
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "ray": ray.__version__,
                    "gpu": False, "load_avg_1m_end": round(os.getloadavg()[0], 1), "nice": os.nice(0)},
    }


STAGES = ("read_bags", "mil", "evaluate", "score_topk", "miner_snapshot_restore", "finetune_rows", "mil_workers",
          "report", "tune")
NEEDS = {"miner_snapshot_restore": "score_topk", "finetune_rows": "miner_snapshot_restore"}


def main() -> None:
    import ray

    from hnm_ray.models.inference import evaluate_split
    from hnm_ray.mining.miner import get_miner
    from hnm_ray.mining.scoring import count_tiles, score_tiles
    from hnm_ray.training.mil import fit_mil

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=400)
    parser.add_argument("--median-tiles", type=int, default=8000)
    parser.add_argument("--max-tiles", type=int, default=40000)
    parser.add_argument("--dim", type=int, default=DIM, help="feature size of the store (float16)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages to run, in this order: {','.join(STAGES)} (default: all). "
                             "Without mil, the stages that need a trained aggregator get one of --epochs epochs, "
                             "not timed")
    parser.add_argument("--epochs", type=int, default=2, help="MIL epochs (the first is a warm-up)")
    parser.add_argument("--tune-epochs", type=int, default=1, help="MIL epochs of each sweep trial (tune stage)")
    parser.add_argument("--bag-cache-gib", type=float, default=MILConfig.bag_cache_gib,
                        help="mil.bag_cache_gib of the MIL stage")
    parser.add_argument("--read-ahead", type=int, default=MILConfig.read_ahead, help="mil.read_ahead of the MIL stages")
    parser.add_argument("--mil-workers", type=int, default=2, help="Ray Train workers of the mil_workers stage")
    parser.add_argument("--aggregator", default=None,
                        help="without the mil stage: the aggregator (safetensors path) the later stages use; trained "
                             "there (--epochs, not timed) when the file is not there yet, and kept for the next run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="folder for the store and runs (default: a temp folder)")
    parser.add_argument("--store", default=None, help="keep the store in this folder and reuse it when a previous run "
                                                      "wrote it with the same --slides/--median-tiles/--max-tiles/"
                                                      "--seed/--dim (write_store is then not timed)")
    parser.add_argument("--out", default=None, help="also write the JSON line to this file (rewritten after every "
                                                    "stage, \"finished\": false until the run ends)")
    args = parser.parse_args()
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    missing = [f"{s} needs {NEEDS[s]}" for s in stages if s in NEEDS and NEEDS[s] not in stages]
    if unknown or missing:
        parser.error(f"--stages: unknown {unknown}, choose from {','.join(STAGES)}" if unknown else "; ".join(missing))

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="hnm_scale_", dir=args.workdir) as tmp:
        root = Path(tmp)
        store_root = Path(args.store) if args.store else root / "store"
        kept = reuse_store(store_root, args.slides, args.median_tiles, args.max_tiles, args.seed, args.dim)
        with stage(results, "write_store", 0):
            store, records = kept or write_store(store_root, args.slides, args.median_tiles, args.max_tiles, args.seed,
                                                 args.dim)
        if kept:
            results["write_store"] = {"reused": str(store_root)}
        counts = {r.slide_id: count_tiles(store, [r.slide_id]) for r in records}
        by_split = {s: [r for r in records if r.split == s] for s in ("train", "val", "test")}
        n_tiles = sum(counts.values())
        if not kept:
            results["write_store"].update(rows=n_tiles, rows_per_s=round(n_tiles / results["write_store"]["seconds"]))
        store_bytes = disk_bytes(store.directory)
        store_before = store_files(store_root)

        def save_partial() -> None:  # --out holds the stages done so far: a run killed later keeps them
            if args.out:
                Path(args.out).write_text(json.dumps(summary(args, counts, by_split, store_bytes, stages, results,
                                                             None)) + "\n")

        timed = partial(stage, results, done=save_partial)
        train_tiles = sum(counts[r.slide_id] for r in by_split["train"])
        if "read_bags" in stages:
            with timed("read_bags", n_tiles) as rec:
                read_seconds = []
                for r in records:
                    started = time.perf_counter()
                    store.read_bag(r.slide_id)
                    read_seconds.append(time.perf_counter() - started)
            largest = max(records, key=lambda r: counts[r.slide_id])
            rec.update(bags=len(records), median_bag_seconds=round(float(np.median(read_seconds)), 4),
                       largest_bag=counts[largest.slide_id],
                       largest_bag_seconds=round(read_seconds[records.index(largest)], 3))

        config = MILConfig(ensemble=1, workers=0, epochs=args.epochs, checkpoint_every=args.epochs,
                           bag_cache_gib=args.bag_cache_gib, read_ahead=args.read_ahead)
        mil = None
        if "mil" in stages:
            with timed("mil", train_tiles * args.epochs) as rec:
                mil = fit_mil(config, store, records, root / "mil", name="scale")
            seconds = [h["epoch_seconds"] for h in mil.history]
            results["mil"].update(train_bags=len(by_split["train"]), bag_cache_gib=args.bag_cache_gib,
                                  read_ahead=args.read_ahead,
                                  float16_gib_of_train_bags=round(train_tiles * args.dim * 2 / GIB, 2),
                                  epoch_seconds=[round(s, 2) for s in seconds],
                                  epoch_tiles_per_s=round(train_tiles / seconds[-1]),
                                  val_auc=mil.metrics.get("val_auc"))
        elif {"evaluate", "score_topk", "report"} & set(stages):
            mil, results["model"] = trained_aggregator(args.aggregator, config, store, records, root)

        evaluated: dict = {}
        for split in ("val", "test") if "evaluate" in stages else ():
            split_tiles = sum(counts[r.slide_id] for r in by_split[split])
            with timed(f"evaluate_{split}", split_tiles) as rec:
                metrics = evaluate_split(mil.model_path, store, records, split)
            evaluated.update(metrics)
            rec.update(bags=len(by_split[split]), largest_bag=max(counts[r.slide_id] for r in by_split[split]),
                       slide_auc=round(metrics[f"{split}_auc"], 3),
                       instance_auc=round(metrics[f"{split}_instance_auc"], 3))

        if "report" in stages:
            report_tiles = sum(counts[r.slide_id] for r in by_split["val"] + by_split["test"])
            with timed("report", report_tiles) as rec:
                final = write_report(root / "report_run", store, records, mil, evaluated)
            run = root / "report_run"
            heatmaps = sorted((run / "heatmaps").glob("*.png"))
            qupath = sorted((run / "qupath").glob("*.geojson"))
            rec.update(test_slides=len(by_split["test"]), val_slides=len(by_split["val"]), heatmaps=len(heatmaps),
                       heatmap_bytes=sum(p.stat().st_size for p in heatmaps), qupath_files=len(qupath),
                       qupath_bytes=sum(p.stat().st_size for p in qupath),
                       report_bytes=(run / "report.html").stat().st_size, skipped=final["skipped"]["count"],
                       tile_threshold=round(final["tile_threshold"], 4))

        ray_stages = [s for s in stages if s in ("score_topk", "mil_workers", "tune")]
        if ray_stages:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="hnm_ray",
                     configure_logging=False)
        try:
            train = by_split["train"]
            negatives = [r.slide_id for r in train if r.label == 0]
            if "score_topk" in stages:
                miner = get_miner("scale_miner")
                k = ray.get(miner.begin_round.remote(count_tiles(store, negatives), NEG_RATIO))
                with timed("score_topk", train_tiles) as rec:
                    table = score_tiles(mil.model_path, store, train, root / "scores.parquet",
                                        miner_name="scale_miner", in_process=True)
                    threshold = ray.get(miner.threshold.remote())
                rec.update(k=k, scored_rows=table.num_rows,
                           miner_state_bytes=ray.get(miner.stats.remote())["memory_bytes"])
                neg_logits = np.sort(table.filter(pc.is_in(table["slide_id"], pa.array(negatives)))["logit"]
                                     .to_numpy())
                assert threshold == float(neg_logits[len(neg_logits) - k]), "miner threshold is not the exact k-th logit"

            if "miner_snapshot_restore" in stages:
                snapshot = root / "miner_snapshot.npz"
                with timed("miner_snapshot_restore", k) as rec:
                    ray.get(miner.save.remote(str(snapshot)))
                    ray.kill(miner)
                    restored = get_miner("scale_miner_restored")
                    restored_stats = ray.get(restored.restore.remote(str(snapshot)))
                assert ray.get(restored.threshold.remote()) == threshold, "the restored miner lost its threshold"
                rec.update(snapshot_bytes=snapshot.stat().st_size, restored_size=restored_stats["size"])

            if "finetune_rows" in stages:
                with timed("finetune_rows", 0) as rec:
                    rows = finetune_rows(store, records, table, restored)
                rec.update(rows=rows.num_rows, rows_per_s=round(rows.num_rows / rec["seconds"]),
                           hard_negatives=k, positives=int(pc.sum(pc.equal(rows["label"], 1)).as_py()))
                ray.kill(restored)

            if "mil_workers" in stages and args.mil_workers > 1:
                config = replace(config, workers=args.mil_workers, epochs=args.epochs, checkpoint_every=args.epochs)
                with timed(f"mil_{args.mil_workers}_workers", train_tiles * args.epochs) as rec:
                    mil2 = fit_mil(config, store, records, root / "mil_workers", name="scale_workers")
                seconds = [h["epoch_seconds"] for h in mil2.history]
                rec.update(epoch_seconds=[round(s, 2) for s in seconds],
                           epoch_tiles_per_s=round(train_tiles / seconds[-1]),
                           val_auc=mil2.metrics.get("val_auc"))

            if "tune" in stages:
                with timed("tune", train_tiles * args.tune_epochs * 2) as rec:
                    grid = tune_sweep(root, store_root, store, records, args.tune_epochs)
                trials = [{"w_rank": r.config["mil.w_rank"], "val_auc": (r.metrics or {}).get("val_auc"),
                           "seconds": (r.metrics or {}).get("time_total_s"), "error": str(r.error) if r.error else None,
                           "folder_bytes": disk_bytes(Path(r.path))} for r in grid]
                rec.update(trials=trials, epochs_per_trial=args.tune_epochs,
                           store_unchanged=store_files(store_root) == store_before,
                           sweep_folder_bytes=disk_bytes(root / "tune"),
                           parquet_files_in_sweep=len(list((root / "tune").rglob("*.parquet"))))
        finally:
            if ray_stages:
                ray.shutdown()
        store_unchanged = store_files(store_root) == store_before

    line = json.dumps(summary(args, counts, by_split, store_bytes, stages, results, store_unchanged))
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
