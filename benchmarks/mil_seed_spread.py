"""How much of a round's change is the aggregator's own draw: each round's aggregator of finished jobs retrained on
that round's features with several MIL seeds (initialisation and pair order), test slide and instance AUC. One JSON
line.

A job trains one aggregator per round from scratch (`fit_mil`, seed = run.seed), so a round's test AUC mixes what
the round's features allow with one draw of MIL training. Here, for each finished run (an ablation's --work folder:
RUN_seed{S}, e.g. the default job's), round r's aggregator is retrained on round r's stored features with the run's
own config (config.yaml) and MIL seeds 0..K-1: per round, the spread over MIL seeds (the noise of one draw), and per
run the difference of the MIL-seed means, round r - round 0 (what the round's features give an aggregator on
average), then mean ± sd over runs. Then the ensembles (`mil.ensemble`) of the first k of those draws, k = 2..K: their
validation and test AUCs per round (mean ± sd over runs) and their paired change over round 0's ensemble of as many.

    python -m benchmarks.mil_seed_spread --work /tmp/s5/abl_def_auto --variant default --seeds 0 1 2 \
        --rounds 0 2 --mil-seeds 4 --out benchmarks/results/mil_seed_spread.json
    python -m benchmarks.mil_seed_spread --work /tmp/s3/abl0 --variant dsmil_rank_embed_128 --seeds 0 1 2 3 4 \
        --rounds 0 --mil-seeds 5 --out benchmarks/results/mil_ensemble_round0.json
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.ablation import emit, stats
from hnm_ray.config import TrainConfig, from_tree, load_yaml
from hnm_ray.models.inference import evaluate_split
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import load_manifest
from hnm_ray.train import round_store
from hnm_ray.training.mil import fit_mil
from hnm_ray.training.mil_ensemble import combine_members

KEYS = ("test_auc", "test_instance_auc")


def finished_run(run: Path) -> tuple[TrainConfig, list, Callable[[int], FeatureStore]]:
    """A finished job's config, its manifest's records, and the feature store of a round of it."""
    config = from_tree(TrainConfig, load_yaml(run / "config.yaml"))
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    records = load_manifest(config.run.manifest, seed=config.run.seed)
    return config, records, lambda r: round_store(config, run, r, rounds[r]["encoder_weights"])


def run_rounds(run: Path, rounds: list[int], mil_seeds: int, work: Path) -> list[dict]:
    """Every (round, MIL seed) retraining of one finished run."""
    config, records, store_of = finished_run(run)
    single = replace(config.mil, ensemble=1)
    out = []
    for r in rounds:
        store = store_of(r)
        draws = []
        for mil_seed in range(mil_seeds):
            draws.append(fit_mil(single, store, records, work / f"{run.name}_round{r}_mil{mil_seed}", seed=mil_seed))
            test = evaluate_split(draws[-1].model_path, store, records, "test", draws[-1].threshold,
                                  config.mil.aggregator)
            row = {"run": run.name, "seed": config.run.seed, "round": r, "mil_seed": mil_seed,
                   "job_seed_draw": mil_seed == config.run.seed, "val_auc": draws[-1].metrics.get("val_auc"),
                   **{k: test.get(k) for k in KEYS}}
            print(json.dumps(row), flush=True)
            out.append(row)
        out.extend(ensembles(draws, single, store, records, work / f"{run.name}_round{r}", config.run.seed, r, run))
    return out


def ensembles(draws: list, config, store, records, work: Path, seed: int, round_: int, run: Path) -> list[dict]:
    """The ensemble (`mil.ensemble`) of the first k draws, k = 2..K: its validation and test AUCs."""
    rows = []
    for k in range(2, len(draws) + 1):
        fitted = combine_members(draws[:k], config, store, records, work / f"ensemble{k}_aggregator")
        test = evaluate_split(fitted.model_path, store, records, "test", fitted.threshold, config.aggregator)
        row = {"run": run.name, "seed": seed, "round": round_, "ensemble": k, "val_auc": fitted.metrics.get("val_auc"),
               **{key: test.get(key) for key in KEYS}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def summarise(rows: list[dict], rounds: list[int]) -> dict[str, dict]:
    """Per round: the sd over MIL seeds (mean over runs) and the MIL-seed mean (over runs); per round > 0: the paired
    difference of the MIL-seed means to round 0; then the same for the ensembles of the first k draws (mean over
    runs of their AUCs, the paired difference to round 0's ensemble of as many)."""
    single = [x for x in rows if "mil_seed" in x]
    runs = sorted({r["run"] for r in single})
    mean = {(run, r, k): float(np.mean([x[k] for x in single if x["run"] == run and x["round"] == r])) for run in runs
            for r in rounds for k in KEYS}
    table = {}
    for r in rounds:
        entry = {}
        for k in KEYS:
            entry[f"{k}_mil_seed_mean"] = stats([mean[run, r, k] for run in runs])
            entry[f"{k}_sd_over_mil_seeds"] = stats([float(np.std([x[k] for x in single if x["run"] == run
                                                                   and x["round"] == r], ddof=1)) for run in runs])
            if r != rounds[0]:
                entry[f"{k}_delta_vs_round{rounds[0]}"] = stats([mean[run, r, k] - mean[run, rounds[0], k]
                                                                 for run in runs])
        table[f"round{r}"] = entry
    by_size = {(x["run"], x["round"], x["ensemble"]): x for x in rows if "ensemble" in x}
    for size in sorted({key[2] for key in by_size}):
        for r in rounds:
            entry = {k: stats([by_size[run, r, size][k] for run in runs]) for k in ("val_auc", *KEYS)}
            if r != rounds[0]:
                entry.update({f"{k}_delta_vs_round{rounds[0]}": stats([by_size[run, r, size][k]
                                                                       - by_size[run, rounds[0], size][k]
                                                                       for run in runs]) for k in KEYS})
            table[f"round{r}_ensemble{size}"] = entry
    return table


def finished_runs_parser(doc: str, rounds: list[int]) -> argparse.ArgumentParser:
    """The arguments of a benchmark over an ablation's finished runs: --work, --variant, --seeds, --rounds, --out."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="an ablation's --work folder holding VARIANT_seed{S} runs")
    parser.add_argument("--variant", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, nargs="+", default=rounds)
    parser.add_argument("--out", default="")
    return parser


def over_finished_runs(args: argparse.Namespace, retrain: Callable[[Path, Path], list[dict]]) -> list[dict]:
    """The rows of `retrain(run folder, scratch folder)` over each seed's finished run (--work/VARIANT_seed{S}), the
    scratch folder a temporary one, the product's info logs off."""
    logging.getLogger("hnm_ray").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="retrain_") as work:
        runs = [Path(args.work) / f"{args.variant}_seed{seed}" for seed in args.seeds]
        return [row for run in runs for row in retrain(run, Path(work))]


def main() -> None:
    parser = finished_runs_parser(__doc__, [0, 2])
    parser.add_argument("--mil-seeds", type=int, default=4)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = over_finished_runs(args, lambda run, work: run_rounds(run, args.rounds, args.mil_seeds, work))
    line = {"benchmark": "mil_seed_spread", "work": args.work, "variant": args.variant, "seeds": args.seeds,
            "rounds": args.rounds, "mil_seeds": args.mil_seeds, "table": summarise(rows, args.rounds), "runs": rows,
            "seconds": time.perf_counter() - started}
    emit(line, args.out)


if __name__ == "__main__":
    main()
