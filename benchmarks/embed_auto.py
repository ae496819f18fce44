"""mil.embed against the number of training slides: from how many the learnt instance embedding helps (the threshold
of `mil.embed` unset, auto: sections.EMBED_AUTO_MIN_BAGS). One JSON line.

On the Camelyon16-regime cohort's round-0 features of each seed (the product's default warm start, read from the
stores an ablation left: --features DIR holding features_seed{S}; nothing is extracted or pre-trained here), the
aggregator is trained by the product (`fit_mil`, the MIL defaults, in this process) on a seeded stratified subsample
of n training slides, with the validation split subsampled in proportion (n/2 slides: a cohort of that size has a
validation split of that size) and the 135 test slides whole, once with mil.embed 0 and once with 128. Reported per
n: test slide AUC and instance AUC, mean ± sd over seeds, and the paired difference 128 - 0. Only the aggregator
sees n slides: the features come from the whole cohort's warm start (a cohort of n slides would also have a weaker
warm start).

    python -m benchmarks.embed_auto --features /tmp/s3/abl --sizes 40 60 80 120 270 --seeds 0 1 2 \
        --out benchmarks/results/embed_auto.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.ablation import cohort_base, emit, stats
from hnm_ray.config import TrainConfig, from_tree, merge
from hnm_ray.extraction.index import TileIndex
from hnm_ray.models.inference import evaluate_split
from hnm_ray.run.run_folder import cache_dir
from hnm_ray.store.manifest import SlideRecord, load_manifest
from hnm_ray.train import index_root, round_store
from hnm_ray.training.mil import fit_mil
from hnm_ray.training.pretrain import warm_start

WIDTHS = (0, 128)


def subsample(records: list[SlideRecord], n_train: int, seed: int) -> list[SlideRecord]:
    """n_train training slides and n_train / 2 validation slides (each split stratified by label, seeded) and every
    test slide; the cohort's own split when n_train is its training split's size."""
    rng = np.random.default_rng([seed, n_train])
    train = [r for r in records if r.split == "train"]
    kept: list[SlideRecord] = []
    for split, n in (("train", n_train), ("val", round(n_train / 2))):
        rows = [r for r in records if r.split == split]
        for label in (0, 1):
            pool = [r for r in rows if r.label == label]
            share = sum(r.label == label for r in train) / len(train)
            take = min(len(pool), max(1, round(n * share)))
            kept += [pool[i] for i in sorted(rng.choice(len(pool), take, replace=False))]
    return kept + [r for r in records if r.split == "test"]


def run_seed(features: Path, seed: int, sizes: list[int], work: Path) -> list[dict]:
    """Every (n, width) fit of one seed on that seed's round-0 store."""
    config = from_tree(TrainConfig, merge(cohort_base("camelyon", None),
                                          {"run": {"seed": seed, "store": str(features / f"features_seed{seed}")},
                                           "mil": {"workers": 0}}))
    records = load_manifest(config.run.manifest, seed=seed)
    index = TileIndex(index_root(config, work), config.tiling)
    weights = warm_start(config, records, work, cache_dir(config.run), index)  # the cached warm start of this seed
    store = round_store(config, work, 0, weights)
    if len(store.completed()) < len(records):
        raise SystemExit(f"{store.directory} holds {len(store.completed())} of {len(records)} slides: run the "
                         f"ablation for seed {seed} first (benchmarks.ablation --cohort camelyon --work {features})")
    out = []
    for n in sizes:
        chosen = subsample(records, n, seed)
        for width in WIDTHS:
            mil = dataclasses.replace(config.mil, embed=width, ensemble=1)  # one aggregator, as measured
            fitted = fit_mil(mil, store, chosen, work / f"seed{seed}_n{n}_embed{width}", seed=seed)
            test = evaluate_split(fitted.model_path, store, chosen, "test", fitted.threshold, mil.aggregator)
            row = {"seed": seed, "n_train": n, "n_val": sum(r.split == "val" for r in chosen), "embed": width,
                   "best_epoch": fitted.best_epoch, **{k: test.get(k) for k in ("test_auc", "test_instance_auc")}}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def summarise(rows: list[dict], sizes: list[int]) -> dict[str, dict]:
    """Per n: each width's test slide / instance AUC over seeds and the paired difference 128 - 0."""
    table = {}
    for n in sizes:
        at = {w: {r["seed"]: r for r in rows if r["n_train"] == n and r["embed"] == w} for w in WIDTHS}
        seeds = sorted(set(at[0]) & set(at[128]))
        entry = {}
        for key in ("test_auc", "test_instance_auc"):
            for w in WIDTHS:
                entry[f"{key}_embed{w}"] = stats([at[w][s][key] for s in seeds])
            entry[f"{key}_delta"] = stats([at[128][s][key] - at[0][s][key] for s in seeds])
        table[str(n)] = entry
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", required=True, help="folder holding features_seed{S} (an ablation's --work)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 60, 80, 120, 270])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.getLogger("hnm_ray").setLevel(logging.WARNING)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="embed_auto_") as work:
        rows = [row for seed in args.seeds for row in run_seed(Path(args.features), seed, args.sizes, Path(work))]
    line = {"benchmark": "embed_auto", "cohort": "camelyon", "sizes": args.sizes, "seeds": args.seeds,
            "widths": list(WIDTHS), "table": summarise(rows, args.sizes), "runs": rows,
            "seconds": time.perf_counter() - started}
    emit(line, args.out)


if __name__ == "__main__":
    main()
