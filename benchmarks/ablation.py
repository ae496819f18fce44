"""The paper's ablation on a cohort (the synthetic demo, the real-image digits cohort or the Camelyon16-regime cohort),
side by side in one run, over seeds: mean and standard deviation of every metric (one JSON line and a markdown table).

Variants (each averaged over seeds; per seed all share the round-0 features and the warm start):
  dsmil           MIL on the initial features (round 0 of any run: the DSMIL baseline)
  its2clr         fine-tuning with ALL negatives (neg_ratio 1.0), no ranking loss
  hnm             + hard negative mining (neg_ratio 0.2)
  hnm_rank        + hard negative mining + the multiple instance ranking loss (w_rank 0.1)
  paper_cpu       --recipe paper scaled to a CPU (PAPER_CPU: small_cnn, 40 MIL epochs), with --paper-cpu
  NAME recipe     with --recipe NAME: the recipe as shipped (e.g. "paper recipe": the official values)
  default         the product's defaults (only when named: --variants default; --rounds 2 --epochs-per-round 2 is the
                  default job)
Each variant is a nested override of the config tree (`{"mining": {"neg_ratio": 1.0}, "mil": {"w_rank": 0.0}}`),
applied over the benchmark's base (the defaults, or the recipe given with --recipe), then the benchmark's run size
(--rounds fine-tuning rounds of --epochs-per-round epochs, warm-up 1, MIL in the driver, no heatmaps), which
overrides the variant's so that every variant fits the cohort.
Reported per round: test slide AUC / accuracy / F1, the official protocol's test AUC, test instance AUC / AUPRC;
on the real-image cohorts also the representation (benchmarks/representation.py: the tile probe AUC of the round's
features and the slide AUC perfect tile labels give on them) and what round 0's mining chose (the look-alike share
of the hard negatives, the precision of the positives); fine-tuning seconds per epoch (inside the training loop,
start-up excluded) and the time ratio hnm / its2clr.

    python -m benchmarks.ablation --cohort camelyon --seeds 0 1 2 3 4 --paper-cpu --out benchmarks/results/ablation.json
    python -m benchmarks.ablation --cohort camelyon --variants default --rounds 2 --epochs-per-round 2 --seeds 0 1 2
    python -m benchmarks.ablation --cohort digits --seeds 0 1 2 3 4 --out benchmarks/results/ablation_digits.json

The digits cohort (benchmarks/cohorts/digits.py: 160 slides of real MNIST digits, 64 px tiles) and the
Camelyon16-regime cohort (benchmarks/cohorts/camelyon.py: 540 slides) are generated once into the cache. Every
variant starts from the same warm start per seed (SimCLR, `--pretrain-epochs`, cached), as a user's job does.
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
from hnm_ray.config.files import set_dotted
from hnm_ray.core.errors import ConfigError
from hnm_ray.train import run_job

VARIANTS = {
    "its2clr": {"mining": {"neg_ratio": 1.0}, "mil": {"w_rank": 0.0}},
    "hnm": {"mining": {"neg_ratio": 0.2}, "mil": {"w_rank": 0.0}},
    "hnm_rank": {"mining": {"neg_ratio": 0.2}, "mil": {"w_rank": 0.1}},
    "adapter_hnm_rank": {"finetune": {"scope": "adapter"}, "mining": {"neg_ratio": 0.2}, "mil": {"w_rank": 0.1}},
    # the aggregator with a learnt instance embedding (mil.embed; classic_mil.py), without and with the ranking loss
    "dsmil_embed_128": {"mining": {"neg_ratio": 0.2}, "mil": {"w_rank": 0.0, "embed": 128}},
    "dsmil_rank_embed_128": {"mining": {"neg_ratio": 0.2}, "mil": {"w_rank": 0.1, "embed": 128}},
    # hnm_rank with the negatives as 8 SupCon classes (finetune.negative_classes; benchmarks/README)
    "hnm_rank_negative_classes_8": {"mining": {"neg_ratio": 0.2}, "mil": {"w_rank": 0.1},
                                    "finetune": {"negative_classes": 8}},
    # hnm_rank with a 10x lower fine-tuning learning rate (does a smaller step keep the perfect-label ceiling?)
    "hnm_rank_finetune_lr_1e-3": {"mining": {"neg_ratio": 0.2}, "mil": {"w_rank": 0.1}, "finetune": {"lr": 1e-3}},
    # hnm_rank fine-tuned with the BCE objective and Adam, views as the tiles lie (no flips/turns, warm start too)
    "hnm_rank_bce_adam_none": {"mining": {"neg_ratio": 0.2}, "mil": {"w_rank": 0.1},
                               "finetune": {"objective": "bce", "optimizer": "adam", "orientations": "none"}},
}
METRICS = ("test_auc", "test_accuracy", "test_f1", "test_instance_auc", "test_instance_auprc")
# The representation a round hands the aggregator (benchmarks/representation.py, real-image cohorts only).
REPRESENTATION = ("probe_auc", "ceiling_slide_auc")
MINED = ("hard_negative_lookalike_share", "positive_precision")
DELTAS = ("test_auc", "test_instance_auc", "probe_auc")


# `--recipe paper` scaled to a 2-core CPU (the variant "paper_cpu"): the official mining, update gate, uncertain
# negatives, two-stream fine-tuning loop, augmentations and MIL losses, with small_cnn instead of the instance-norm
# ResNet-18 (its input: RGB, ImageNet mean/std), 40 MIL epochs instead of 350 (the fixed epoch 199 -> the last) and
# the benchmark's run size (rounds, fine-tuning epochs, warm-up 1 instead of 5).
PAPER_CPU = {"encoder": {"name": "small_cnn", "norm": "affine", "input_space": "rgb_imagenet"},
             "mil": {"epochs": 40, "fixed_epoch": -1}}


def variants(recipe: str | None, paper_cpu: bool = False) -> dict[str, dict]:
    """The variants' nested overrides; with a recipe, also the recipe itself ("NAME recipe", no overrides); with
    `paper_cpu`, the paper's recipe scaled to a CPU (PAPER_CPU)."""
    chosen = {**VARIANTS, f"{Path(recipe).stem} recipe": {}} if recipe else dict(VARIANTS)
    chosen["default"] = {}  # the product's defaults at the run size given (run only when named in --variants)
    return {**chosen, "paper_cpu": merge(load_recipe("paper"), PAPER_CPU)} if paper_cpu else chosen


def run_variant(base: dict, variant: str, overrides: dict, seed: int, root: Path, store: Path, size: dict) -> dict:
    """One full job of a variant and seed at the benchmark's run `size` (which overrides the variant's); returns its
    metrics, per round, and timing."""
    name = f"{variant.replace(' ', '_')}_seed{seed}"
    config = from_tree(TrainConfig, merge(merge(merge(base, overrides), size),
                                          {"run": {"seed": seed, "name": name, "store": str(store)}}))
    final = run_job(config, root / name)
    ft = final["finetune"].get("finetune_round0", {"last": {}})  # none with --rounds 0 (the aggregator alone)
    rounds = [{**{k: r.get(k) for k in METRICS}, "official_test_auc": (r.get("official_protocol") or {}).get("test_auc")}
              for r in final["rounds"]]
    if config.run.manifest:
        rounds = [{**r, **representation(config, root / name, i, final["rounds"][i])} for i, r in enumerate(rounds)]
    return {"w_rank": config.mil.w_rank, "rounds": rounds, "round0": rounds[0],
            # the last round, what the variant's fine-tuning made (not the job's kept round, run.final_round)
            "final": rounds[-1], "kept_round": final["final"]["round"], "kept": {k: final["final"].get(k) for k in METRICS},
            "epoch_seconds": ft["last"].get("epoch_seconds"), "tiles_per_epoch": ft.get("tiles_per_epoch"),
            "finetune_seconds": ft.get("seconds"), "ft_loss": [final["finetune"][k]["last"].get("ft_loss")
                                                             for k in sorted(final["finetune"])],
            "hard_negatives": ft.get("hard_negatives"), "positives_streamed": ft.get("positives_streamed")}


def representation(config: TrainConfig, run_dir: Path, round_: int, result: dict) -> dict:
    """Round `round_`'s features against tile truth: the tile probe and its slide-AUC ceiling; for the rounds that
    mined, the look-alike share of the hard negatives and the precision of the positives."""
    from benchmarks.representation import mined_precision, tile_probe
    from hnm_ray.store.manifest import load_manifest
    from hnm_ray.train import round_store

    records = load_manifest(config.run.manifest, seed=config.run.seed)
    store = round_store(config, run_dir, round_, result.get("encoder_weights"))
    out = tile_probe(store, records, seed=config.run.seed)
    selection, tiles = run_dir / f"selection_round{round_}", Path(config.run.manifest).parent / "tiles.parquet"
    if selection.is_dir() and tiles.is_file():
        out.update(mined_precision(selection, store, tiles))
    return out


def emit(line: dict, out: str = "") -> None:
    """Print `line` + this machine as one JSON line; also write it (indented) to `out` when given."""
    line["machine"] = {"platform": platform.platform(), "cpus": __import__("os").cpu_count(), "gpu": False}
    print(json.dumps(line))
    if out:
        Path(out).write_text(json.dumps(line, indent=1) + "\n")


def stats(values: list) -> dict[str, float]:
    """Mean and sample standard deviation ignoring None/nan, with the count."""
    clean = [v for v in values if v is not None and not np.isnan(v)]
    return {"mean": float(np.mean(clean)) if clean else float("nan"),
            "sd": float(np.std(clean, ddof=1)) if len(clean) > 1 else float("nan"), "n": len(clean)}


def cohort_base(cohort: str, pretrain_epochs: int | None, folder: Path | None = None) -> dict:
    """The config of a cohort: the demo's defaults, or a real-image cohort (generated once, 64 px tiles): the
    digits cohort with its historical warm start (20 SimCLR epochs, batch 128), the Camelyon16-regime cohort with
    the product's default warm start. `folder`: a cohort written by the cohort's generator elsewhere (a sibling, e.g.
    `python -m benchmarks.cohorts.camelyon --out DIR --tumour 9 --lookalikes 4 7`) instead of the cached one."""
    if cohort == "demo":
        return {"pretrain": {"method": "none"}}
    from benchmarks.cohorts import cached_cohort

    folder = folder or cached_cohort(cohort)
    base = {"run": {"manifest": str(folder / "manifest.csv")}, "tiling": {"tile_size": 64},
            "pretrain": {"method": "simclr"}}
    if cohort == "digits":
        base = merge(base, {"pretrain": {"epochs": 20, "tiles": 4096}, "finetune": {"batch_size": 128}})
    return merge(base, {"pretrain": {"epochs": pretrain_epochs}}) if pretrain_epochs else base


def knob_overrides(items: list[str], parser: argparse.ArgumentParser) -> dict:
    """`SECTION.KNOB=VALUE` items as a nested override, checked against the config tree before any run starts."""
    tree: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            parser.error(f"--set {item!r}: expected SECTION.KNOB=VALUE, e.g. pretrain.tiles=8192")
        set_dotted(tree, key, value)
    try:
        from_tree(TrainConfig, tree)
    except ConfigError as error:
        parser.error(f"--set: {error}")
    return tree


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def summarise(runs: dict[str, list[dict]]) -> tuple[dict[str, dict], dict[str, float]]:
    """Mean ± sd over seeds per variant (its last round; the dsmil row: round 0 of the variants without the ranking
    loss) and the fine-tuning time ratio of hard negatives vs all negatives."""
    plain = {r["seed"]: r for results in runs.values() for r in results if r["w_rank"] == 0}
    columns = (*METRICS, "official_test_auc", *REPRESENTATION)
    table = {"dsmil": {k: stats([r["round0"].get(k) for r in plain.values()]) for k in columns}}
    if "hnm_rank" in runs:  # round 0 of the variants with the ranking loss (their MIL differs from round 0 on)
        table["dsmil + rank (round 0)"] = {k: stats([r["round0"].get(k) for r in runs["hnm_rank"]]) for k in columns}
    for variant, results in runs.items():
        table[variant] = {k: stats([r["final"].get(k) for r in results]) for k in columns}
        # what the variant's round-0 mining chose (the tiles its fine-tuning trained on)
        table[variant].update({k: stats([r["round0"].get(k) for r in results]) for k in MINED})
        # the paired change over the variant's own round 0, per seed (round 0 differs with the ranking loss)
        table[variant].update({f"delta_{k}": stats([_minus(r["final"].get(k), r["round0"].get(k)) for r in results])
                               for k in DELTAS})
        table[variant]["ft_seconds_per_epoch"] = stats([r["epoch_seconds"] for r in results])
        table[variant]["ft_tiles_per_epoch"] = stats([r["tiles_per_epoch"] for r in results])
    ratios = {}
    if "hnm" in table and "its2clr" in table:
        ratios = {"time_ratio_hnm_vs_all_negatives": table["hnm"]["ft_seconds_per_epoch"]["mean"]
                  / table["its2clr"]["ft_seconds_per_epoch"]["mean"],
                  "tiles_ratio_hnm_vs_all_negatives": table["hnm"]["ft_tiles_per_epoch"]["mean"]
                  / table["its2clr"]["ft_tiles_per_epoch"]["mean"]}
    return table, ratios


def markdown(table: dict[str, dict[str, dict]]) -> str:
    """The ablation table as markdown: mean ± sd per metric and variant."""
    columns = [*METRICS, "official_test_auc", *REPRESENTATION, *MINED, *(f"delta_{k}" for k in DELTAS),
               "ft_seconds_per_epoch"]
    lines = ["| variant | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for variant, row in table.items():
        cells = [f"{row[c]['mean']:.3f} ± {row[c]['sd']:.3f}" if row.get(c, {}).get("n") else "—" for c in columns]
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
    parser.add_argument("--mil-embed", type=int, default=None,
                        help="mil.embed of every variant's base (default: the product's, auto; the tables measured "
                             "before auto, e.g. results/ablation_camelyon.json, had 0: pass 0 to rerun them)")
    parser.add_argument("--mil-ensemble", type=int, default=None,
                        help="mil.ensemble of every variant (default: the product's)")
    parser.add_argument("--cohort-dir", type=Path, default=None,
                        help="a cohort folder (manifest.csv, tiles.parquet) written by the --cohort's generator with "
                             "other settings, e.g. a sibling with another tumour digit, instead of the cached cohort")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KNOB=VALUE",
                        help="knobs of every variant's base, e.g. pretrain.tiles=8192 (typed and checked by the "
                             "config tree; the variants' own overrides and the run size win over them)")
    parser.add_argument("--out", default="")
    parser.add_argument("--work", default="", help="folder for runs (default: a temp folder)")
    parser.add_argument("--recipe", metavar="NAME", default=None,
                        help="a shipped recipe (hnm_ray.config.load_recipe: NAME or a YAML path) as the base of every "
                             "variant, and the variant \"NAME recipe\" (the recipe alone)")
    parser.add_argument("--variants", nargs="+", default=None, help="run only these variants")
    parser.add_argument("--from-log", metavar="FILE", help="no runs: the table of the per-run JSON lines a (stopped) "
                                                          "ablation printed into FILE")
    parser.add_argument("--paper-cpu", action="store_true", help="add the variant paper_cpu: --recipe paper scaled to a "
                                                                 "CPU (small_cnn, 40 MIL epochs; PAPER_CPU)")
    args = parser.parse_args()
    root = Path(args.work or tempfile.mkdtemp(prefix="hnm_ablation_"))
    size = {"run": {"rounds": args.rounds, "heatmaps": 0, "runs_dir": str(root)}, "mil": {"workers": 0},
            "finetune": {"epochs_per_round": args.epochs_per_round, "warmup_epochs": 1}}
    if args.cohort_dir and not (args.cohort_dir / "manifest.csv").is_file():
        parser.error(f"--cohort-dir {args.cohort_dir} has no manifest.csv: write the cohort there first "
                     "(python -m benchmarks.cohorts.camelyon --out DIR ...)")
    base = merge(cohort_base(args.cohort, args.pretrain_epochs, args.cohort_dir), size)
    if args.mil_embed is not None:
        base = merge(base, {"mil": {"embed": args.mil_embed}})
    if args.mil_ensemble is not None:
        base = merge(base, {"mil": {"ensemble": args.mil_ensemble}})
    base = merge(base, knob_overrides(args.set, parser))
    base = merge(merge(load_recipe(args.recipe), base), size) if args.recipe else base
    chosen = {k: v for k, v in variants(args.recipe, args.paper_cpu).items()
              if (k in args.variants if args.variants else k != "default")}
    started = time.perf_counter()
    if args.from_log:  # the table of the runs a (stopped) ablation printed, one JSON line each
        lines = [json.loads(x) for x in Path(args.from_log).read_text().splitlines() if x.startswith('{"variant"')]
        seeds = sorted({x["seed"] for x in lines})
        runs = {v: [x for s in seeds for x in lines if x["variant"] == v and x["seed"] == s]
                for v in dict.fromkeys(x["variant"] for x in lines)}
    else:
        seeds, runs = args.seeds, {v: [] for v in chosen}
        for seed in args.seeds:
            store = root / f"features_seed{seed}"
            for variant, overrides in chosen.items():
                runs[variant].append({"seed": seed, **run_variant(base, variant, overrides, seed, root, store, size)})
                print(json.dumps({"variant": variant, **runs[variant][-1]}), flush=True)
    table, ratios = summarise(runs)
    line = {"benchmark": "ablation", "cohort": args.cohort, "cohort_dir": str(args.cohort_dir or ""), "seeds": seeds,
            "recipe": args.recipe, "set": args.set,
            "rounds": args.rounds, "epochs_per_round": args.epochs_per_round, "table": table, **ratios,
            "runs": runs, "markdown": markdown(table), "seconds": time.perf_counter() - started}
    emit(line, args.out)
    print(line["markdown"])


if __name__ == "__main__":
    main()
