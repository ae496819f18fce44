"""The representation a round hands the aggregator, measured against tile truth (issue 22, part 3).

    tile_probe(store, records, ...)   tile-labelled linear probe (logistic regression, standardised features,
                                      train tiles -> test tiles): test AUC, and the slide AUC that perfect tile
                                      labels give on these features (a test slide scored by its best tile's probe
                                      score: the ceiling the aggregator faces)
    mined_precision(selection, ...)   what the miner chose, against the cohort's digits: the share of hard negatives
                                      that are look-alikes (tumour mimics), and the precision of the positives

Tile truth: the store's `truth` column (from the tumour masks); digits: the cohort's tiles.parquet (x, y, digit).

    python -m benchmarks.representation --store RUN/features --tag TAG --round 0 --manifest M [--selection DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord, load_manifest


def split_tiles(store: FeatureStore, records: list[SlideRecord], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, D), tumour truth (N,), slide index (N,)) of every tile of a split's slides, with the slide
    labels in `records` order of the split."""
    features, truth, slide = [], [], []
    for i, record in enumerate(r for r in records if r.split == split):
        bag = store.read_bag(record.slide_id)
        features.append(bag.features)
        truth.append(bag.truth > 0)
        slide.append(np.full(len(bag), i))
    return np.concatenate(features), np.concatenate(truth), np.concatenate(slide)


def tile_probe(store: FeatureStore, records: list[SlideRecord], n_train: int = 8000, seed: int = 0) -> dict[str, float]:
    """Tile probe test AUC and the perfect-tile-label slide AUC ceiling on a store's features."""
    train_x, train_y, _ = split_tiles(store, records, "train")
    test_x, test_y, test_slide = split_tiles(store, records, "test")
    pick = np.random.default_rng(seed).choice(len(train_x), min(n_train, len(train_x)), replace=False)
    mean, std = train_x[pick].mean(0), train_x[pick].std(0) + 1e-6
    probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit((train_x[pick] - mean) / std, train_y[pick])
    scores = probe.decision_function((test_x - mean) / std)
    labels = np.asarray([int(r.label) for r in records if r.split == "test"])
    best = np.full(len(labels), -np.inf)
    np.maximum.at(best, test_slide, scores)
    return {"probe_auc": float(roc_auc_score(test_y, scores)), "ceiling_slide_auc": float(roc_auc_score(labels, best)),
            "probe_train_tiles": int(len(pick)), "probe_test_tiles": int(len(test_x))}


def mined_precision(selection: str | Path, store: FeatureStore, tiles_parquet: str | Path) -> dict[str, float]:
    """Share of a round's hard negatives that are look-alikes and precision of its positives (digits cohorts)."""
    meta = json.loads(pq.read_schema(tiles_parquet).metadata[b"config"])
    truth = pq.read_table(tiles_parquet, columns=["slide_id", "x", "y", "digit"]).to_pandas()
    out: dict[str, float] = {}
    for name in ("hard_negatives", "positives"):
        chosen = pq.read_table(Path(selection) / f"{name}.parquet", columns=["slide_id", "tile_id"]).to_pandas()
        parts = []
        for slide_id, rows in chosen.groupby("slide_id"):
            coords = store.read_table(slide_id, columns=["tile_id", "x", "y"]).to_pandas()
            parts.append(rows.merge(coords.assign(slide_id=slide_id), on=["slide_id", "tile_id"]))
        digits = (np.concatenate([p.merge(truth, on=["slide_id", "x", "y"])["digit"].to_numpy() for p in parts])
                  if parts else np.zeros(0, int))
        if name == "hard_negatives":
            out["hard_negative_lookalike_share"] = float(np.isin(digits, meta["lookalikes"]).mean()) if len(digits) else np.nan
            out["hard_negatives"] = int(len(digits))
        else:
            out["positive_precision"] = float((digits == meta["tumour"]).mean()) if len(digits) else np.nan
            out["positives"] = int(len(digits))
    out["lookalike_share_of_negative_tiles"] = float(meta.get("lookalike_share", np.nan))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--selection", help="a run's selection_round<r> folder (with --tiles)")
    parser.add_argument("--tiles", help="the cohort's tiles.parquet (default: beside the manifest)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    records = load_manifest(args.manifest, seed=args.seed)
    store = FeatureStore(args.store, args.tag, round=args.round)
    line = {"benchmark": "representation", "round": args.round, **tile_probe(store, records, seed=args.seed)}
    if args.selection:
        line.update(mined_precision(args.selection, store, args.tiles or Path(args.manifest).parent / "tiles.parquet"))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
