"""The paper's ablation on the demo cohort, side by side in one run (prints one JSON line).

Variants (each averaged over seeds; all share the round-0 features of the demo cohort):
  dsmil        MIL on the initial features (round 0 of any run: the DSMIL baseline)
  its2clr      fine-tuning with ALL negatives (neg_ratio 1.0), no ranking loss
  hnm          + hard negative mining (neg_ratio 0.2)
  hnm_rank     + hard negative mining + the multiple instance ranking loss (w_rank 0.1)
  NAME recipe  with --recipe NAME: the recipe as shipped (e.g. "paper recipe": the official values)
Each variant is a nested override of the config tree (`{"mining": {"neg_ratio": 1.0}, "mil": {"w_rank": 0.0}}`),
applied over the benchmark's base: the defaults, or the recipe given with --recipe, then the benchmark's run size
(1 fine-tuning round of --epochs-per-round epochs, warm-up 1, MIL in the driver, 1 fine-tuning worker, no heatmaps),
which overrides the recipe's so that every variant fits the demo cohort.
Reported: test slide AUC / accuracy / F1, test instance AUC / AUPRC, fine-tuning seconds per epoch
(measured inside the Train loop, start-up excluded) and the time ratio hnm / its2clr.

    python benchmarks/ablation.py [--seeds 0 1 2] [--recipe paper] [--out benchmarks/results/ablation.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from hnm_ray.config import TrainConfig, from_tree, load_recipe, merge
from hnm_ray.train import run_job

VARIANTS = {
    "its2clr": {"mining": {"neg_ratio": 1.0}, "mil": {"w_rank": 0.0}},
    "hnm": {"mining": {"neg_ratio": 0.2}, "mil": {"w_rank": 0.0}},
    "hnm_rank": {"mining": {"neg_ratio": 0.2}, "mil": {"w_rank": 0.1}},
}
METRICS = ("test_auc", "test_accuracy", "test_f1", "test_instance_auc", "test_instance_auprc")


def variants(recipe: str | None) -> dict[str, dict]:
    """The variants' nested overrides; with a recipe, also the recipe itself ("NAME recipe", no overrides)."""
    return {**VARIANTS, f"{Path(recipe).stem} recipe": {}} if recipe else dict(VARIANTS)


def run_variant(base: dict, variant: str, overrides: dict, seed: int, root: Path, store: Path) -> dict:
    """One full job (1 fine-tuning round) of a variant and seed; returns its metrics and timing."""
    name = f"{variant.replace(' ', '_')}_seed{seed}"
    config = from_tree(TrainConfig, merge(merge(base, overrides),
                                          {"run": {"seed": seed, "name": name, "store": str(store)}}))
    final = run_job(config, root / name)
    ft = final["finetune"]["finetune_round0"]
    return {"w_rank": config.mil.w_rank, "round0": {k: final["rounds"][0].get(k) for k in METRICS},
            "final": {k: final["final"].get(k) for k in METRICS},
            "epoch_seconds": ft["last"].get("epoch_seconds"), "tiles_per_epoch": ft["tiles_per_epoch"],
            "hard_negatives": ft["hard_negatives"], "positives_streamed": ft.get("positives_streamed")}


def mean(values: list) -> float:
    """Mean ignoring None/nan."""
    clean = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(clean)) if clean else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs-per-round", type=int, default=3)
    parser.add_argument("--out", default="")
    parser.add_argument("--work", default="", help="folder for runs (default: a temp folder)")
    parser.add_argument("--recipe", metavar="NAME", default=None,
                        help="a shipped recipe (hnm_ray.config.load_recipe: NAME or a YAML path) as the base of every "
                             "variant, and the variant \"NAME recipe\" (the recipe alone)")
    args = parser.parse_args()
    root = Path(args.work or tempfile.mkdtemp(prefix="hnm_ablation_"))
    size = {"run": {"rounds": 1, "heatmaps": 0, "runs_dir": str(root)}, "mil": {"workers": 0},
            "finetune": {"epochs_per_round": args.epochs_per_round, "warmup_epochs": 1, "workers": 1}}
    base = merge(load_recipe(args.recipe), size) if args.recipe else size
    chosen = variants(args.recipe)
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {v: [] for v in chosen}
    for seed in args.seeds:
        store = root / f"features_seed{seed}"
        for variant, overrides in chosen.items():
            runs[variant].append(run_variant(base, variant, overrides, seed, root, store))
    # DSMIL baseline: round 0 (initial features) of the variants without the ranking loss.
    plain = [r for results in runs.values() for r in results if r["w_rank"] == 0]
    table = {"dsmil": {k: mean([r["round0"][k] for r in plain]) for k in METRICS}}
    for variant, results in runs.items():
        table[variant] = {k: mean([r["final"][k] for r in results]) for k in METRICS}
        table[variant]["ft_seconds_per_epoch"] = mean([r["epoch_seconds"] for r in results])
        table[variant]["ft_tiles_per_epoch"] = mean([r["tiles_per_epoch"] for r in results])
    ratio = table["hnm"]["ft_seconds_per_epoch"] / table["its2clr"]["ft_seconds_per_epoch"]
    line = {"benchmark": "ablation", "cohort": "demo (16 synthetic slides, 4 test)", "seeds": args.seeds,
            "recipe": args.recipe,
            "epochs_per_round": args.epochs_per_round, "table": table, "time_ratio_hnm_vs_all_negatives": ratio,
            "tiles_ratio_hnm_vs_all_negatives": table["hnm"]["ft_tiles_per_epoch"] / table["its2clr"]["ft_tiles_per_epoch"],
            "seconds": time.perf_counter() - started,
            "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(), "gpu": False}}
    print(json.dumps(line))
    if args.out:
        Path(args.out).write_text(json.dumps(line, indent=1) + "\n")


if __name__ == "__main__":
    main()
