"""What a round's positive pool holds, against tile truth: the lever the tumour-9 sibling's falling seeds pointed at
(issue 22; benchmarks/README "The positive pool"). One JSON line per finished run and round, then a summary line.

Fine-tuning takes its positives from the positive training slides' tiles that the round's aggregator scores above
`mining.threshold` (0.3), the top r_t of them. For each finished job (an ablation's --work RUN_seed{S} folder), each
round asked:

- the pool at thresholds 0.3 / 0.5 / 0.7 and the top k tiles by score: how many, and the share that are tumour tiles
  (the store's `truth`, from the cohort's masks): does a stricter threshold buy precision?
- each ensemble member's pool at 0.3 (`mil_round{r}_member{i}`): how much the members' calibration differs;
- the precision a user could estimate without tile truth, from negative slides' scores (the expected number of
  normal tiles above the threshold among the positive slides' tiles, from the share of negative-slide tiles above
  it), with the training negatives the aggregator was fit on and with the validation negatives it was not;
- with --cross-fit, the pool when every positive training slide is scored by an aggregator that never saw it
  (5 folds of the training slides, one aggregator each, the run's MIL config, one member): out-of-fold pseudo labels.

    python -m benchmarks.positive_pool --runs /tmp/s10/cam9work/default_seed3 ... --rounds 0 1 --cross-fit \
        --out benchmarks/results/positive_pool_tumour9.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from benchmarks.ablation import emit, stats
from benchmarks.mil_seed_spread import finished_run
from hnm_ray.models.inference import evaluate_bags, load_aggregator, read_bags, tile_probabilities
from hnm_ray.store.features import FeatureStore
from hnm_ray.training.mil import fit_member

THRESHOLDS = (0.3, 0.5, 0.7)
TOP_K = (25, 50, 100, 200)
FOLDS = 5


def pool(scores: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """Tiles scored above `threshold`: how many, and the share of them that are tumour (None when none)."""
    above = scores > threshold
    return {"n": int(above.sum()), "precision": float(truth[above].mean()) if above.any() else None}


def top_k_precision(scores: np.ndarray, truth: np.ndarray, k: int) -> float | None:
    """Share of tumour tiles among the k highest-scoring tiles (None when fewer than k tiles)."""
    if len(scores) < k:
        return None
    return float(truth[np.argsort(-scores, kind="stable")[:k]].mean())


def estimated_precision(negative_scores: np.ndarray, n_positive_tiles: int, threshold: float,
                        n_above: int) -> float | None:
    """Precision of the positive slides' tiles above `threshold` as negative slides' scores estimate it: one minus the
    expected normal tiles above it (the negative tiles' share above it x the positive slides' tile count) over the
    tiles above it; None when no tile is above it."""
    if n_above == 0 or len(negative_scores) == 0:
        return None
    expected_normal = float((negative_scores > threshold).mean()) * n_positive_tiles
    return 1.0 - expected_normal / n_above


def slide_tile_scores(model_path: str | Path, store: FeatureStore, records: list) -> dict[str, np.ndarray]:
    """Every tile's instance probability for the slides of `records`, by slide id."""
    model, _ = load_aggregator(model_path)
    _, logits = evaluate_bags(model, read_bags(store, records))
    return {r.slide_id: tile_probabilities(l) for r, l in zip(records, logits)}


def cross_fit_scores(config, store: FeatureStore, records: list, train: list, work: Path,
                     seed: int) -> dict[str, np.ndarray]:
    """Out-of-fold tile scores of the training slides: fold k's slides scored by one aggregator (the run's MIL
    config, one member, seed `seed + k`) trained with them left out (their split set to `held_out`)."""
    single = replace(config.mil, ensemble=1)
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(np.zeros(len(train)),
                                                                          [r.label for r in train])
    scores: dict[str, np.ndarray] = {}
    for k, (_, held) in enumerate(folds):
        held_ids = {train[i].slide_id for i in held}
        fold_records = [replace(r, split="held_out") if r.slide_id in held_ids else r for r in records]
        fitted = fit_member(single, store, fold_records, work / f"fold{k}", f"fold{k}", None, seed + k)
        scores.update(slide_tile_scores(fitted.model_path, store, [r for r in train if r.slide_id in held_ids]))
    return scores


def analyse_round(run: Path, round_: int, cross_fit: bool, work: Path) -> dict:
    """One run's round: the pools, the members' pools, the estimates and (with `cross_fit`) the out-of-fold pool."""
    config, records, store_of = finished_run(run)
    store, truth_store = store_of(round_), store_of(0)
    train = [r for r in records if r.split == "train" and r.label is not None]
    positive = [r for r in train if r.label == 1]
    truth = np.concatenate([truth_store.read_table(r.slide_id, columns=["truth"])["truth"].to_numpy() > 0
                            for r in positive])

    def on_positive(scores: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([scores[r.slide_id] for r in positive])

    val_negative = [r for r in records if r.split == "val" and r.label == 0]
    job = slide_tile_scores(run / f"mil_round{round_}_aggregator.safetensors", store, train + val_negative)
    scores = on_positive(job)
    row: dict = {"run": run.name, "seed": config.run.seed, "round": round_, "positive_slide_tiles": int(len(truth)),
                 "tumour_tiles": int(truth.sum())}
    for t in THRESHOLDS:
        row[f"pool_{t}"] = pool(scores, truth, t)
    for k in TOP_K:
        row[f"top_{k}_precision"] = top_k_precision(scores, truth, k)
    members = sorted(run.glob(f"mil_round{round_}_member*_aggregator.safetensors"))
    row["member_pools_0.3"] = [pool(on_positive(slide_tile_scores(m, store, positive)), truth, 0.3) for m in members]
    negatives = {"train": np.concatenate([job[r.slide_id] for r in train if r.label == 0]),
                 "val": np.concatenate([job[r.slide_id] for r in val_negative] or [np.zeros(0, np.float32)])}
    n_above = row["pool_0.3"]["n"]
    for name, negative_scores in negatives.items():
        row[f"estimated_precision_0.3_from_{name}_negatives"] = estimated_precision(negative_scores, len(truth), 0.3,
                                                                                    n_above)
    if cross_fit:
        held_out = on_positive(cross_fit_scores(config, store, records, train, work / f"{run.name}_round{round_}",
                                                config.run.seed))
        row["cross_fit_pool_0.3"] = pool(held_out, truth, 0.3)
        row["cross_fit_top_100_precision"] = top_k_precision(held_out, truth, 100)
    print(json.dumps(row), flush=True)
    return row


def summary(rows: list[dict]) -> dict:
    """Mean ± sd over runs of each round's pool precision and size by threshold, and the estimates."""
    out: dict = {}
    for round_ in sorted({r["round"] for r in rows}):
        these = [r for r in rows if r["round"] == round_]
        part = {f"pool_{t}_{key}": stats([r[f"pool_{t}"][key] for r in these if r[f"pool_{t}"][key] is not None])
                for t in THRESHOLDS for key in ("n", "precision")}
        for name in ("train", "val"):
            key = f"estimated_precision_0.3_from_{name}_negatives"
            part[key] = stats([r[key] for r in these if r[key] is not None])
        if all("cross_fit_pool_0.3" in r for r in these):
            part["cross_fit_pool_0.3_precision"] = stats([r["cross_fit_pool_0.3"]["precision"] for r in these])
            part["cross_fit_pool_0.3_n"] = stats([r["cross_fit_pool_0.3"]["n"] for r in these])
        out[f"round{round_}"] = part
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="finished jobs' run folders")
    parser.add_argument("--rounds", nargs="+", type=int, default=[0, 1], help="rounds that mined (not the last)")
    parser.add_argument("--cross-fit", action="store_true", help="also the out-of-fold pool (5 aggregators a run)")
    parser.add_argument("--work", type=Path, help="where the cross-fit aggregators go (default: a temporary folder)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="positive_pool_"))
    rows = [analyse_round(run, r, args.cross_fit, work) for run in args.runs for r in args.rounds]
    emit({"benchmark": "positive_pool", "runs": [str(r) for r in args.runs], "rounds": args.rounds,
          "cross_fit": args.cross_fit, "summary": summary(rows), "per_run": rows}, args.out)


if __name__ == "__main__":
    main()
