"""The paper's ablation on a cohort (the synthetic demo, or the real-image digits cohort), side by side in one run,
over seeds: mean and standard deviation of every metric (prints one JSON line and a markdown table).

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

    python -m benchmarks.ablation --cohort digits --seeds 0 1 2 3 4 --out benchmarks/results/ablation_digits.json
    python -m benchmarks.ablation --cohort demo [--seeds 0 1 2] [--recipe paper]

The digits cohort (benchmarks/cohorts/digits.py: 160 slides of real MNIST digits, 64 px tiles) and the
Camelyon16-regime cohort (benchmarks/cohorts/camelyon.py: 540 slides, `--cohort camelyon`) are generated once into
the cache. Every variant starts from the same warm start per seed (SimCLR, `--pretrain-epochs`,
cached), as a user's job does by default.
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
    "adapter_hnm_rank": {"finetune": {"scope": "adapter"}, "mining": {"neg_ratio": 0.2}, "mil": {"w_rank": 0.1}},
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
            # the last round, what the variant's fine-tuning made (not the job's kept round, run.final_round)
            "final": {k: final["rounds"][-1].get(k) for k in METRICS},
            "epoch_seconds": ft["last"].get("epoch_seconds"), "tiles_per_epoch": ft["tiles_per_epoch"],
            "hard_negatives": ft["hard_negatives"], "positives_streamed": ft.get("positives_streamed")}


def stats(values: list) -> dict[str, float]:
    """Mean and sample standard deviation ignoring None/nan, with the count."""
    clean = [v for v in values if v is not None and not np.isnan(v)]
    return {"mean": float(np.mean(clean)) if clean else float("nan"),
            "sd": float(np.std(clean, ddof=1)) if len(clean) > 1 else float("nan"), "n": len(clean)}


def cohort_base(cohort: str, pretrain_epochs: int | None) -> dict:
    """The config of a cohort: the demo's defaults, or a real-image cohort (generated once, 64 px tiles): the
    digits cohort with its historical warm start (20 SimCLR epochs, batch 128), the Camelyon16-regime cohort with
    the product's default warm start."""
    if cohort == "demo":
        return {"pretrain": {"method": "none"}}
    from benchmarks.cohorts import cached_cohort

    folder = cached_cohort(cohort)
    base = {"run": {"manifest": str(folder / "manifest.csv")}, "tiling": {"tile_size": 64},
            "pretrain": {"method": "simclr"}}
    if cohort == "digits":
        base = merge(base, {"pretrain": {"epochs": 20, "tiles": 4096}, "finetune": {"batch_size": 128}})
    return merge(base, {"pretrain": {"epochs": pretrain_epochs}}) if pretrain_epochs else base


def markdown(table: dict[str, dict[str, dict]]) -> str:
    """The ablation table as markdown: mean ± sd per metric and variant."""
    columns = [*METRICS, "ft_seconds_per_epoch"]
    lines = ["| variant | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for variant, row in table.items():
        cells = [f"{row[c]['mean']:.3f} ± {row[c]['sd']:.3f}" if c in row else "—" for c in columns]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", choices=["demo", "digits", "camelyon"], default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rounds", type=int, default=1, help="fine-tuning rounds of every variant")
    parser.add_argument("--epochs-per-round", type=int, default=3)
    parser.add_argument("--pretrain-epochs", type=int, default=None,
                        help="SimCLR warm-start epochs (default: 20 on digits, the product's on camelyon)")
    parser.add_argument("--out", default="")
    parser.add_argument("--work", default="", help="folder for runs (default: a temp folder)")
    parser.add_argument("--recipe", metavar="NAME", default=None,
                        help="a shipped recipe (hnm_ray.config.load_recipe: NAME or a YAML path) as the base of every "
                             "variant, and the variant \"NAME recipe\" (the recipe alone)")
    parser.add_argument("--variants", nargs="+", default=None, help="run only these variants")
    args = parser.parse_args()
    root = Path(args.work or tempfile.mkdtemp(prefix="hnm_ablation_"))
    size = {"run": {"rounds": args.rounds, "heatmaps": 0, "runs_dir": str(root)}, "mil": {"workers": 0},
            "finetune": {"epochs_per_round": args.epochs_per_round, "warmup_epochs": 1, "workers": 1}}
    base = merge(cohort_base(args.cohort, args.pretrain_epochs), size)
    base = merge(merge(load_recipe(args.recipe), base), size) if args.recipe else base
    chosen = {k: v for k, v in variants(args.recipe).items() if not args.variants or k in args.variants}
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {v: [] for v in chosen}
    for seed in args.seeds:
        store = root / f"features_seed{seed}"
        for variant, overrides in chosen.items():
            runs[variant].append(run_variant(base, variant, overrides, seed, root, store))
            print(json.dumps({"variant": variant, "seed": seed, **runs[variant][-1]}), flush=True)
    # DSMIL baseline: round 0 (the aggregator on the warm-start features) of the variants without the ranking loss.
    plain = {seed: r for results in runs.values() for seed, r in zip(args.seeds, results) if r["w_rank"] == 0}
    table = {"dsmil": {k: stats([r["round0"][k] for r in plain.values()]) for k in METRICS}}
    for variant, results in runs.items():
        table[variant] = {k: stats([r["final"][k] for r in results]) for k in METRICS}
        table[variant]["ft_seconds_per_epoch"] = stats([r["epoch_seconds"] for r in results])
        table[variant]["ft_tiles_per_epoch"] = stats([r["tiles_per_epoch"] for r in results])
    ratios = {}
    if "hnm" in table and "its2clr" in table:
        ratios = {"time_ratio_hnm_vs_all_negatives": table["hnm"]["ft_seconds_per_epoch"]["mean"]
                  / table["its2clr"]["ft_seconds_per_epoch"]["mean"],
                  "tiles_ratio_hnm_vs_all_negatives": table["hnm"]["ft_tiles_per_epoch"]["mean"]
                  / table["its2clr"]["ft_tiles_per_epoch"]["mean"]}
    line = {"benchmark": "ablation", "cohort": args.cohort, "seeds": args.seeds, "recipe": args.recipe,
            "rounds": args.rounds, "epochs_per_round": args.epochs_per_round, "table": table, **ratios,
            "runs": runs, "markdown": markdown(table), "seconds": time.perf_counter() - started,
            "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(), "gpu": False}}
    print(json.dumps(line))
    print(line["markdown"])
    if args.out:
        Path(args.out).write_text(json.dumps(line, indent=1) + "\n")


if __name__ == "__main__":
    main()
