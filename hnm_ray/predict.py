"""Score new slides with a trained run: slide probability and label, tile scores, heatmaps, QuPath files, a CSV
summary and report.html.

    python -m hnm_ray.predict --checkpoint runs/NAME --slides manifest.csv|folder/ --out predictions/

Extraction uses the run's encoder (Ray Data, cuCIM) with the run's tiling; a run trained with
`--finetune.scope adapter` applies its adapter (checkpoint/adapter.safetensors) to those features; the run's aggregator
scores each slide; the label uses the run's validation (Youden) threshold. Works on a folder of
slides without labels; when the manifest has labels, the summary also reports slide AUC (and roc.png).
Outputs in --out: summary.csv, tiles/<slide>.parquet, heatmaps/<slide>.png, qupath/<slide>.geojson (QuPath
detections), metrics.json (labelled slides; "skipped": the slides left out), report.html (everything on one page),
slides.json (the file each slide id names), ray.log. Every config flag is taken, over the run's config
(e.g. --extract.batch_size 32).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from hnm_ray import config as cfg
from hnm_ray.core import storage
from hnm_ray.run.cli import entry_point
from hnm_ray.run.cli import parser as cli_parser
from hnm_ray.config import TrainConfig
from hnm_ray.core.errors import ConfigError, HnmError
from hnm_ray.extract import extract_features
from hnm_ray.models.inference import load_aggregator, tile_scores
from hnm_ray.report.outputs import AGGREGATOR
from hnm_ray.run.progress import native_stderr_to, route_ray_logs
from hnm_ray.run.run_folder import CONFIG_FILE, demo_manifest_path, holds_run
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord, load_manifest, records_from_folder

log = logging.getLogger("hnm_ray")
SLIDES_FILE = "slides.json"  # in --out: the file each predicted slide id names


def predict(checkpoint: str | Path, slides: str | Path, out: str | Path, heatmaps: bool = True,
            knobs: dict[str, Any] | None = None, trust_plugins: bool = False) -> list[dict]:
    """Extract, score and summarise `slides` (manifest or folder) with the run at `checkpoint`; `knobs` (a nested
    mapping, e.g. {"extract": {"batch_size": 32}}) override the run's config. A checkpoint naming a plug-in or
    TorchScript encoder/aggregator (code) that `knobs` do not name is refused unless `trust_plugins` (--trust-plugins)."""
    from hnm_ray.run.cluster import init_ray
    from hnm_ray.models.metrics import with_intervals
    from hnm_ray.models.encoders import config_tag
    from hnm_ray.report.outputs import log_skipped, skipped_slides
    from hnm_ray.report import plot_roc
    from hnm_ray.report.html import write_predict_report
    from hnm_ray.report.slides import Thresholds, mined_hard_negatives, on_same_slides, write_slide_outputs
    from hnm_ray.train import with_weights

    ckpt, out = checked_folders(checkpoint, out)
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta.get("imported_features"):
        raise ConfigError("--checkpoint", f"{ckpt} was trained on features imported from {meta['imported_features']} "
                                          "h5 files, and predict extracts features with the run's encoder, which "
                                          "this run never had; import the new slides' features from the same "
                                          "extractor (python -m hnm_ray.import_features) and score them with the "
                                          "checkpoint's adapter and aggregator (hnm_ray.training.adapter.adapt_store, "
                                          "hnm_ray.models.inference.tile_scores)")
    config = _run_config(ckpt, knobs or {}, trust_plugins)
    config = with_weights(config, str(ckpt / meta["encoder_weights"]) if meta.get("encoder_weights") else None)
    slides = Path(slides)
    # check_files=False: a missing slide is reported in the summary (its status) while the others are predicted.
    records = records_from_folder(slides) if slides.is_dir() else load_manifest(slides, require_labels=False,
                                                                                check_files=False)
    claim_slide_ids(out, records)
    route_ray_logs(out / "ray.log", config.run.verbose)  # before ray.init: its auth-token notice goes there too
    init_ray()
    # The store folder is named after the run's encoder (weights hash + seed of a random init): predicting into the
    # same --out with another checkpoint extracts anew instead of reusing the other encoder's features.
    store = FeatureStore(out / "features", f"predict-{config_tag(config.encoder)}-seed{meta['seed']}")
    extract_features(records, store, config)
    extracted, store = store, adapted_store(store, ckpt, meta)
    model, _ = load_aggregator(ckpt / AGGREGATOR, config.mil.aggregator, eval_chunk=config.mil.eval_chunk_tiles)
    threshold = float(meta["threshold"])
    # Checkpoints written before the tile threshold existed classed tiles at a fixed 0.5.
    thresholds = Thresholds(threshold, float(meta.get("tile_threshold", 0.5)))
    errors = {e["slide_id"]: e["cause"] for e in extracted.errors()}
    rows = []
    for record in records:
        row = {"slide_id": record.slide_id, "label": record.label, "probability": None, "prediction": None,
               "n_tiles": 0, "status": "ok"}
        if record.slide_id in store.completed():
            table, prob = tile_scores(model, store, record.slide_id)
            storage.write_table(table, out / "tiles" / f"{record.slide_id}.parquet")
            row.update(probability=prob, prediction=int(prob >= threshold), n_tiles=table.num_rows)
        else:
            row["status"] = errors.get(record.slide_id, "not extracted")
        rows.append(row)
    # The run's hard negatives are marked only on the very slides it mined them on (the same file), never by slide id.
    write_slide_outputs(ckpt / AGGREGATOR, store, records, out / "qupath",
                        {r.slide_id: out / "heatmaps" / f"{r.slide_id}.png" for r in records} if heatmaps else {},
                        thresholds,
                        on_same_slides(mined_hard_negatives(ckpt.parent), records, _training_records(config)),
                        plugin=config.mil.aggregator, max_pixels=config.tiling.tissue.max_decoded_pixels)
    summary_csv = io.StringIO(newline="")
    writer = csv.DictWriter(summary_csv, fieldnames=list(rows[0]) if rows else ["slide_id"])
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(summary_csv.getvalue(), _ensure(out) / "summary.csv")
    skipped = skipped_slides(records, extracted)
    scored = [r for r in rows if r["probability"] is not None and r["label"] is not None]
    metrics = None
    if scored:
        labels, probs = np.array([r["label"] for r in scored]), np.array([r["probability"] for r in scored])
        metrics = with_intervals(labels, probs, threshold)
        storage.write_bytes(json.dumps({**metrics, "skipped": skipped}, indent=2, default=float), out / "metrics.json")
        plot_roc(labels, probs, out / "roc.png", title="ROC of the labelled slides", threshold=threshold)
    write_predict_report(out, rows, metrics, thresholds, ckpt, skipped)
    log_skipped(skipped, len(rows))
    log.info("predicted %d slides -> %s", len(rows) - skipped["count"], out / "summary.csv")
    return rows


def adapted_store(store: FeatureStore, ckpt: Path, meta: dict[str, Any]) -> FeatureStore:
    """The features the run's aggregator reads: the run's adapter (finetune.scope adapter) applied to the encoder's
    `store`, in a folder named after the adapter file's digest; `store` itself for a run without one."""
    from hnm_ray.models.weights import file_digest
    from hnm_ray.training.adapter import adapt_store

    if not meta.get("adapter_weights"):
        return store
    adapter = ckpt / meta["adapter_weights"]
    target = FeatureStore(store.root, f"{store.encoder_tag}-adapter-{file_digest(adapter)}")
    adapt_store(store, target, adapter)
    return target


def checked_folders(checkpoint: str | Path, out: str | Path) -> tuple[Path, Path]:
    """The run's checkpoint folder and the output folder, refused before any work: a --checkpoint that is no run, an
    --out that holds a training run (its report.html, heatmaps and qupath files would be overwritten)."""
    ckpt = Path(checkpoint)
    ckpt = ckpt / "checkpoint" if (ckpt / "checkpoint" / "meta.json").exists() else ckpt
    if not (ckpt / "meta.json").exists():
        raise ConfigError("--checkpoint", f"{checkpoint} holds no checkpoint/meta.json: pass a run folder of "
                                          "hnm_ray.train")
    out = Path(out)
    storage.refuse_links_out(out, "out")
    if holds_run(out):
        raise ConfigError("--out", f"{out} holds a training run ({CONFIG_FILE}): predictions would overwrite its "
                                   "report.html, heatmaps and qupath files; pass another --out")
    return ckpt, out


def claim_slide_ids(out: Path, records: list[SlideRecord]) -> None:
    """Record in <out>/slides.json which file each slide id names; refuse slides whose id named another file in an
    earlier prediction into the same --out (its stored tile index, tile truth and features are keyed by slide id and
    would be reused for the new file)."""
    path = out / SLIDES_FILE
    known = json.loads(path.read_text()) if path.is_file() else {}
    now = {r.slide_id: os.path.realpath(r.path) for r in records}
    clashes = [f"{s}: {known[s]} before, {p} now" for s, p in now.items() if known.get(s, p) != p]
    if clashes:
        raise ConfigError("--out", f"{out} holds predictions of other files under the same slide ids "
                                   f"({'; '.join(clashes[:5])}{'; ...' if len(clashes) > 5 else ''}): their features "
                                   "and tile truth would be reused; pass another --out")
    storage.write_bytes(json.dumps({**known, **now}, indent=1), _ensure(out) / SLIDES_FILE)


def _run_config(ckpt: Path, knobs: dict[str, Any], trust_plugins: bool = False) -> TrainConfig:
    """The run's saved config with `knobs` (the command line's) on top; the knobs that differ from the run's are
    logged. Code (a plug-in or TorchScript file) the saved config names and `knobs` do not is refused unless
    `trust_plugins`: the checkpoint folder is a file someone may have shared."""
    saved = cfg.load_yaml(ckpt / CONFIG_FILE)
    if not trust_plugins:
        cfg.refuse_code(TrainConfig, saved, str(ckpt / CONFIG_FILE), knobs)
    config = cfg.from_tree(TrainConfig, cfg.merge(saved, knobs))
    changed = cfg.changed_knobs(cfg.to_tree(cfg.from_tree(TrainConfig, saved)), cfg.to_tree(config))
    if changed:
        log.info("predict: knobs that differ from the run's config: %s",
                 ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return config


def _training_records(config: TrainConfig) -> list[SlideRecord]:
    """The run's training cohort as its manifest lists it now (none when the manifest is gone or unreadable)."""
    manifest = Path(config.run.manifest) if config.run.manifest else demo_manifest_path(config.run)
    try:
        return load_manifest(manifest, require_labels=False, check_files=False, seed=config.run.seed)
    except HnmError:
        return []


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@entry_point
def main(argv: list[str] | None = None) -> int:
    """CLI entry point of `python -m hnm_ray.predict`."""
    parser = cli_parser("python -m hnm_ray.predict", __doc__)
    parser.add_argument("--checkpoint", required=True, help="run folder of hnm_ray.train (or its checkpoint/)")
    parser.add_argument("--slides", required=True, help="manifest CSV/Parquet, or a folder of slides")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-heatmaps", action="store_true", help="skip the heatmap PNGs")
    cfg.add_arguments(parser, TrainConfig)
    cfg.add_trust_argument(parser)
    args = parser.parse_args(argv)
    _, out = checked_folders(args.checkpoint, args.out)  # before --out/ray.log is made
    with native_stderr_to(out / "ray.log"):
        predict(args.checkpoint, args.slides, args.out, heatmaps=not args.no_heatmaps,
                knobs=cfg.given_knobs(TrainConfig, args), trust_plugins=args._trust_plugins)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
