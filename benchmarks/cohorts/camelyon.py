"""Camelyon16-regime cohort: the digits cohort's real MNIST tiles in Camelyon16's sizes and witness-rate spread.

Targets (fixed in benchmarks/README before any ablation ran on it): 540 slides = 270 train / 135 val / 135 test
(Camelyon16's official split is 270 / 129), 40 % positive; 36-64 tissue tiles of 64 px a slide; the tumour share
of a positive slide log-uniform in 1-60 % (at least one tile: many slides < 10 %, a few > 30 %); look-alikes
(tumour mimics) 10 % of every slide's tiles, a minority of the hard negatives. Tumour digit 3, look-alikes 5 and 8
(the classic 3/5/8 confusions; no rotation or flip of a 3 is another digit, as no orientation of a tumour cell
is another tissue: the warm start's rot90/flip augmentations stay valid). Rendered by benchmarks.cohorts.digits
(same files, slide ids, masks and tiles.parquet).

    python -m benchmarks.cohorts.camelyon --out DIR [--seed 0]
    python -m benchmarks.cohorts.camelyon --out DIR --tumour 9 --lookalikes 4 7   # a sibling: tumour 9 (6 is normal)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.cohorts.digits import DigitsConfig, PlannedSlide, cohort_plan, load_mnist, make_digits_cohort

CAMELYON = DigitsConfig(n_slides=540, tumour=3, lookalikes=(5, 8), lookalike_share=0.1, tumour_share=(0.01, 0.6),
                        witness="loguniform", tiles=(36, 64), positive_share=0.4, tile_px=64)

# The README's measurable targets: (statistic, low, high), inclusive.
TARGETS = {"train_slides": (270, None), "test_slides": (129, None), "val_slides": (1, None),
           "positive_share_below_10pct": (0.5, None), "positive_share_at_least_30pct": (0.05, 0.25),
           "min_tumour_tiles_positive": (1, None), "max_tumour_tiles_negative": (None, 0),
           "lookalike_share_of_negative_tiles": (None, 0.15), "min_tiles": (36, None), "max_tiles": (None, 64)}


def camelyon_config(seed: int = 0) -> DigitsConfig:
    """The cohort's config for a seed."""
    return dataclasses.replace(CAMELYON, seed=seed)


def plan_stats(config: DigitsConfig, plan: list[PlannedSlide]) -> dict[str, float]:
    """The statistics the targets are about, measured on a cohort's plan (what its files hold)."""
    splits = [s.split for s in plan]
    counts = np.array([len(s.digits) for s in plan])
    tumour = np.array([int((s.digits == config.tumour).sum()) for s in plan])
    positive = np.array([s.label == 1 for s in plan])
    witness = tumour[positive] / counts[positive]
    negative_digits = np.concatenate([s.digits for s in plan if s.label == 0])
    return {"train_slides": splits.count("train"), "val_slides": splits.count("val"),
            "test_slides": splits.count("test"), "positive_slides": int(positive.sum()),
            "tiles": int(counts.sum()), "min_tiles": int(counts.min()), "max_tiles": int(counts.max()),
            "positive_share_below_10pct": float((witness < 0.1).mean()),
            "positive_share_at_least_30pct": float((witness >= 0.3).mean()),
            "witness_rate_median": float(np.median(witness)),
            "min_tumour_tiles_positive": int(tumour[positive].min()),
            "max_tumour_tiles_negative": int(tumour[~positive].max()),
            "lookalike_share_of_negative_tiles": float(np.isin(negative_digits, config.lookalikes).mean())}


def missed_targets(stats: dict[str, float]) -> list[str]:
    """The targets a cohort's statistics miss ("name: value not in [low, high]"); empty when all are met."""
    return [f"{name}: {stats[name]} not in [{low}, {high}]" for name, (low, high) in TARGETS.items()
            if (low is not None and stats[name] < low) or (high is not None and stats[name] > high)]


def make_camelyon_cohort(out: str | Path, seed: int = 0, cache: str | Path | None = None,
                         config: DigitsConfig | None = None) -> Path:
    """Write the cohort (slides, masks, tiles.parquet, manifest.csv) into `out`; return the manifest path."""
    return make_digits_cohort(out, config or camelyon_config(seed), cache)


def main(argv: list[str] | None = None) -> None:
    """CLI: write the cohort and print one JSON line (its target statistics, missed targets, seconds, manifest)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cohorts.camelyon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created if absent)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    parser.add_argument("--cache",
                        help="folder of the cached MNIST digits (default: $HNM_RAY_CACHE or ~/.cache/hnm_ray)")
    parser.add_argument("--tumour", type=int, default=CAMELYON.tumour,
                        help="tumour digit (a sibling cohort for held-out checks; the fixed cohort: 3)")
    parser.add_argument("--lookalikes", type=int, nargs="+", default=list(CAMELYON.lookalikes),
                        help="look-alike digits (the fixed cohort: 5 8)")
    args = parser.parse_args(argv)
    config = dataclasses.replace(camelyon_config(args.seed), tumour=args.tumour, lookalikes=tuple(args.lookalikes))
    stats = plan_stats(config, cohort_plan(config, load_mnist(args.cache)[1]))
    started = time.perf_counter()
    manifest = make_camelyon_cohort(args.out, args.seed, args.cache, config)
    print(json.dumps({"cohort": "camelyon", "seed": args.seed, "tumour": config.tumour, "lookalikes": config.lookalikes, **stats, "missed_targets": missed_targets(stats),
                      "seconds": round(time.perf_counter() - started, 1), "manifest": str(manifest)}))


if __name__ == "__main__":
    main()
