"""What a run leaves for users: checkpoint/ (model files + config + meta), metrics.json, ROC, heatmaps, QuPath files,
report.html (rewritten after every round) and, with --run.tracking mlflow, the MLflow run."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from hnm_ray.run import tracking
from hnm_ray.core import storage
from hnm_ray.config import TrainConfig
from hnm_ray.models.metrics import INTERVALS
from hnm_ray.core.registry import one_line
from hnm_ray.run.run_folder import CONFIG_FILE
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord

log = logging.getLogger("hnm_ray")
AGGREGATOR = "aggregator"
ENCODER = "encoder.safetensors"
ADAPTER = "adapter.safetensors"


def kept_round(history: list[dict[str, Any]], rule: str) -> tuple[int, str]:
    """The index in `history` of the round that is the run's final model (`run.final_round`), and why: `last`, or
    `best_val`: the best validation slide AUC (ties to the later round; a NaN AUC loses to any number; all NaN: the
    last round). Test metrics never take part."""
    last = len(history) - 1
    if rule == "last":
        return last, "the last round (run.final_round last)"
    aucs = [float(r.get("val_auc", math.nan)) for r in history]
    scored = [i for i, auc in enumerate(aucs) if not math.isnan(auc)]
    if not scored:
        return last, "the last round: no round has a validation slide AUC (run.final_round best_val)"
    best = max(scored, key=lambda i: (aucs[i], i))
    listed = ", ".join(f"{history[i]['round']}: {auc:.3f}" for i, auc in enumerate(aucs))
    return best, f"the best validation slide AUC, ties to the later round (run.final_round best_val; rounds {listed})"


def gain_over_round0(history: list[dict[str, Any]], stores: list[FeatureStore], index: int,
                     records: list[SlideRecord], plugin: str | None) -> dict[str, float] | None:
    """The kept round's validation slide AUC minus round 0's on the same validation slides, with its 95 % interval
    (paired bootstrap, `paired_auc_difference`), logged: whether the rounds' gain is more than these slides can tell.
    None when round 0 is kept or validation lacks a class."""
    from hnm_ray.models.inference import split_probabilities
    from hnm_ray.models.metrics import paired_auc_difference

    if index == 0:
        return None
    scored = [dict(zip(ids, zip(labels, probs))) for labels, probs, ids in
              (split_probabilities(history[i]["model_path"], stores[i], records, "val", plugin) for i in (0, index))]
    common = [s for s in scored[0] if s in scored[1] and scored[0][s][0] >= 0]
    labels = np.asarray([scored[0][s][0] for s in common])
    if not 0 < labels.sum() < labels.size:
        return None
    gain = paired_auc_difference(labels, [scored[0][s][1] for s in common], [scored[1][s][1] for s in common])
    shown = gain["low"] > 0
    log.info("validation slide AUC, round %d over round 0: %+.3f (95 %% interval %+.3f to %+.3f, paired bootstrap over "
             "%d validation slides, %d positive)%s", history[index]["round"], gain["difference"], gain["low"],
             gain["high"], gain["n"], gain["n_positive"],
             "" if shown else ": within what these slides can tell, the rounds are not shown better than round 0")
    return {**gain, "shown": bool(shown)}


def write_checkpoint(run_dir: Path, last: dict[str, Any], config: TrainConfig, tile_threshold: float,
                     imported: str | None = None) -> Path:
    """checkpoint/: the kept round's (`last`) aggregator (safetensors + JSON), encoder weights (safetensors, our
    key layout whatever file that round's encoder came from) and adapter (finetune.scope adapter: applied to the
    encoder's features before the aggregator), the run's config tree and meta.json (the slide and tile thresholds,
    the round; `imported`: the h5 format round 0's features were imported from, which predict cannot extract). No
    file in it runs code when loaded."""
    from hnm_ray.models.encoders import encoder_from_config
    from hnm_ray.models.weights import save_weights

    checkpoint = run_dir / "checkpoint"
    checkpoint.mkdir(exist_ok=True)
    source = Path(last["model_path"]).with_suffix("")
    for suffix in (".safetensors", ".json"):
        storage.write_bytes(source.with_name(source.name + suffix).read_bytes(), checkpoint / f"{AGGREGATOR}{suffix}")
    if last.get("encoder_weights"):
        save_weights(encoder_from_config(config.encoder, last["encoder_weights"]).state_dict(), checkpoint / ENCODER)
    if last.get("adapter_weights"):
        storage.write_bytes(Path(last["adapter_weights"]).read_bytes(), checkpoint / ADAPTER)
    storage.write_bytes((run_dir / CONFIG_FILE).read_bytes(), checkpoint / CONFIG_FILE)
    storage.write_bytes(json.dumps({
        "encoder_weights": ENCODER if last.get("encoder_weights") else None,
        "adapter_weights": ADAPTER if last.get("adapter_weights") else None,
        "threshold": last.get("val_threshold", 0.5), "tile_threshold": tile_threshold, "seed": config.run.seed,
        "round": last["round"], "imported_features": imported}, indent=2), checkpoint / "meta.json")
    return checkpoint


def finish(run_dir: Path, history: list[dict[str, Any]], records: list[SlideRecord], stores: list[FeatureStore],
           finetune: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """The run's final model is the round `kept_round` picks (`stores[i]`: round i's features, the ones its encoder
    made): its checkpoint folder (with the run's slide and tile thresholds); ROC plot; heatmaps of `run.heatmaps` test
    slides (tumour and normal in turn) and of as many negative training slides with the most mined hard negatives
    (heatmaps/hard_negatives/); QuPath GeoJSON of every slide; report.html; the MLflow run's final metrics and
    artifacts. Returns the metrics summary ("final": the kept round, its "kept" saying why and "val_auc_over_round0"
    its validation gain over round 0 (`gain_over_round0`); both protocols, intervals, the tile threshold)."""
    from hnm_ray.store.features import imported_format
    from hnm_ray.models.inference import split_probabilities, tile_threshold
    from hnm_ray.report import plot_roc
    from hnm_ray.report.html import write_run_report
    from hnm_ray.report.slides import (Thresholds, mined_hard_negatives, most_mined, tumour_and_normal,
                                       write_slide_outputs)

    index, why = kept_round(history, config.run.final_round)
    last, store = history[index], stores[index]
    thresholds = Thresholds(last.get("val_threshold", 0.5), tile_threshold(last["model_path"], store, records,
                                                                          plugin=config.mil.aggregator))
    checkpoint = write_checkpoint(run_dir, last, config, thresholds.tile, imported_format(stores[0]))
    model = checkpoint / AGGREGATOR
    labels, probs, test_ids = split_probabilities(model, store, records, "test", config.mil.aggregator)
    plot_roc(labels, probs, run_dir / "roc.png", title=f"test ROC, round {last['round']}", threshold=thresholds.slide)
    hard_negatives = mined_hard_negatives(run_dir)
    tested = tumour_and_normal(records, test_ids, config.run.heatmaps)
    pictures = {s: run_dir / "heatmaps" / f"{s}.png" for s in tested}
    pictures.update({s: run_dir / "heatmaps" / "hard_negatives" / f"{s}.png"
                     for s in most_mined(records, hard_negatives, config.run.heatmaps)})
    write_slide_outputs(model, store, records, run_dir / "qupath", pictures, thresholds, hard_negatives,
                        plugin=config.mil.aggregator, max_pixels=config.tiling.tissue.max_decoded_pixels)
    ours = {**{k: v for k, v in last.items()
               if k not in ("model_path", "encoder_weights", "adapter_weights", "official_protocol")},
            "kept": why, "val_auc_over_round0": gain_over_round0(history, stores, index, records,
                                                                  config.mil.aggregator)}
    final = {"final": ours, "official_protocol": last.get("official_protocol"), "rounds": history,
             "finetune": finetune, "tile_threshold": thresholds.tile,
             "protocols": {"final": "ours: MIL epoch and Youden threshold picked on validation (the fixed epoch "
                                    "and 0.5 with fewer than mil.min_val_bags validation slides of a class), applied "
                                    "to test",
                           "official_protocol": "the official code's: best test slide AUC over MIL epochs, Youden "
                                                "threshold on test (optimistic; for comparison with the paper only)",
                           "intervals": INTERVALS}}
    final["skipped"] = skipped_slides(records, store)
    write_run_report(run_dir, final)
    _track(tracking.log_final, run_dir, config, final)
    return final


def skipped_slides(records: list[SlideRecord], store: FeatureStore) -> dict[str, Any]:
    """What a job left out: the slides of `records` without features in `store` (the kept round's), each with its
    last recorded cause, and the errors.jsonl that holds the causes (metrics.json "skipped", report.html, console)."""
    done = store.completed()
    causes = {e["slide_id"]: e["cause"] for e in store.errors()}
    skipped = {r.slide_id: causes.get(r.slide_id, "not extracted") for r in records if r.slide_id not in done}
    return {"count": len(skipped), "slides": skipped, "errors_jsonl": str(store.errors_path)}


def log_skipped(skipped: dict[str, Any], total: int) -> None:
    """The console line of what a job skipped (nothing when it skipped nothing)."""
    if skipped["count"]:
        log.warning("skipped %d of %d slides (left out of every result): %s; causes in %s", skipped["count"], total,
                    ", ".join(skipped["slides"]), skipped["errors_jsonl"])


def round_done(run_dir: Path, config: TrainConfig, result: dict[str, Any]) -> None:
    """After each round's MIL: rewrite report.html (a long run can be watched) and log the round to MLflow."""
    from hnm_ray.report.html import write_run_report

    write_run_report(run_dir)
    _track(tracking.log_round, run_dir, config, result)


def _track(log_call, run_dir: Path, config: TrainConfig, metrics: dict[str, Any]) -> None:
    """An MLflow call that cannot stop the training: a failure (server down, disk full) is logged as a warning."""
    try:
        log_call(run_dir, config, metrics)
    except Exception as exc:  # noqa: BLE001 - any tracking failure; the run's own files stay the record
        log.warning("MLflow tracking failed, the run goes on (its folder keeps every result): %s", one_line(exc))
