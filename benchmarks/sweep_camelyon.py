"""The product's Ray Tune sweep (`hnm_ray.tune.run_sweep`) on the Camelyon16-regime cohort, with what the sweep cannot
see added per trial: the test metrics and the representation (tile probe and perfect-label slide AUC, from tile truth)
of round 0 and of each later round, and what round 0's mining chose. Issue 22: "if a variant does not beat round 0,
say by how much and why (sweep neg_ratio and epochs with hnm_ray.tune on the cohort)".

    python -m benchmarks.sweep_camelyon --seed 0 --store /tmp/abl/features_seed0 --work /tmp/sweep \\
        --neg-ratios 0.05 0.2 1.0 --finetune-epochs 2 6 --out benchmarks/results/sweep_camelyon_seed0.json

Every trial is the default job (ranking loss, mil.ensemble and mil.embed as the product's) at the benchmark's run size
(`--rounds` fine-tuning rounds, warm-up 1, no heatmaps), from the cohort's product warm start; `--store` reuses a
round-0 store of the same seed and warm start (e.g. the ablation's `features_seed{S}`), or the sweep extracts one.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.ablation import cohort_base, emit, representation
from hnm_ray.config import merge
from hnm_ray.config.tree import from_tree
from hnm_ray.tune import TuneConfig, run_sweep, trial_config

KEPT = ("val_auc", "test_auc", "test_instance_auc", "test_instance_auprc")


def sweep_config(args: argparse.Namespace) -> TuneConfig:
    """The cohort's base at the run size, one seed, and the grid over the mining ratio and fine-tuning epochs (the
    ranking-loss knobs pinned at the product's defaults)."""
    size = {"run": {"rounds": args.rounds, "heatmaps": 0, "seed": args.seed, "runs_dir": str(Path(args.work) / "runs"),
                    "store": args.store},
            "mil": {"workers": 0}, "finetune": {"warmup_epochs": 1}}
    if args.mil_ensemble is not None:
        size = merge(size, {"mil": {"ensemble": args.mil_ensemble}})
    sweep = {"neg_ratios": args.neg_ratios, "finetune_epochs": args.finetune_epochs, "margins": [1.0], "rank_ks": [10],
             "w_ranks": [0.1], "search": "grid", "num_samples": 1, "storage_path": str(Path(args.work) / "tune"),
             "sweep_name": f"camelyon_seed{args.seed}", "grace_rounds": args.rounds + 1}
    if args.positive_ratios:
        sweep["positive_ratios"] = args.positive_ratios
    return from_tree(TuneConfig, merge(merge(cohort_base("camelyon", None), size), {"sweep": sweep}))


def trial_row(params: dict, trial_dir: str | Path) -> dict:
    """One trial (its Tune params and folder): its swept knobs, each round's validation/test metrics and
    representation, round 0's mining and the fine-tuning seconds per epoch."""
    config = trial_config(params)
    run_dir = Path(trial_dir) / "run"
    final = json.loads((run_dir / "metrics.json").read_text())
    rounds = [{**{k: r.get(k) for k in KEPT}, **representation(config, run_dir, i, r)}
              for i, r in enumerate(final["rounds"])]
    ft = final["finetune"].get("finetune_round0", {"last": {}})
    return {"neg_ratio": config.mining.neg_ratio, "epochs_per_round": config.finetune.epochs_per_round,
            "ro": config.mining.ro, "rounds": rounds, "kept_round": final["final"]["round"],
            "delta": {k: rounds[-1][k] - rounds[0][k] for k in (*KEPT, "probe_auc", "ceiling_slide_auc")},
            "epoch_seconds": ft["last"].get("epoch_seconds"), "ft_loss": ft["last"].get("ft_loss"),
            "trial": Path(trial_dir).name}


def finished_trials(sweep_dir: Path) -> list[dict]:
    """The rows of the trials of a (stopped) sweep folder whose job finished (its run's metrics.json written)."""
    return [trial_row(json.loads((t / "params.json").read_text()), t) for t in sorted(sweep_dir.glob("trial_*"))
            if (t / "run" / "metrics.json").is_file()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", default="", help="a round-0 store of this seed and the product's warm start")
    parser.add_argument("--work", required=True, help="folder for the sweep and its trials' runs")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--neg-ratios", type=float, nargs="+", default=[0.05, 0.2, 1.0])
    parser.add_argument("--finetune-epochs", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--positive-ratios", type=float, nargs="+", default=None, help="mining.ro values (default: "
                                                                                       "not swept)")
    parser.add_argument("--mil-ensemble", type=int, default=None, help="mil.ensemble (default: the product's)")
    parser.add_argument("--out", default="")
    parser.add_argument("--from-trials", metavar="SWEEP_DIR", help="no sweep: the rows of the finished trials of a "
                                                                  "(stopped) sweep folder, <work>/tune/<sweep_name>")
    args = parser.parse_args()
    config = sweep_config(args)
    started = time.perf_counter()
    if args.from_trials:
        rows = finished_trials(Path(args.from_trials))
    else:
        rows = [trial_row(r.config, r.path) for r in run_sweep(config) if r.error is None]
    rows.sort(key=lambda r: (r["neg_ratio"], r["epochs_per_round"], r["ro"]))
    picked = max(rows, key=lambda r: r["rounds"][-1]["val_auc"])  # what the sweep's best_config.yaml holds
    emit({"benchmark": "sweep_camelyon", "seed": args.seed, "rounds": args.rounds, "mil_ensemble": config.mil.ensemble,
          "grid": {"neg_ratios": args.neg_ratios, "finetune_epochs": args.finetune_epochs}, "trials_finished": len(rows),
          "trials": rows, "picked_by_validation": {k: picked[k] for k in ("neg_ratio", "epochs_per_round", "ro", "delta")},
          "seconds": time.perf_counter() - started}, args.out)


if __name__ == "__main__":
    main()
