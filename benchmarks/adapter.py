"""Adapter scope vs full fine-tuning on one round-0 selection (issue 23, part 3), timed in one process.

From a finished round 0 of a job (its run folder: config.yaml, state.json with mining_round0, selection_round0/),
on the SAME rows (`round_rows`):
- full: what a full round costs after mining: `fit_finetune` of the encoder, then re-extraction of every slide;
- adapter, for each view setting (feature dropout, noise in feature stds): `fit_adapter` + `adapt_store`;
and the tile probe AUC (`benchmarks.representation.tile_probe`) of round 0's features and of each round-1 store. The
job-level numbers (round 0 vs round 1 test slide and instance AUC) come from the run's metrics_round<r>.json when it
went on to round 1.

    python -m benchmarks.adapter --run /tmp/adapter_runs/adapter_s0 --out /tmp/adapter_bench [--skip-full]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.representation import tile_probe
from hnm_ray import config as cfg
from hnm_ray.run.cluster import init_ray
from hnm_ray.config import TrainConfig
from hnm_ray.mining.pseudo_labels import Selection
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import load_manifest
from hnm_ray.train import index_root, initial_head, round_store, with_weights
from hnm_ray.training.adapter import adapt_store, fit_adapter
from hnm_ray.training.finetune import fit_finetune
from hnm_ray.training.finetune_rows import round_rows

VIEWS = {"feature_dropout0.2_noise0.2": (0.2, 0.2), "identical_views": (0.0, 0.0)}


def adapter_round(config: TrainConfig, rows, store0: FeatureStore, weights: str | None, head: str | None,
                  out: Path, name: str, span: dict[str, int]) -> tuple[FeatureStore, dict[str, Any]]:
    """One adapter round on `rows`: fit + the round-1 store; its seconds."""
    started = time.perf_counter()
    fitted = fit_adapter(config, rows, store0, weights, None, head, out, name, **span)
    trained = time.perf_counter() - started
    store1 = FeatureStore(out / "features", name, round=1)
    adapt_store(store0, store1, fitted.adapter_weights)
    return store1, {"fit_seconds": trained, "round_seconds": time.perf_counter() - started,
                    "ft_loss": [h["ft_loss"] for h in fitted.history]}


def full_round(config: TrainConfig, rows, records, weights: str | None, head: str | None, run: Path, out: Path,
               span: dict[str, int]) -> tuple[FeatureStore, dict[str, Any]]:
    """One full round on `rows`: the encoder fine-tuned, then every slide re-extracted; its seconds."""
    from hnm_ray.extract import extract_features

    started = time.perf_counter()
    fitted = fit_finetune(config, rows, weights, out, name="full", head_weights=head, **span)
    trained = time.perf_counter() - started
    store1 = FeatureStore(out / "features", "full", round=1)
    extract_features(records, store1, with_weights(config, fitted.encoder_weights), index_root(config, run))
    return store1, {"fit_seconds": trained, "round_seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a job's run folder with round 0 mined")
    parser.add_argument("--out", required=True, help="scratch folder for the rounds' weights and stores")
    parser.add_argument("--skip-full", action="store_true", help="time only the adapter rounds")
    parser.add_argument("--lr", type=float, help="the adapter rounds' finetune.lr (default: the run's)")
    parser.add_argument("--momentum", type=float, help="the adapter rounds' finetune.momentum (default: the run's)")
    parser.add_argument("--epochs", type=int, help="the adapter rounds' epochs (default: the run's epochs_per_round)")
    args = parser.parse_args()
    init_ray()
    run, out = Path(args.run), Path(args.out)
    config = cfg.from_tree(TrainConfig, cfg.load_yaml(run / "config.yaml"))
    state = json.loads((run / "state.json").read_text())
    records = load_manifest(config.run.manifest, seed=config.run.seed)
    weights = state.get("pretrain") or config.encoder.weights
    store0 = round_store(config, run, 0, weights)
    mined = state["mining_round0"]
    rows = round_rows(config, store0, records, Selection.load(Path(mined["folder"]), mined["stats"]), 0, False)
    epochs = config.finetune.epochs_per_round
    span = {"first_epoch": 0, "last_epoch": epochs, "total_epochs": config.total_finetune_epochs}
    head = initial_head(weights, run)
    line: dict[str, Any] = {"benchmark": "adapter", "run": str(run), "rows": rows.num_rows, "epochs": epochs,
                            "probe_round0": tile_probe(store0, records, seed=config.run.seed)["probe_auc"]}
    adapter_span = {**span, "last_epoch": args.epochs or epochs, "total_epochs": max(span["total_epochs"],
                                                                                   args.epochs or epochs)}
    momentum = config.finetune.momentum if args.momentum is None else args.momentum
    line.update(adapter_lr=args.lr or config.finetune.step_lr(), adapter_momentum=momentum,
                adapter_epochs=adapter_span["last_epoch"])
    for name, (dropout, noise) in VIEWS.items():
        ft = dataclasses.replace(config.finetune, scope="adapter", adapter_dropout=dropout, adapter_noise=noise,
                                 lr=args.lr or config.finetune.step_lr(), momentum=momentum)
        store1, timing = adapter_round(dataclasses.replace(config, finetune=ft), rows, store0, weights, head, out,
                                       name, adapter_span)
        probe = tile_probe(store1, records, seed=config.run.seed)["probe_auc"]
        line[f"adapter_{name}"] = {**timing, "probe_round1": probe}
    if not args.skip_full:
        store1, timing = full_round(config, rows, records, weights, head, run, out, span)
        line["full"] = {**timing, "probe_round1": tile_probe(store1, records, seed=config.run.seed)["probe_auc"]}
        for name in VIEWS:
            line[f"adapter_{name}"]["x_full_round"] = (line[f"adapter_{name}"]["round_seconds"]
                                                       / line["full"]["round_seconds"])
    for round_ in (0, 1):
        path = run / f"metrics_round{round_}.json"
        if path.is_file():
            metrics = json.loads(path.read_text())
            line[f"job_round{round_}"] = {k: metrics.get(k) for k in ("test_auc", "test_instance_auc", "val_auc")}
    print(json.dumps(line, default=float))


if __name__ == "__main__":
    main()
