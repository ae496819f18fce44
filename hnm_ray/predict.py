"""Score new slides with a trained run: slide probability and label, tile scores, heatmaps, QuPath files, a CSV
summary and report.html.

    python -m hnm_ray.predict --checkpoint runs/NAME --slides manifest.csv|folder/ --out predictions/

Extraction uses the run's encoder (Ray Data, cuCIM) with the run's tiling; the run's aggregator
scores each slide; the label uses the run's validation (Youden) threshold. Works on a folder of
slides without labels; when the manifest has labels, the summary also reports slide AUC (and roc.png).
Outputs in --out: summary.csv, tiles/<slide>.parquet, heatmaps/<slide>.png, qupath/<slide>.geojson (QuPath
detections), metrics.json (labelled slides), report.html (everything on one page).
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np

from hnm_ray import config as cfg
from hnm_ray import storage
from hnm_ray.cli import entry_point
from hnm_ray.cli import parser as cli_parser
from hnm_ray.config import TrainConfig
from hnm_ray.errors import ConfigError
from hnm_ray.extract import extract_features
from hnm_ray.inference import load_aggregator, tile_scores
from hnm_ray.outputs import AGGREGATOR
from hnm_ray.run_folder import CONFIG_FILE
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import load_manifest, records_from_folder

log = logging.getLogger("hnm_ray")


def predict(checkpoint: str | Path, slides: str | Path, out: str | Path, heatmaps: bool = True,
            trust_plugins: bool = False) -> list[dict]:
    """Extract, score and summarise `slides` (manifest or folder) with the run at `checkpoint`. A checkpoint naming a
    plug-in or TorchScript encoder/aggregator (code) is refused unless `trust_plugins` (--trust-plugins)."""
    from hnm_ray.cluster import init_ray
    from hnm_ray.metrics import slide_metrics
    from hnm_ray.models.encoders import config_tag
    from hnm_ray.report import plot_roc
    from hnm_ray.report.html import write_predict_report
    from hnm_ray.report.slides import mined_hard_negatives, write_slide_outputs
    from hnm_ray.train import with_weights

    ckpt = Path(checkpoint)
    ckpt = ckpt / "checkpoint" if (ckpt / "checkpoint" / "meta.json").exists() else ckpt
    if not (ckpt / "meta.json").exists():
        raise ConfigError("checkpoint", f"{checkpoint} holds no checkpoint/meta.json: pass a run folder of hnm_ray.train")
    meta = json.loads((ckpt / "meta.json").read_text())
    saved = cfg.load_yaml(ckpt / CONFIG_FILE)
    if not trust_plugins:
        cfg.refuse_code(TrainConfig, saved, str(ckpt / CONFIG_FILE))
    config = with_weights(cfg.from_tree(TrainConfig, saved),
                          str(ckpt / meta["encoder_weights"]) if meta.get("encoder_weights") else None)
    slides = Path(slides)
    # check_files=False: a missing slide is reported in the summary (its status) while the others are predicted.
    records = records_from_folder(slides) if slides.is_dir() else load_manifest(slides, require_labels=False,
                                                                                check_files=False)
    out = Path(out)
    storage.refuse_links_out(out, "out")
    init_ray()
    # The store folder is named after the run's encoder (weights hash + seed of a random init): predicting into the
    # same --out with another checkpoint extracts anew instead of reusing the other encoder's features.
    store = FeatureStore(out / "features", f"predict-{config_tag(config.encoder)}-seed{meta['seed']}")
    summary = extract_features(records, store, config)
    model, _ = load_aggregator(ckpt / AGGREGATOR, config.mil.aggregator)
    threshold = float(meta["threshold"])
    errors = {e["slide_id"]: e["cause"] for e in store.errors()}
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
    # Slides the run mined hard negatives on (its own cohort) get them marked in heatmaps and QuPath files.
    write_slide_outputs(ckpt / AGGREGATOR, store, records, out / "qupath",
                        {r.slide_id: out / "heatmaps" / f"{r.slide_id}.png" for r in records} if heatmaps else {},
                        mined_hard_negatives(ckpt.parent), plugin=config.mil.aggregator)
    summary_csv = io.StringIO(newline="")
    writer = csv.DictWriter(summary_csv, fieldnames=list(rows[0]) if rows else ["slide_id"])
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(summary_csv.getvalue(), out / "summary.csv")
    scored = [r for r in rows if r["probability"] is not None and r["label"] is not None]
    metrics = None
    if scored:
        metrics = slide_metrics(np.array([r["label"] for r in scored]), np.array([r["probability"] for r in scored]),
                                threshold)
        storage.write_bytes(json.dumps(metrics, indent=2, default=float), out / "metrics.json")
        plot_roc(np.array([r["label"] for r in scored]), np.array([r["probability"] for r in scored]), out / "roc.png",
                 title="ROC of the labelled slides")
    write_predict_report(out, rows, metrics, threshold, ckpt)
    log.info("predicted %d slides (%d failed) -> %s", len(rows), len(summary.slides_failed), out / "summary.csv")
    return rows


@entry_point
def main(argv: list[str] | None = None) -> int:
    """CLI entry point of `python -m hnm_ray.predict`."""
    parser = cli_parser("python -m hnm_ray.predict", __doc__)
    parser.add_argument("--checkpoint", required=True, help="run folder of hnm_ray.train (or its checkpoint/)")
    parser.add_argument("--slides", required=True, help="manifest CSV/Parquet, or a folder of slides")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-heatmaps", action="store_true", help="skip the heatmap PNGs")
    cfg.add_trust_argument(parser)
    args = parser.parse_args(argv)
    predict(args.checkpoint, args.slides, args.out, heatmaps=not args.no_heatmaps, trust_plugins=args._trust_plugins)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
