"""How much of a round's change is the aggregator's own draw: each round's aggregator of finished jobs retrained on
that round's features with several MIL seeds (initialisation and pair order), test slide and instance AUC. One JSON
line.

A job trains one aggregator per round from scratch (`fit_mil`, seed = run.seed), so a round's test AUC mixes what
the round's features allow with one draw of MIL training. Here, for each finished run (an ablation's --work folder:
RUN_seed{S}, e.g. the default job's), round r's aggregator is retrained on round r's stored features with the run's
own config (config.yaml) and MIL seeds 0..K-1: per round, the spread over MIL seeds (the noise of one draw), and per
run the difference of the MIL-seed means, round r - round 0 (what the round's features give an aggregator on
average), then mean ± sd over runs.

    python -m benchmarks.mil_seed_spread --work /tmp/s5/abl_def_auto --variant default --seeds 0 1 2 \
        --rounds 0 2 --mil-seeds 4 --out benchmarks/results/mil_seed_spread.json
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.ablation import emit, stats
from hnm_ray.config import TrainConfig, from_tree, load_yaml
from hnm_ray.models.inference import evaluate_split
from hnm_ray.store.manifest import load_manifest
from hnm_ray.train import round_store
from hnm_ray.training.mil import fit_mil

KEYS = ("test_auc", "test_instance_auc")


def run_rounds(run: Path, rounds: list[int], mil_seeds: int, work: Path) -> list[dict]:
    """Every (round, MIL seed) retraining of one finished run."""
    config = from_tree(TrainConfig, load_yaml(run / "config.yaml"))
    metrics = json.loads((run / "metrics.json").read_text())
    records = load_manifest(config.run.manifest, seed=config.run.seed)
    out = []
    for r in rounds:
        store = round_store(config, run, r, metrics["rounds"][r]["encoder_weights"])
        for mil_seed in range(mil_seeds):
            fitted = fit_mil(config.mil, store, records, work / f"{run.name}_round{r}_mil{mil_seed}", seed=mil_seed)
            test = evaluate_split(fitted.model_path, store, records, "test", fitted.threshold, config.mil.aggregator)
            row = {"run": run.name, "seed": config.run.seed, "round": r, "mil_seed": mil_seed,
                   "job_seed_draw": mil_seed == config.run.seed, **{k: test.get(k) for k in KEYS}}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def summarise(rows: list[dict], rounds: list[int]) -> dict[str, dict]:
    """Per round: the sd over MIL seeds (mean over runs) and the MIL-seed mean (over runs); per round > 0: the paired
    difference of the MIL-seed means to round 0."""
    runs = sorted({r["run"] for r in rows})
    mean = {(run, r, k): float(np.mean([x[k] for x in rows if x["run"] == run and x["round"] == r])) for run in runs
            for r in rounds for k in KEYS}
    table = {}
    for r in rounds:
        entry = {}
        for k in KEYS:
            entry[f"{k}_mil_seed_mean"] = stats([mean[run, r, k] for run in runs])
            entry[f"{k}_sd_over_mil_seeds"] = stats([float(np.std([x[k] for x in rows if x["run"] == run
                                                                   and x["round"] == r], ddof=1)) for run in runs])
            if r != rounds[0]:
                entry[f"{k}_delta_vs_round{rounds[0]}"] = stats([mean[run, r, k] - mean[run, rounds[0], k]
                                                                 for run in runs])
        table[f"round{r}"] = entry
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="an ablation's --work folder holding VARIANT_seed{S} runs")
    parser.add_argument("--variant", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--mil-seeds", type=int, default=4)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.getLogger("hnm_ray").setLevel(logging.WARNING)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mil_seed_spread_") as work:
        rows = [row for seed in args.seeds for row in run_rounds(Path(args.work) / f"{args.variant}_seed{seed}",
                                                                 args.rounds, args.mil_seeds, Path(work))]
    line = {"benchmark": "mil_seed_spread", "work": args.work, "variant": args.variant, "seeds": args.seeds,
            "rounds": args.rounds, "mil_seeds": args.mil_seeds, "table": summarise(rows, args.rounds), "runs": rows,
            "seconds": time.perf_counter() - started}
    emit(line, args.out)


if __name__ == "__main__":
    main()
