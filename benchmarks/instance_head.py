"""`mil.instance_head` shared against detached on the features of finished jobs: each round's aggregator retrained
both ways, paired (the same features, config, MIL seed), test slide and instance AUC. One JSON line.

For each finished run (an ablation's --work folder: VARIANT_seed{S}), round r's aggregator is retrained on round r's
stored features with the run's own MIL config (config.yaml: its resolved `mil.embed`), one aggregator
(`mil.ensemble 1`), for each aggregator named and MIL seeds S + 100 d, d < --draws, once with the instance head
sharing the embedding (`shared`, the default) and once detached from it; then, per aggregator and round, the mean ±
sd over runs x draws of each and of the paired difference (detached - shared), with how many pairs the detached head
won; with more than one aggregator, also each one against the first, per round and instance head, paired by run and
MIL seed (e.g. `--aggregators dsmil dsmil_its2clr --modes shared`: the official variant against stock DSMIL).

    python -m benchmarks.instance_head --work /tmp/s15/base --seeds 0 1 2 --rounds 0 2 \
        --aggregators dsmil abmil --out benchmarks/results/instance_head.json
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.ablation import emit, stats
from benchmarks.mil_seed_spread import finished_run, finished_runs_parser, over_finished_runs
from hnm_ray.models.inference import evaluate_split
from hnm_ray.training.mil import fit_mil

KEYS = ("test_auc", "test_instance_auc")
MODES = ("shared", "detached")


def retrain(run: Path, rounds: list[int], aggregators: list[str], draws: int, work: Path,
            modes: tuple[str, ...] = MODES) -> list[dict]:
    """Every (round, aggregator, draw, instance head) retraining of one finished run's aggregator."""
    config, records, store_of = finished_run(run)
    rows = []
    for r in rounds:
        store = store_of(r)
        for aggregator in aggregators:
            for draw in range(draws):
                for mode in modes:
                    single = replace(config.mil, ensemble=1, aggregator=aggregator, instance_head=mode)
                    seed = config.run.seed + 100 * draw
                    fitted = fit_mil(single, store, records, work / f"{run.name}_r{r}_{aggregator}_{draw}_{mode}",
                                     seed=seed)
                    test = evaluate_split(fitted.model_path, store, records, "test", fitted.threshold, aggregator)
                    row = {"run": run.name, "seed": config.run.seed, "round": r, "aggregator": aggregator,
                           "embed": single.embed, "mil_seed": seed, "instance_head": mode,
                           "val_auc": fitted.metrics.get("val_auc"), **{k: test.get(k) for k in KEYS}}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


IDENTITY = ("aggregator", "round", "instance_head", "run", "mil_seed")  # what one fit's row is a fit of


def pairs_differing_in(rows: list[dict], field: str, base: str, other: str) -> list[tuple[dict, dict]]:
    """(base row, other row): the fits identical in everything but `field`, which is `base` in one, `other` in the
    other; a fit without its twin is left out."""
    index = {tuple(row[f] for f in IDENTITY): row for row in rows}
    twins = ((index.get(tuple(base if f == field else row[f] for f in IDENTITY)), row)
             for row in index.values() if row[field] == other)
    return [(twin, row) for twin, row in twins if twin is not None]


def differences(pairs: list[tuple[dict, dict]], key: str) -> tuple[dict, int]:
    """The paired difference other - base of `key` (mean ± sd, n) and the pairs the other won."""
    diffs = [row[key] - base[key] for base, row in pairs]
    return stats(diffs), sum(d > 0 for d in diffs)


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per aggregator and round: each instance head's mean ± sd over runs x draws, the paired difference detached -
    shared and the number of pairs detached won (one head trained, `--modes`: that head's mean ± sd alone)."""
    table = {}
    for aggregator, r in sorted({(row["aggregator"], row["round"]) for row in rows}):
        fits = [row for row in rows if (row["aggregator"], row["round"]) == (aggregator, r)]
        both = pairs_differing_in(fits, "instance_head", "shared", "detached")
        if not both:  # one instance head trained (--modes): its fits alone
            trained = [mode for mode in MODES if any(row["instance_head"] == mode for row in fits)]
            table[f"{aggregator}_round{r}"] = {
                f"{k}_{mode}": stats([row[k] for row in fits if row["instance_head"] == mode])
                for k in KEYS for mode in trained}
            continue
        entry: dict = {"pairs": len(both)}
        for k in KEYS:
            entry.update({f"{k}_{mode}": stats([pair[i][k] for pair in both]) for i, mode in enumerate(MODES)})
            entry[f"{k}_detached_minus_shared"], entry[f"{k}_detached_wins"] = differences(both, k)
        table[f"{aggregator}_round{r}"] = entry
    return table


def compare_aggregators(rows: list[dict], aggregators: list[str]) -> dict[str, dict]:
    """Each aggregator after the first against the first, per round and instance head: the paired difference of
    test slide / instance AUC over runs x MIL seeds, and the pairs the later one won."""
    table = {}
    for other in aggregators[1:]:
        for r, mode in sorted({(row["round"], row["instance_head"]) for row in rows}):
            fits = [row for row in rows if (row["round"], row["instance_head"]) == (r, mode)]
            pairs = pairs_differing_in(fits, "aggregator", aggregators[0], other)
            entry: dict = {"pairs": len(pairs)}
            for k in KEYS:
                entry[f"{k}_minus_{aggregators[0]}"], entry[f"{k}_wins"] = differences(pairs, k)
            table[f"{other}_minus_{aggregators[0]}_round{r}_{mode}"] = entry
    return table


def main() -> None:
    parser = finished_runs_parser(__doc__, [0])
    parser.add_argument("--aggregators", nargs="+", default=["dsmil", "abmil"])
    parser.add_argument("--draws", type=int, default=1, help="MIL seeds per run: run.seed + 100 d")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="instance heads to train (both: their paired difference)")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = over_finished_runs(args, lambda run, work: retrain(run, args.rounds, args.aggregators, args.draws, work,
                                                              tuple(args.modes)))
    line = {"benchmark": "instance_head", "work": args.work, "variant": args.variant, "seeds": args.seeds,
            "rounds": args.rounds, "aggregators": args.aggregators, "modes": args.modes, "draws": args.draws,
            "table": summarise(rows), "aggregators_against_first": compare_aggregators(rows, args.aggregators),
            "runs": rows, "seconds": time.perf_counter() - started}
    emit(line, args.out)


if __name__ == "__main__":
    main()
