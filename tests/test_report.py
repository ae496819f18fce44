"""What users open after a run: report.html (also in headless Chromium), readable heatmaps, QuPath GeoJSON, the MLflow
run, and the checkpoint's encoder as safetensors.

The suite's one tiny run (conftest `tiny_run`: demo cohort, one fine-tuning round, MLflow to a temp file store),
trained once in a subprocess; the tests read its folder.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from _support import kept_store, last_json_line

from hnm_ray import config as cfg
from hnm_ray.config import TrainConfig
from hnm_ray.report.html import write_run_report
from hnm_ray.report.qupath import tile_features

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
OUTLINE = (0, 224, 0)
HARD_NEGATIVE = (255, 0, 255)


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    """The suite's finished tiny run (one fine-tuning round, MLflow tracking into <tmp>/mlruns)."""
    assert tiny_run.done.returncode == 0, tiny_run.done.stderr[-3000:]
    assert "MLflow tracking failed" not in tiny_run.done.stderr
    return tiny_run.run


@pytest.fixture(scope="module")
def metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


class Page(HTMLParser):
    """The parts of report.html the tests check: images, links, table cells by table id, <pre> text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.cells: dict[str, list[dict[str, str]]] = {}
        self.pre: list[str] = []
        self._table: str | None = None
        self._in_pre = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "table":
            self._table = attrs.get("id")
            self.cells.setdefault(self._table, [])
        elif tag == "tr" and self._table:
            self.cells[self._table].append({})
        elif tag == "td" and self._table and "data-key" in attrs:
            self.cells[self._table][-1][attrs["data-key"]] = attrs.get("data-value", "")
        elif tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self._in_pre:
            self.pre[-1] += data


def _rows(page: Page, table: str) -> list[dict[str, str]]:
    return [row for row in page.cells[table] if row]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_report_holds_the_runs_numbers_both_protocols_images_config_and_links(run, metrics):
    page = Page((run / "report.html").read_text())
    rounds = _rows(page, "rounds")
    assert [r["round"] for r in rounds] == ["0", "1"]
    for row, expected in zip(rounds, metrics["rounds"]):
        for key in ("val_auc", "val_accuracy", "val_f1", "test_auc", "test_accuracy", "test_f1", "test_instance_auc",
                    "test_instance_auprc"):
            assert float(row[key]) == pytest.approx(expected[key], nan_ok=True), key
    state = json.loads((run / "state.json").read_text())
    assert int(rounds[0]["hard_negatives"]) == state["mining_round0"]["hard_negatives"] > 0
    assert float(rounds[0]["finetune_seconds"]) == pytest.approx(state["finetune_round0"]["seconds"])
    ours, official = _rows(page, "protocols")
    assert float(ours["test_auc"]) == pytest.approx(metrics["final"]["test_auc"], nan_ok=True)
    assert float(official["test_auc"]) == pytest.approx(metrics["official_protocol"]["test_auc"], nan_ok=True)
    text = (run / "report.html").read_text()
    assert "ours: MIL epoch and Youden threshold picked on validation" in text and "official protocol:" in text
    assert len(page.images) == 1 + 2 + _mined_pictures(run)  # ROC, two test slides, negative slides with mined HN
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as picture:
            assert min(picture.size) > 100
    assert page.pre[0] == (run / "config.yaml").read_text()
    for href in page.links:
        assert (run / href).is_file(), href
    assert {"./metrics.json", "./config.yaml", "./checkpoint/encoder.safetensors", "./qupath/demo_000.geojson"} <= \
        set(page.links)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_report_opens_in_headless_chromium_with_every_image_loaded(run, metrics, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it when it "
                    "can); report.html is still checked structurally by the test above")
    probe = tmp_path / "probe.html"
    script = ("<script>window.addEventListener('load',()=>{const p=document.createElement('pre');p.id='image-check';"
              "p.textContent=JSON.stringify([...document.images].map(i=>[i.alt,i.complete,i.naturalWidth]));"
              "document.body.appendChild(p);});</script>")
    probe.write_text((run / "report.html").read_text().replace("</body>", script + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"]
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = Page(dom)
    images = json.loads(found.pre[-1])
    assert len(images) == 3 + _mined_pictures(run) and all(complete and width > 0 for _, complete, width in images)
    cells = {r["round"]: r for r in _rows(found, "rounds")}
    assert float(cells["1"]["test_auc"]) == pytest.approx(metrics["rounds"][1]["test_auc"], nan_ok=True)
    shot = tmp_path / "report.png"  # kept as the test's artifact
    subprocess.run([CHROMIUM, *flags, "--window-size=1280,4000", f"--screenshot={shot}", (run / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    with Image.open(shot) as picture:
        assert picture.size == (1280, 4000) and len(np.unique(np.asarray(picture.convert("L")))) > 10


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_heatmaps_have_outline_on_the_tumour_slide_and_hard_negatives_on_negative_slides(run):
    from hnm_ray.store.manifest import load_manifest

    records = {r.slide_id: r for r in load_manifest(_manifest(run))}
    tested = sorted((run / "heatmaps").glob("*.png"))
    assert sorted(records[p.stem].split for p in tested) == ["test", "test"]
    positive = next(p for p in tested if records[p.stem].label == 1)
    assert _has_colour(positive, OUTLINE)  # tumour outline from the annotation mask
    mined = sorted((run / "heatmaps" / "hard_negatives").glob("*.png"))
    hard = pq.read_table(run / "selection_round0" / "hard_negatives.parquet").to_pydict()
    assert mined and all(records[p.stem].label == 0 and p.stem in hard["slide_id"] for p in mined)
    assert all(_has_colour(p, HARD_NEGATIVE) for p in mined)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_qupath_geojson_is_detections_whose_squares_are_the_tile_grid(run):
    from hnm_ray.config import TilingConfig
    from hnm_ray.slides.grid import tile_grid
    from hnm_ray.slides.reader import open_slide
    from hnm_ray.store.manifest import load_manifest

    hard = pq.read_table(run / "selection_round0" / "hard_negatives.parquet").to_pydict()
    store = kept_store(run)
    for record in load_manifest(_manifest(run)):
        collection = json.loads((run / "qupath" / f"{record.slide_id}.geojson").read_text())
        assert collection["type"] == "FeatureCollection"
        with open_slide(record.path, slide_id=record.slide_id, device="cpu") as reader:
            grid = tile_grid(reader, TilingConfig())
        extent = float(grid.schema.metadata[b"extent_level0"])
        truth = store.read_table(record.slide_id, columns=["tile_id", "truth"]).to_pydict()
        assert len(collection["features"]) == grid.num_rows == len(truth["tile_id"])
        mined = {t for s, t in zip(hard["slide_id"], hard["tile_id"]) if s == record.slide_id}
        for feature, x, y, tile, known in zip(collection["features"], grid["x"].to_pylist(), grid["y"].to_pylist(),
                                              grid["tile_id"].to_pylist(), truth["truth"]):
            props = feature["properties"]
            assert feature["type"] == "Feature" and props["objectType"] == "detection" and props["name"] == f"tile {tile}"
            ring = feature["geometry"]["coordinates"][0]
            assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
            assert ring[0] == [x, y] and ring[2] == [pytest.approx(x + extent), pytest.approx(y + extent)]
            measurements = props["measurements"]
            assert 0.0 <= measurements["tile score"] <= 1.0
            assert measurements["hard negative"] == int(tile in mined)
            assert measurements.get("tile truth", -1) == known
            assert props["classification"]["name"] and len(props["classification"]["color"]) == 3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_qupath_classes_and_heatmaps_use_the_runs_tile_threshold(run):
    """QuPath classed tiles at a fixed 0.5 (a normal slide had as many 'tumour' tiles as a tumour slide): the class
    now starts at the run's tile threshold, which meta.json records and which is the validation Youden threshold of
    the slides' top tile scores under the final aggregator."""
    from hnm_ray.models.inference import tile_threshold
    from hnm_ray.store.manifest import load_manifest

    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    records = load_manifest(_manifest(run))
    store = kept_store(run)
    threshold = meta["tile_threshold"]
    assert threshold == tile_threshold(run / "checkpoint" / "aggregator", store, records)
    assert json.loads((run / "metrics.json").read_text())["tile_threshold"] == threshold
    classes = set()
    for record in records:
        for feature in json.loads((run / "qupath" / f"{record.slide_id}.geojson").read_text())["features"]:
            props = feature["properties"]
            score = props["measurements"]["tile score"]
            if props["measurements"]["hard negative"] or abs(score - threshold) < 1e-5:
                continue  # mined tiles keep their own class; the file rounds scores to 6 decimals
            expected = (f"Tumour (tile score >= {threshold:.3f})" if score >= threshold
                        else f"Non-tumour (tile score < {threshold:.3f})")
            assert props["classification"]["name"] == expected
            classes.add(expected)
    assert len(classes) == 2
    page = (run / "report.html").read_text()
    assert f"tile threshold {threshold:.3f}" in page and f"slide threshold {meta['threshold']:.3f}" in page


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_slide_auc_and_accuracy_carries_n_and_a_95_percent_interval(tiny_run, run, metrics):
    """The demo page said 'slide AUC 0.500' beside '1.000' with no sample size: metrics.json, report.html and the
    console now give n (slides, tumour) and a 95 % interval with every slide AUC and accuracy, and the page says in
    one sentence how the two protocols differ and how the intervals are made."""
    from hnm_ray.models.metrics import INTERVALS, describe
    from hnm_ray.store.manifest import load_manifest

    records = load_manifest(_manifest(run))
    for split, values in (("test", metrics["final"]), ("test", metrics["official_protocol"]),
                          ("val", metrics["final"]), *(("test", r) for r in metrics["rounds"])):
        members = [r for r in records if r.split == split]
        assert values[f"{split}_n"] == len(members) and values[f"{split}_n_positive"] == sum(r.label for r in members)
        for key in ("auc", "accuracy"):
            low, value, high = (values[f"{split}_{key}{s}"] for s in ("_low", "", "_high"))
            assert 0.0 <= low <= value <= high <= 1.0, (split, key, low, value, high)
    assert metrics["protocols"]["intervals"] == INTERVALS
    page = Page((run / "report.html").read_text())
    ours, official = _rows(page, "protocols")
    assert int(ours["test_n"]) == metrics["final"]["test_n"] and int(ours["test_n_positive"]) >= 1
    text = (run / "report.html").read_text()
    final = metrics["final"]
    interval = f"({final['test_auc_low']:.2f}–{final['test_auc_high']:.2f})"
    assert f"{final['test_auc']:.3f} <span class='ci'>{interval}" in text
    assert "the official protocol picks both on the test slides themselves" in text and INTERVALS in text
    assert f"Test split: {final['test_n']} slides ({final['test_n_positive']} tumour)" in text
    assert f"test {describe(final, 'test_')}" in tiny_run.done.stdout + tiny_run.done.stderr  # the console's done line
    printed = json.loads(last_json_line(tiny_run.done.stdout))
    assert printed["test_n"] == final["test_n"] and printed["test_auc_low"] == final["test_auc_low"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mlflow_run_holds_config_rounds_final_metrics_and_artifacts(run, metrics):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=str(run.parents[1] / "mlruns"))
    found = client.search_runs([client.get_experiment_by_name("hnm-ray").experiment_id])
    assert len(found) == 1
    logged = found[0]
    assert logged.info.status == "FINISHED" and logged.info.run_name == "tiny"
    assert logged.data.params["mining.neg_ratio"] == "0.2" and logged.data.params["run.tracking"] == "mlflow"
    assert logged.data.params["mil.epochs"] == "6"
    history = client.get_metric_history(logged.info.run_id, "test_auc")
    assert [m.step for m in history] == [0, 1]
    for point, expected in zip(history, metrics["rounds"]):
        assert point.value == pytest.approx(expected["test_auc"])
    assert logged.data.metrics["final_test_auc"] == pytest.approx(metrics["final"]["test_auc"])
    assert logged.data.metrics["final_official_test_auc"] == pytest.approx(metrics["official_protocol"]["test_auc"])
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"report.html", "roc.png", "config.yaml", "metrics.json", "heatmaps"} <= artifacts
    heatmaps = {a.path for a in client.list_artifacts(logged.info.run_id, "heatmaps")}
    assert len([p for p in heatmaps if p.endswith(".png")]) == 2 and "heatmaps/hard_negatives" in heatmaps


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_checkpoint_encoder_is_safetensors_equal_to_the_fine_tuned_encoder(run):
    from safetensors.torch import load_file

    from hnm_ray.models.encoders import build_encoder

    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    assert meta["encoder_weights"] == "encoder.safetensors"
    shipped = load_file(str(run / "checkpoint" / "encoder.safetensors"))
    trained = load_file(str(run / "finetune_round0_encoder.safetensors"))
    assert shipped.keys() == trained.keys() and all((shipped[k] == trained[k]).all() for k in shipped)
    model = build_encoder("small_cnn", run / "checkpoint" / "encoder.safetensors")
    assert all((v == shipped[k]).all() for k, v in model.state_dict().items())


def test_an_unfinished_run_gets_a_report_in_progress(tmp_path):
    run = tmp_path / "run"
    cfg.save_yaml(cfg.from_tree(TrainConfig, {"run": {"rounds": 3}}), run / "config.yaml")
    (run / "state.json").write_text(json.dumps({"mil_round0": {"round": 0, "best_epoch": 2, "val_auc": 0.75,
                                                               "test_auc": float("nan"), "official_protocol": None}}))
    page = Page(write_run_report(run).read_text())
    assert "in progress: 1 of 4 MIL rounds done" in (run / "report.html").read_text()
    (row,) = _rows(page, "rounds")
    assert float(row["val_auc"]) == 0.75 and row["test_auc"] == "nan" and row["hard_negatives"] == ""
    assert page.images == []


def test_the_jobs_metrics_carry_the_kept_rounds_validation_gain_over_round0(tiny_run, metrics):
    """The suite's job: final.val_auc_over_round0 is None when round 0 is kept, else the paired gain on every
    validation slide, as the console said it."""
    final, rounds = metrics["final"], metrics["rounds"]
    gain = final["val_auc_over_round0"]
    if final["round"] == 0:
        assert gain is None
    else:
        assert gain["n"] == final["val_n"] and gain["low"] <= gain["difference"] <= gain["high"]
        assert gain["difference"] == pytest.approx(final["val_auc"] - rounds[0]["val_auc"], abs=1e-6)
        console = tiny_run.done.stdout + tiny_run.done.stderr
        assert f"round {final['round']} over round 0: {gain['difference']:+.3f}" in console


def test_the_report_says_the_kept_rounds_validation_gain_over_round0_and_whether_it_is_shown(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for shown, low, says in ((True, 0.02, ""), (False, -0.01, ": within what these slides can tell")):
        gain = {"difference": 0.1, "low": low, "high": 0.19, "n": 135, "n_positive": 54, "shown": shown}
        final = {"final": {"round": 2, "kept": "the best validation slide AUC", "val_auc_over_round0": gain},
                 "official_protocol": None, "skipped": {"count": 0}}
        page = write_run_report(run, final).read_text()
        assert (f"Its validation slide AUC over round 0's: +0.100 (95 % CI {low:+.3f} to +0.190, paired, 135 "
                f"validation slides){says}.") in page


def test_qupath_features_are_level0_squares_with_measurements():
    text = tile_features(np.array([0, 1, 2]), np.array([0, 448, 896]), np.array([224, 224, 224]), 448.0,
                         np.array([0.9, 0.1, 0.6]), np.array([False, True, False]), np.array([1, -1, 0]), threshold=0.62)
    collection = json.loads(text)
    first, second, third = collection["features"]
    assert first["geometry"]["coordinates"][0] == [[0, 224], [448, 224], [448, 672], [0, 672], [0, 224]]
    assert first["properties"]["measurements"] == {"tile score": 0.9, "hard negative": 0, "tile truth": 1}
    assert second["properties"]["measurements"] == {"tile score": 0.1, "hard negative": 1}  # truth unknown: left out
    assert second["properties"]["classification"]["name"] == "Hard negative (mined)"
    assert first["properties"]["classification"]["name"] == "Tumour (tile score >= 0.620)"
    assert third["properties"]["classification"]["name"] == "Non-tumour (tile score < 0.620)"  # 0.6: not >= 0.5 here
    json.dumps(collection, allow_nan=False)  # valid JSON: no NaN


def test_qupath_feature_text_parses_with_a_non_finite_score():
    """A tile whose score is NaN (e.g. an empty feature row) still gives a file json.loads reads (NaN, as json.dumps
    writes it), not Python's `nan`."""
    text = tile_features(np.array([0]), np.array([0]), np.array([0]), 448.0, np.array([np.nan]), np.array([False]),
                         threshold=0.5)
    (feature,) = json.loads(text)["features"]
    assert np.isnan(feature["properties"]["measurements"]["tile score"])


def _mined_pictures(run: Path) -> int:
    """Heatmaps of negative training slides with mined hard negatives: as many as there are such slides, at most 2."""
    mined = set(pq.read_table(run / "selection_round0" / "hard_negatives.parquet")["slide_id"].to_pylist())
    pictures = len(list((run / "heatmaps" / "hard_negatives").glob("*.png")))
    assert pictures == min(2, len(mined)) >= 1
    return pictures


def _manifest(run: Path) -> Path:
    return Path(cfg.load_yaml(run / "config.yaml")["run"]["manifest"])


def _has_colour(path: Path, colour: tuple[int, int, int], tolerance: int = 40) -> bool:
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    return bool((np.abs(pixels - np.array(colour)).max(axis=2) < tolerance).sum() > 20)
