"""Predict: score new slides with a trained run (slide probability + label, tile scores, heatmaps, metrics).

One tiny run is trained once per module (`python -m hnm_ray.train --rounds 0` in a subprocess, MIL only, in the
driver); predictions then go through `hnm_ray.predict.main` in the test session's Ray. Predict re-extracts the
slides with the run's encoder (checkpoint/config.yaml and meta.json: encoder, seed, weights), so the run's test split must come out with
the same slide probabilities and AUC as the run reported.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from _support import kept_store

from hnm_ray.predict import main as predict_main
from hnm_ray.models.inference import split_probabilities
from hnm_ray.report.slides import mined_hard_negatives
from hnm_ray.store.manifest import load_manifest

TILE_COLUMNS = ["tile_id", "x", "y", "level", "size", "logit", "score"]
@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    """The suite's finished tiny run (trained on `demo_cohort`, one fine-tuning round)."""
    assert tiny_run.done.returncode == 0, tiny_run.done.stderr[-3000:]
    return tiny_run.run


@pytest.fixture(scope="module")
def meta(run) -> dict:
    return json.loads((run / "checkpoint" / "meta.json").read_text())


def _predict(run: Path, slides: Path, out: Path) -> list[dict]:
    assert predict_main(["--checkpoint", str(run), "--slides", str(slides), "--out", str(out)]) == 0
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_predict_writes_summary_tile_scores_heatmaps_and_metrics(ray_session, run, meta, demo_cohort, tmp_path):
    out = tmp_path / "pred"
    rows = _predict(run, demo_cohort, out)
    records = load_manifest(demo_cohort)
    assert [r["slide_id"] for r in rows] == [r.slide_id for r in records]
    threshold = float(meta["threshold"])
    for row, record in zip(rows, records):
        assert row["status"] == "ok" and int(row["label"]) == record.label
        probability = float(row["probability"])
        assert 0.0 <= probability <= 1.0
        assert int(row["prediction"]) == int(probability >= threshold)  # labelled at the run's val threshold
        tiles = pq.read_table(out / "tiles" / f"{record.slide_id}.parquet")
        assert tiles.column_names == TILE_COLUMNS and tiles.num_rows == int(row["n_tiles"]) > 0
        logit, score = tiles["logit"].to_numpy(), tiles["score"].to_numpy()
        np.testing.assert_allclose(score, 1 / (1 + np.exp(-logit)), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(tiles["tile_id"].to_numpy(), np.arange(tiles.num_rows))
        with Image.open(out / "heatmaps" / f"{record.slide_id}.png") as picture:
            assert picture.mode in ("RGB", "RGBA") and min(picture.size) > 32
        qupath = json.loads((out / "qupath" / f"{record.slide_id}.geojson").read_text())
        assert len(qupath["features"]) == tiles.num_rows
        assert [f["properties"]["measurements"]["tile score"] for f in qupath["features"]] == pytest.approx(score,
                                                                                                           abs=1e-6)
    page = (out / "report.html").read_text()
    assert all(record.slide_id in page for record in records) and (out / "roc.png").is_file()
    assert page.count("data:image/png;base64,") == len(records) + 1  # every heatmap and the ROC, inlined
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == len(records) and metrics["threshold"] == pytest.approx(threshold)
    assert metrics["n_positive"] == sum(r.label for r in records)
    for key in ("auc", "accuracy", "f1"):
        assert 0.0 <= metrics[key] <= 1.0
    for key in ("auc", "accuracy"):
        assert metrics[f"{key}_low"] <= metrics[key] <= metrics[f"{key}_high"]
    tile = meta["tile_threshold"]  # the run's tile threshold, not a fixed 0.5
    for record in records:
        for feature in json.loads((out / "qupath" / f"{record.slide_id}.geojson").read_text())["features"]:
            props = feature["properties"]
            if not props["measurements"]["hard negative"] and abs(props["measurements"]["tile score"] - tile) > 1e-5:
                above = props["measurements"]["tile score"] >= tile
                assert props["classification"]["name"] == (f"Tumour (tile score >= {tile:.3f})" if above
                                                            else f"Non-tumour (tile score < {tile:.3f})")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_test_split_reproduces_the_run_and_a_missing_slide_is_reported(ray_session, run, meta, demo_cohort,
                                                                       tmp_path, caplog):
    records = load_manifest(demo_cohort)
    test = [r for r in records if r.split == "test"]
    assert {r.label for r in test} == {0, 1}
    rows = [{"slide_id": r.slide_id, "path": r.path, "label": r.label, "split": r.split} for r in test]
    rows.insert(1, {"slide_id": "gone", "path": str(tmp_path / "gone.svs"), "label": 1, "split": "test"})
    out = tmp_path / "pred"
    logger = logging.getLogger("hnm_ray")
    logger.addHandler(caplog.handler)  # hnm_ray's logger does not propagate to the root logger caplog watches
    try:
        summary = {r["slide_id"]: r for r in _predict(run, _write_manifest(tmp_path / "test.csv", rows), out)}
    finally:
        logger.removeHandler(caplog.handler)

    assert summary["gone"]["status"].startswith("slide 'gone': file not found")
    # The end says what was skipped: on the console, in metrics.json and at the top of report.html.
    assert f"skipped 1 of {len(rows)} slides (left out of every result): gone; causes in" in caplog.text
    skipped = json.loads((out / "metrics.json").read_text())["skipped"]
    assert skipped["count"] == 1 and skipped["slides"]["gone"].startswith("slide 'gone': file not found")
    page = (out / "report.html").read_text()
    assert page.index("id='skipped'") < page.index("Slide metrics") and "errors.jsonl" in page
    # A quiet console as for train: Ray Data's executor lines go to <out>/ray.log.
    assert "Starting execution of Dataset" in (out / "ray.log").read_text()
    assert summary["gone"]["probability"] == "" and summary["gone"]["n_tiles"] == "0"
    assert {s for s, r in summary.items() if r["status"] == "ok"} == {r.slide_id for r in test}  # the others scored
    final = json.loads((run / "metrics.json").read_text())["final"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == len(test)
    assert metrics["auc"] == pytest.approx(final["test_auc"], abs=0.005)
    # Same encoder, same seed, same tiles: the run's own test probabilities, slide by slide.
    store = kept_store(run)  # the features of the round the run kept
    labels, probs, ids = split_probabilities(run / "checkpoint" / "aggregator", store, records, "test")
    assert sorted(ids) == sorted(r.slide_id for r in test)
    for slide_id, prob in zip(ids, probs):
        assert float(summary[slide_id]["probability"]) == pytest.approx(prob, abs=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_folder_of_unlabeled_slides_gets_probabilities_and_no_metrics(ray_session, run, meta, demo_cohort,
                                                                         tmp_path):
    records = load_manifest(demo_cohort)
    folder = tmp_path / "new_slides"
    folder.mkdir()
    chosen = [next(r for r in records if r.label == y) for y in (0, 1)]
    for record in chosen:
        (folder / f"case {record.slide_id}.svs").symlink_to(record.path)  # spaces become '_' in slide ids
    (folder / "notes.txt").write_text("not a slide")
    # Another slide under the id of a training slide the run mined hard negatives on (ids repeat across cohorts):
    # it must not borrow the run's marks.
    mined = mined_hard_negatives(run)["slide_id"].to_pylist()[0]
    shutil.copy(chosen[0].path, folder / f"{mined}.svs")
    out = tmp_path / "pred"
    rows = _predict(run, folder, out)
    borrowed = json.loads((out / "qupath" / f"{mined}.geojson").read_text())["features"]
    assert borrowed and not any(f["properties"]["measurements"]["hard negative"] for f in borrowed)
    rows = [r for r in rows if r["slide_id"] != mined]
    assert [r["slide_id"] for r in rows] == [f"case_{r.slide_id}" for r in chosen]
    for row in rows:
        assert row["status"] == "ok" and row["label"] == ""
        assert 0.0 <= float(row["probability"]) <= 1.0
        assert int(row["prediction"]) == int(float(row["probability"]) >= float(meta["threshold"]))
        assert (out / "tiles" / f"{row['slide_id']}.parquet").is_file()
        assert (out / "heatmaps" / f"{row['slide_id']}.png").is_file()
    assert not (out / "metrics.json").exists()


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, demo_cohort):
    args = ["--checkpoint", str(tmp_path), "--slides", str(demo_cohort), "--out", str(tmp_path / "o")]
    assert predict_main(args) == 2  # ConfigError('checkpoint', ...) logged, no traceback
    assert not (tmp_path / "o").exists()
