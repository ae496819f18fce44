"""Runs that never mix (issue 24): a taken run name is refused unless --resume or --run.overwrite, every input check
comes before Ray and before any folder, predictions never borrow a training run's marks or its folder, and the end
of a job says what it skipped. The refusals are checked with Ray's start replaced by a failure: they must come first.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

import hnm_ray.run.cluster
import hnm_ray.extract
import hnm_ray.train
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord, load_manifest


class RayStarted(Exception):
    """Raised by the stand-in for init_ray: the job got past its input checks."""


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray fails the test (a refusal must come before it) by raising RayStarted."""
    def start(*args, **kwargs):
        raise RayStarted
    monkeypatch.setattr(hnm_ray.run.cluster, "init_ray", start)
    monkeypatch.setattr(hnm_ray.extract, "init_ray", start)


def _subset_manifest(demo_cohort: Path, path: Path, keep: int) -> Path:
    rows = list(csv.DictReader(demo_cohort.open()))[:keep]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["slide_id", "path", "label"])
        writer.writeheader()
        writer.writerows({"slide_id": r["slide_id"], "path": str(demo_cohort.parent / r["path"]), "label": r["label"]}
                         for r in rows)
    return path


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


@pytest.mark.slow
def test_a_taken_run_name_with_another_manifest_is_refused_and_the_run_left_as_it_was(tiny_run, demo_cohort, tmp_path,
                                                                                      no_ray, console):
    """The issue's case: --run.name of a finished run, another manifest and neg_ratio -> one clear error naming
    --resume and --run.overwrite, before Ray; config.yaml and metrics.json byte-identical."""
    assert tiny_run.done.returncode == 0, tiny_run.done.stderr[-3000:]
    before = _snapshot(tiny_run.run)
    good = _subset_manifest(demo_cohort, tmp_path / "good.csv", keep=7)
    code = hnm_ray.train.main(["--runs-dir", str(tiny_run.run.parent), "--run.name", "tiny", "--manifest", str(good),
                               "--neg-ratio", "0.05"])
    assert code == 2
    message = console.text
    assert "already holds a run" in message and "--resume" in message and "--run.overwrite" in message
    assert _snapshot(tiny_run.run) == before


def _fake_run(run: Path, manifest: Path) -> None:
    """A finished run's folder as far as the name check sees it: config.yaml, state.json and metrics.json."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"run": {"manifest": str(manifest), "rounds": 2}}))
    (run / "state.json").write_text('{"extract_round0": "the old run"}')
    (run / "metrics.json").write_text('{"final": {"test_auc": 1.0}}')


def test_overwrite_starts_afresh_only_after_the_input_checks(demo_cohort, tmp_path, no_ray):
    run = tmp_path / "runs" / "x"
    _fake_run(run, demo_cohort)
    common = ["--runs-dir", str(tmp_path / "runs"), "--run.name", "x", "--run.overwrite", "true",
              "--pretrain.method", "none", "--neg-ratio", "0.05"]
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,path,label\na,/no/such.svs,0\n")
    assert hnm_ray.train.main([*common, "--manifest", str(bad)]) == 2  # refused by its checks: the old run stays
    assert (run / "metrics.json").is_file()
    with pytest.raises(RayStarted):
        hnm_ray.train.main([*common, "--manifest", str(demo_cohort)])
    assert not (run / "metrics.json").exists()  # the old run is gone; the new one records its scope at its start
    assert json.loads((run / "state.json").read_text()) == {"finetune_scope": "full"}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["mining"]["neg_ratio"] == 0.05 and saved["run"]["overwrite"] is False  # a resume never deletes it
    assert hnm_ray.train.main(["--resume", str(run), "--run.overwrite", "true"]) == 2


@pytest.mark.parametrize("flags, key", [
    (["--manifest", "MISSING_ROW"], "manifest"),
    (["--encoder.weights", "/no/such/weights.safetensors"], "weights"),
    (["--encoder.name", "no_such_module_hnm:make"], "no_such_module_hnm"),
    (["--mil.aggregator", "no_such_module_hnm:make"], "no_such_module_hnm"),
    (["--encoder.name", "no_such_encoder"], "no_such_encoder"),
])
def test_every_input_check_comes_before_ray_and_before_any_folder(flags, key, demo_cohort, tmp_path, no_ray,
                                                                  console):
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,path,label\na,/no/such.svs,0\nb,/no/such2.svs,1\n")
    flags = [str(bad) if f == "MISSING_ROW" else f for f in flags]
    argv = ["--runs-dir", str(tmp_path / "runs"), "--run.name", "r", "--manifest", str(demo_cohort), *flags]
    assert hnm_ray.train.main(argv) == 2
    assert key in console.text
    assert not (tmp_path / "runs").exists()


def _fake_checkpoint(run: Path) -> Path:
    """A run folder as far as predict's checks see it: checkpoint/meta.json and the config trees."""
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "meta.json").write_text(json.dumps({"threshold": 0.5, "seed": 0}))
    (run / "checkpoint" / "config.yaml").write_text("{}\n")
    (run / "config.yaml").write_text("{}\n")
    return run


def test_extract_and_mil_clis_check_their_inputs_before_ray(demo_cohort, tmp_path, no_ray):
    from hnm_ray.training.mil import main as mil_main

    out = tmp_path / "store"
    assert hnm_ray.extract.main(["--manifest", str(demo_cohort), "--out", str(out), "--encoder.weights",
                                 "/no/such/weights.safetensors"]) == 2
    assert not out.exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,path,label\na,/no/such.svs,0\n")
    assert mil_main(["--store", str(out), "--tag", "t", "--out", str(tmp_path / "mil"), "--manifest", str(bad)]) == 2


def test_predict_refuses_an_out_that_holds_a_training_run(demo_cohort, tmp_path, no_ray):
    from hnm_ray.predict import main as predict_main

    run = _fake_checkpoint(tmp_path / "run")
    (run / "report.html").write_text("the run's report")
    for out in (run, run / "checkpoint"):
        assert predict_main(["--checkpoint", str(run), "--slides", str(demo_cohort), "--out", str(out)]) == 2
    assert (run / "report.html").read_text() == "the run's report"


def test_predict_refuses_an_out_whose_slide_ids_named_other_files(demo_cohort, tmp_path, no_ray):
    """A second prediction into the same --out where slide_000 is another file: its stored index (tile truth) and
    features are keyed by slide id, so it is refused instead of reused."""
    from hnm_ray.predict import main as predict_main

    run, out = _fake_checkpoint(tmp_path / "run"), tmp_path / "out"
    records = load_manifest(demo_cohort)
    first, other = records[0], records[1]
    args = ["--checkpoint", str(run), "--out", str(out), "--slides"]
    folder = tmp_path / "a"
    folder.mkdir()
    os.symlink(first.path, folder / f"{first.slide_id}.svs")
    with pytest.raises(RayStarted):
        predict_main([*args, str(folder)])
    with pytest.raises(RayStarted):  # the same files again: fine (extraction resumes)
        predict_main([*args, str(folder)])
    (folder / f"{first.slide_id}.svs").unlink()
    os.symlink(other.path, folder / f"{first.slide_id}.svs")
    assert predict_main([*args, str(folder)]) == 2


def test_every_cli_that_reads_the_tree_takes_every_config_flag(demo_cohort, tmp_path, no_ray, console):
    from hnm_ray.extract import main as extract_main
    from hnm_ray.predict import main as predict_main

    run = _fake_checkpoint(tmp_path / "run")
    with pytest.raises(RayStarted):  # parsed, applied over the run's config, logged; then Ray would start
        predict_main(["--checkpoint", str(run), "--slides", str(demo_cohort), "--out", str(tmp_path / "o"),
                      "--extract.batch_size", "32"])
    assert "extract.batch_size: 64 -> 32" in console.text
    assert extract_main(["--mil.epochs", "3"]) == 2  # parsed; refused only for the missing --manifest
    assert "run.manifest" in console.text


def test_hard_negatives_are_marked_only_on_the_same_slide_file(tmp_path):
    from hnm_ray.report.slides import on_same_slides

    trained = [SlideRecord("slide_000", str(tmp_path / "a" / "slide_000.svs"), 0, "train"),
               SlideRecord("slide_001", str(tmp_path / "a" / "slide_001.svs"), 0, "train")]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "slide_001.svs").write_bytes(b"x")
    (tmp_path / "link.svs").symlink_to(tmp_path / "a" / "slide_001.svs")
    mined = pa.table({"slide_id": ["slide_000", "slide_000", "slide_001"], "tile_id": [3, 5, 7]})
    # Another cohort's slide_000 (a copy elsewhere, as in the issue) gets none; the same file (here via a link) keeps its.
    predicted = [SlideRecord("slide_000", str(tmp_path / "b" / "slide_000.svs"), None, "predict"),
                 SlideRecord("slide_001", str(tmp_path / "link.svs"), None, "predict")]
    kept = on_same_slides(mined, predicted, trained)
    assert kept.to_pydict() == {"slide_id": ["slide_001"], "tile_id": [7]}
    assert on_same_slides(mined, predicted, []).num_rows == 0  # training manifest gone: nothing is borrowed
    assert on_same_slides(None, predicted, trained) is None


def test_the_end_of_a_job_states_what_it_skipped(tmp_path, console):
    from hnm_ray.report.outputs import log_skipped, skipped_slides
    from hnm_ray.report.html import write_run_report

    store = FeatureStore(tmp_path / "store", "small_cnn")
    store.record_error("corrupt", "index", "slide 'corrupt': truncated or corrupt TIFF")
    records = [SlideRecord("corrupt", "/x/corrupt.svs", 1, "train"), SlideRecord("lost", "/x/lost.svs", 0, "test")]
    skipped = skipped_slides(records, store)
    assert skipped == {"count": 2, "slides": {"corrupt": "slide 'corrupt': truncated or corrupt TIFF",
                                              "lost": "not extracted"},
                       "errors_jsonl": str(store.errors_path)}
    log_skipped(skipped, 10)
    assert "skipped 2 of 10 slides" in console.text and "corrupt, lost" in console.text
    assert str(store.errors_path) in console.text
    run = tmp_path / "run"
    run.mkdir()
    page = write_run_report(run, {"final": {}, "official_protocol": None, "skipped": skipped}).read_text()
    block = page.index("id='skipped'")
    assert block < page.index("Test metrics") and "2 slide(s) skipped" in page and "truncated or corrupt" in page
    console.clear()
    log_skipped({"count": 0, "slides": {}, "errors_jsonl": "e"}, 10)
    assert console.text == ""


@pytest.mark.slow
def test_the_tiny_run_records_what_it_skipped_and_its_console_is_quiet(tiny_run):
    done = tiny_run.done
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tiny_run.run / "metrics.json").read_text())
    assert metrics["skipped"]["count"] == 0 and metrics["skipped"]["errors_jsonl"].endswith("errors.jsonl")
    console = done.stdout + done.stderr
    assert "Token authentication is enabled" not in console and "max_restarts" not in console
    assert "0 failed" not in console
    assert "finetune_round0 (tiles, epochs 0-1)" in console and "ETA" in console.split("finetune_round0 (tiles")[1][:200]
    assert "pretrain_simclr (tiles, epochs 0-0)" in console


def test_ctrl_c_ends_like_sigterm_with_one_line_and_the_resume_hint(tmp_path):
    from hnm_ray.run.cli import entry_point

    # Before Ray: the entry point turns KeyboardInterrupt into one line and 130.
    code = subprocess.run([sys.executable, "-c", (
        "from hnm_ray.run.cli import entry_point\n"
        "def main(argv):\n    raise KeyboardInterrupt\n"
        "raise SystemExit(entry_point(main)([]))")], capture_output=True, text=True, timeout=60)
    assert code.returncode == 130 and "Traceback" not in code.stderr
    assert len(code.stderr.strip().splitlines()) == 1 and "--resume" in code.stderr and "Ctrl-C" in code.stderr
    # After ray.init (whose handlers `stop_cleanly_on_signals` replaces): SIGINT ends the process at once, one line.
    code = subprocess.run([sys.executable, "-c", (
        "import os, signal, time\n"
        "from hnm_ray.run.progress import setup_logging\n"
        "from hnm_ray.run.cluster import stop_cleanly_on_signals\n"
        "setup_logging(); stop_cleanly_on_signals(); os.kill(os.getpid(), signal.SIGINT); time.sleep(30)")],
        capture_output=True, text=True, timeout=60)
    assert code.returncode == 130 and "Traceback" not in code.stderr
    assert len(code.stderr.strip().splitlines()) == 1 and "--resume" in code.stderr
    assert entry_point(lambda argv: 0)([]) == 0
