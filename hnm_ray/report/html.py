"""report.html: one self-contained page per run (and per predict output) that a person opens in a browser.

Images are inlined as base64 PNG, so the page can be mailed or attached alone; files of the folder are linked
relative to it. The run report is rebuilt from the run folder (config.yaml, state.json, metrics.json, roc.png,
heatmaps/, qupath/), so writing it after every round and at the end gives the same page for the same folder.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hnm_ray.models.metrics import INTERVALS
from hnm_ray.run.run_folder import CONFIG_FILE, RunState
from hnm_ray.core.storage import write_bytes
from hnm_ray.store.manifest import name_problem

if TYPE_CHECKING:
    from hnm_ray.report.slides import Thresholds

REPORT = "report.html"
PROTOCOLS = {
    "ours": "ours: MIL epoch and Youden threshold picked on validation (the fixed epoch and 0.5 with fewer "
            "than mil.min_val_bags validation slides of a class), applied to test",
    "official_protocol": "official protocol: best test slide AUC over MIL epochs, Youden threshold on test "
                         "(optimistic; for comparison with the paper only)",
}
PROTOCOLS_IN_ONE_SENTENCE = (
    "Ours picks the MIL epoch and the slide threshold on the validation slides and then scores the test slides once; "
    "the official protocol picks both on the test slides themselves, so its numbers are optimistic and only serve to "
    "compare with the paper.")
TEST_COLUMNS = [("test_n", "test slides"), ("test_n_positive", "tumour"), ("test_auc", "slide AUC (95 % CI)"),
                ("test_accuracy", "accuracy (95 % CI)"), ("test_f1", "F1"),
                ("test_precision", "precision"), ("test_recall", "recall"), ("test_instance_auc", "instance AUC"),
                ("test_instance_auprc", "instance AUPRC")]
ROUND_COLUMNS = [("round", "round"), ("best_epoch", "MIL epoch kept"), ("val_auc", "val AUC (95 % CI)"),
                 ("val_accuracy", "val accuracy (95 % CI)"), ("val_f1", "val F1"), ("test_auc", "test AUC (95 % CI)"),
                 ("test_accuracy", "test accuracy (95 % CI)"), ("test_f1", "test F1"),
                 ("test_instance_auc", "test instance AUC"),
                 ("test_instance_auprc", "test instance AUPRC"), ("official_test_auc", "official-protocol test AUC"),
                 ("hard_negatives", "hard negatives kept"), ("positives", "positives"),
                 ("finetune_seconds", "fine-tune s"), ("finetune_seconds_per_epoch", "fine-tune s/epoch")]
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.8em;max-height:40em}
figure{display:inline-block;margin:.5em;vertical-align:top;max-width:48%}figure img{max-width:100%;border:1px solid #ddd}
.note{color:#555;font-size:.9em}.ci{color:#666;font-size:.9em}
"""


def write_run_report(run_dir: Path, final: dict[str, Any] | None = None) -> Path:
    """Write <run>/report.html from the run folder: status, both protocols, the per-round table, ROC, heatmaps,
    QuPath files, the config and links to every output file. `final`: the finished run's metrics (else read from
    metrics.json when present, else the run is shown in progress)."""
    run_dir = Path(run_dir)
    if final is None and (run_dir / "metrics.json").is_file():
        final = json.loads((run_dir / "metrics.json").read_text())
    config_text = (run_dir / CONFIG_FILE).read_text() if (run_dir / CONFIG_FILE).is_file() else ""
    planned = (yaml.safe_load(config_text) or {}).get("run", {}).get("rounds") if config_text else None
    state = RunState(run_dir).data
    rounds = [state[k] for k in sorted((k for k in state if k.startswith("mil_round")),
                                       key=lambda k: int(k.removeprefix("mil_round")))]
    status = "finished" if final else (f"in progress: {len(rounds)} of {planned + 1 if planned is not None else '?'} "
                                       "MIL rounds done (this page is rewritten after every round)")
    last = final["final"] if final else (rounds[-1] if rounds else {})
    official = final.get("official_protocol") if final else (rounds[-1].get("official_protocol") if rounds else None)
    sections = [
        _section("Run", f"<p><b>{_e(run_dir.name)}</b>: {_e(status)}. Written {_e(time.strftime('%Y-%m-%d %H:%M:%S'))}."
                        f"{_kept(last) if final else ''}</p>" + _skipped((final or {}).get("skipped"), run_dir)),
        _section("Test metrics, both protocols", _protocol_table(last, official)
                 + f"<p class='note'>{_e(PROTOCOLS_IN_ONE_SENTENCE)} {_e(_sample_size(last))} {_e(INTERVALS)}; "
                   f"a difference smaller than the intervals is not a difference these slides can show.{_point(last)}"
                   "</p>"),
        _section("Per round", _table([label for _, label in ROUND_COLUMNS],
                                     [_round_row(r, state) for r in rounds], [k for k, _ in ROUND_COLUMNS], "rounds")
                 + "<p class='note'>Every round is scored on the same validation and test slides (sizes above): read "
                   "a change between rounds against the intervals. Hard negatives kept: the global top "
                   "mining.neg_ratio of negative-slide tiles the miner kept after this round's MIL (what fine-tuning "
                   "used); fine-tune seconds from state.json.</p>"),
        _section("ROC (test split)", _figures(run_dir, [run_dir / "roc.png"])),
        _section("Heatmaps: test slides", _heatmap_note(run_dir)
                 + _figures(run_dir, sorted((run_dir / "heatmaps").glob("*.png")))),
        _section("Heatmaps: negative training slides with the most mined hard negatives",
                 "<p class='note'>Outlined: the tiles the miner kept in the last mining round (what fine-tuning "
                 "used); colours: the final aggregator's tile scores.</p>"
                 + _figures(run_dir, sorted((run_dir / "heatmaps" / "hard_negatives").glob("*.png")))),
        _section("QuPath", _qupath(run_dir)),
        _section("Config", f"<pre>{_e(config_text)}</pre>"),
        # metrics.json is written by the job right after the final report.
        _section("Files", _links(run_dir, ("metrics.json",) if final else ())),
    ]
    return _write(run_dir / REPORT, f"hnm-ray run {run_dir.name}", sections)


def write_predict_report(out: Path, rows: list[dict[str, Any]], metrics: dict[str, Any] | None,
                         thresholds: Thresholds, checkpoint: Path, skipped: dict[str, Any] | None = None) -> Path:
    """Write <out>/report.html of a predict output: per-slide probabilities and labels, slide metrics (labelled
    slides, with n and 95 % intervals), ROC, heatmaps, QuPath files, the run's config and links to every output file."""
    config_path = checkpoint / CONFIG_FILE
    keys = ["slide_id", "label", "probability", "prediction", "n_tiles", "status"]
    summary = (f"<p>{len(rows)} slides scored with the run at {_e(str(checkpoint))}; a slide is predicted tumour (1) "
               f"when its probability is &ge; {thresholds.slide:.3f}, the run's validation (Youden) threshold; tiles "
               f"are coloured and classed tumour from the run's tile threshold {thresholds.tile:.3f}.</p>")
    metric_keys = ["n", "n_positive", "auc", "accuracy", "f1", "precision", "recall"]
    metric_labels = ["slides", "tumour", "AUC (95 % CI)", "accuracy (95 % CI)", "F1", "precision", "recall"]
    sections = [
        _section("Prediction", summary + _skipped(skipped, out)),
        _section("Slide metrics (labelled slides)", _table(metric_labels, [metrics], metric_keys, "metrics")
                 + f"<p class='note'>{_e(INTERVALS)}.</p>" if metrics else "<p>No labelled slides: no metrics.</p>"),
        _section("Slides", _table(keys, rows, keys, "slides")),
        _section("ROC", _figures(out, [out / "roc.png"])),
        _section("Heatmaps", _figures(out, sorted((out / "heatmaps").glob("*.png")))),
        _section("QuPath", _qupath(out)),
        _section("Config of the run", f"<pre>{_e(config_path.read_text()) if config_path.is_file() else ''}</pre>"),
        _section("Files", _links(out)),
    ]
    return _write(out / REPORT, f"hnm-ray predictions {out.name}", sections)


# --- skipped slides (issue 24): a block at the top of both pages, from the job's "skipped" record ---
def _skipped(skipped: dict[str, Any] | None, root: Path) -> str:
    """The top-of-page note of the slides a job left out (id: cause) and its errors.jsonl; empty when none."""
    if not skipped or not skipped.get("count"):
        return ""
    items = "".join(f"<li><b>{_e(s)}</b>: {_e(cause)}</li>" for s, cause in skipped["slides"].items())
    errors = skipped["errors_jsonl"]
    local = "://" not in errors and Path(errors).is_relative_to(root)
    where = _href(root, Path(errors)) if local else _e(errors)
    return (f"<div id='skipped' style='border:2px solid #c00;padding:.5em 1em;margin:.5em 0'><p><b>{skipped['count']} "
            f"slide(s) skipped</b>, left out of every result below; causes in <a href='{where}'>{_e(errors)}</a>:</p>"
            f"<ul>{items}</ul></div>")
# --- end of skipped slides ---


def _round_row(result: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """One row of the per-round table: the round's metrics, its mining and fine-tuning records."""
    r = result["round"]
    mining = state.get(f"mining_round{r}") or {}
    finetune = state.get(f"finetune_round{r}") or {}
    return {**result, "official_test_auc": (result.get("official_protocol") or {}).get("test_auc"),
            "hard_negatives": mining.get("hard_negatives"), "positives": mining.get("positives"),
            "finetune_seconds": finetune.get("seconds"), "finetune_seconds_per_epoch": finetune.get("seconds_per_epoch")}


def _sample_size(metrics: dict[str, Any]) -> str:
    """'Test split: 16 slides (8 tumour); validation: 16 slides (8 tumour).' from a round's metrics."""
    parts = [f"{name}: {metrics[f'{key}_n']} slides ({metrics.get(f'{key}_n_positive', '?')} tumour)"
             for key, name in (("test", "Test split"), ("val", "validation")) if f"{key}_n" in metrics]
    return "; ".join(parts) + "." if parts else ""


def _kept(final: dict[str, Any]) -> str:
    """The sentence naming the round a finished run kept as its final model (checkpoint, heatmaps, QuPath) and why."""
    gain = final.get("val_auc_over_round0")
    over = ("" if not gain else f" Its validation slide AUC over round 0's: {gain['difference']:+.3f} (95 % CI "
            f"{gain['low']:+.3f} to {gain['high']:+.3f}, paired, {gain['n']} validation slides)"
            f"{'' if gain['shown'] else ': within what these slides can tell'}.")
    return (f" <span id='kept'>Final model: round {final.get('round')}, {_e(final.get('kept', 'the last round'))}."
            f"{over}</span>")


def _point(metrics: dict[str, Any]) -> str:
    """A warning when the test AUC interval is a single point (every bootstrap resample ranks the slides alike)."""
    low, high = metrics.get("test_auc_low"), metrics.get("test_auc_high")
    if not isinstance(low, float) or math.isnan(low) or low != high:
        return ""
    return (f" The test AUC interval is the single point {low:.2f}: every resample of these {metrics.get('test_n')} "
            "slides ranks them the same way, which with few slides is weak evidence; read it with n and the accuracy "
            "interval.")


def _heatmap_note(run_dir: Path) -> str:
    """What the heatmaps' colours and titles mean, with the run's two thresholds (from checkpoint/meta.json)."""
    meta_path = run_dir / "checkpoint" / "meta.json"
    if not meta_path.is_file():
        return ""
    meta = json.loads(meta_path.read_text())
    return (f"<p class='note'>Title: the slide's probability against the run's slide threshold "
            f"{meta['threshold']:.3f} (validation Youden), the call it gives and whether it is right (hit / MISSED "
            f"for tumour slides, correct / FALSE ALARM for normal ones). Colours: tiles scoring at or above the run's "
            f"tile threshold {meta['tile_threshold']:.3f} (the validation Youden threshold of each slide's top tile "
            f"score: such a tile alone would call its slide tumour), on one scale from it to the run's highest tile "
            f"score; lower tiles are transparent. The QuPath files class tiles at the same tile threshold.</p>")


def _protocol_table(ours: dict[str, Any], official: dict[str, Any] | None) -> str:
    rows = [{"protocol": PROTOCOLS["ours"], **ours}]
    if official:
        rows.append({"protocol": PROTOCOLS["official_protocol"], **official})
    keys = ["protocol"] + [k for k, _ in TEST_COLUMNS]
    return _table(["protocol"] + [label for _, label in TEST_COLUMNS], rows, keys, "protocols")


def _table(headers: list[str], rows: list[dict[str, Any]], keys: list[str], name: str) -> str:
    """An HTML table; each cell carries data-key (the metric) and data-value (the unrounded number) for tests."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(k, row.get(k), row.get(f"{k}_low"), row.get(f"{k}_high")) for k in keys)
                   + "</tr>" for row in rows)
    return f"<table id='{name}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(key: str, value: Any, low: Any = None, high: Any = None) -> str:
    """A cell: the number to 3 decimals, with its 95 % interval when the row has `<key>_low` / `<key>_high`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"<td data-key='{key}'>{_e('–' if value is None or value == '' else str(value))}</td>"
    text = "–" if math.isnan(value) else f"{value:.3f}" if isinstance(value, float) else str(value)
    if isinstance(low, float) and isinstance(high, float) and not math.isnan(low):
        text += f" <span class='ci'>({low:.2f}–{high:.2f})</span>"
    return f"<td data-key='{key}' data-value='{value!r}'>{text}</td>"


def _figures(root: Path, paths: list[Path]) -> str:
    shown = [p for p in paths if p.is_file()]
    if not shown:
        return "<p class='note'>None yet.</p>"
    return "".join(f"<figure><img alt='{_e(p.stem)}' src='data:image/png;base64,"
                   f"{base64.b64encode(p.read_bytes()).decode()}'><figcaption><a href='{_href(root, p)}'>"
                   f"{_e(str(p.relative_to(root)))}</a></figcaption></figure>" for p in shown)


def _qupath(root: Path) -> str:
    files = sorted((root / "qupath").glob("*.geojson"))
    if not files:
        return "<p class='note'>None yet (written at the end of the run).</p>"
    return ("<p>One GeoJSON per slide: tiles as QuPath detections (level-0 pixels) with measurements <i>tile "
            "score</i>, <i>hard negative</i> and <i>tile truth</i>. In QuPath open the slide, then File &gt; Import "
            "objects (or drag the file onto the viewer); colour the tiles by measurement with Measure &gt; Show "
            "measurement maps.</p><ul>" + "".join(f"<li><a href='{_href(root, f)}'>{_e(f.name)}</a></li>" for f in files)
            + "</ul>")


def _links(root: Path, coming: tuple[str, ...] = ()) -> str:
    """Links to the folder's files and to `coming` ones (not the feature store, Ray Train's folders, the MLflow store
    or the per-slide folders, listed in their own sections)."""
    skip = {"features", "ray_train", "mlruns", "qupath", "tiles"}
    found = {root / name for name in coming}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in skip and not d.startswith("."))
        found.update(Path(folder) / n for n in names if name_problem(n) is None and n != REPORT)  # no odd names
    files = sorted(found)
    return "<ul>" + "".join(f"<li><a href='{_href(root, p)}'>{_e(str(p.relative_to(root)))}</a></li>"
                            for p in files) + "</ul>"


def _href(root: Path, path: Path) -> str:
    """A relative link to a file below `root`: `./` + the percent-encoded path, so no name (`javascript:...`) can
    make it a link with a scheme."""
    return html.escape("./" + urllib.parse.quote(path.relative_to(root).as_posix()), quote=True)


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_e(title)}</h2>{body}</section>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _write(path: Path, title: str, sections: list[str]) -> Path:
    """The page, written atomically (a browser refreshing it during a run never sees half a page)."""
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>{''.join(sections)}</body></html>")
    write_bytes(page, path)
    return path
