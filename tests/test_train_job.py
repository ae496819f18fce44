"""The one-command job: `python -m hnm_ray.train` end to end, resume after a kill, and `ray job submit`."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from _support import TINY_JOB, job_env, last_json_line, wait_for

def _env(tmp_path: Path) -> dict[str, str]:
    return job_env(tmp_path / "cache")


def _comparable(metrics: dict) -> list[dict]:
    """Each round's metrics without paths and timings (what must not depend on a kill and resume)."""
    drop = ("model_path", "encoder_weights")
    return [{k: v for k, v in r.items() if k not in drop} for r in metrics["rounds"]]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_cli_end_to_end_writes_metrics_checkpoint_and_pictures(tiny_run):
    done, run = tiny_run.done, tiny_run.run
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    final = metrics["final"]
    for key in ("val_auc", "test_auc", "test_accuracy", "test_f1", "test_instance_auc", "val_threshold"):
        assert key in final
    for key in ("test_accuracy", "test_f1", "val_threshold"):
        assert 0.0 <= final[key] <= 1.0
    ft = metrics["finetune"]["finetune_round0"]
    assert ft["hard_negatives"] > 0 and ft["tiles_per_epoch"] >= ft["hard_negatives"]
    assert ft["miner"]["k"] == ft["hard_negatives"]
    assert metrics["official_protocol"]["test_auc"] >= final["test_auc"] - 1e-9  # best test AUC over epochs
    for name in ("aggregator.safetensors", "aggregator.json", "encoder.safetensors", "config.yaml", "meta.json"):
        assert (run / "checkpoint" / name).stat().st_size > 0
    with Image.open(run / "roc.png") as roc:
        assert roc.size[0] >= 200 and roc.size[1] >= 200
    heatmaps = sorted((run / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 2
    with Image.open(heatmaps[0]) as picture:
        assert min(picture.size) > 32
    summary = json.loads(last_json_line(done.stdout))
    assert summary["run"] == str(run)
    # A quiet console: our progress lines, none of Ray's own (Train's per-report lines, Data's executor lines: those
    # go to ray.log).
    console = done.stdout + done.stderr
    assert "hnm_ray INFO round 1:" in console
    # mil.embed unset (auto): no embedding on the demo's few training slides, the width recorded for --resume
    assert "mil.embed unset (auto): 0, for" in console
    assert yaml.safe_load((run / "config.yaml").read_text())["mil"]["embed"] == 0
    # mil.ensemble's default: every round's model is 5 aggregators averaged, trained at once as Ray tasks in the job
    assert json.loads((run / "checkpoint" / "aggregator.json").read_text())["members"] == 5
    assert "aggregators of mil.ensemble as Ray tasks" in console
    # the done line names the round the run kept, and the checkpoint is that round's
    assert f"final model: round {final['round']}, {final['kept']}" in console
    assert json.loads((run / "checkpoint" / "meta.json").read_text())["round"] == final["round"]
    assert "Reported metrics" not in console and "Reporting training result" not in console
    assert "Starting execution of Dataset" not in console
    assert "Starting execution of Dataset" in (run / "ray.log").read_text()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_run_killed_during_finetuning_resumes_to_the_uninterrupted_runs_metrics(ray_session, tiny_run, demo_cohort,
                                                                                  tmp_path, monkeypatch):
    """kill -9 after the first fine-tuning epoch's checkpoint; --resume (in this process, on the session's Ray) keeps
    round 0 and the finished epoch and ends with exactly the metrics of the uninterrupted run with the same seed (a
    reproducible job)."""
    from hnm_ray.train import main as train_main

    assert tiny_run.done.returncode == 0, tiny_run.done.stderr[-3000:]
    run = tmp_path / "runs" / "killed"
    shutil.copytree(tiny_run.folder / "cache", tmp_path / "cache")  # the same warm start, not pre-trained again
    cmd = [sys.executable, "-m", "hnm_ray.train", "--runs-dir", str(tmp_path / "runs"), "--run.name", "killed",
           "--manifest", str(demo_cohort), *TINY_JOB]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    finetune_checkpoints = run / "ray_train" / "finetune_round0" / "driver_checkpoints"
    while time.time() < deadline and proc.poll() is None and not list(finetune_checkpoints.glob("epoch_*")):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists()
    round0 = run / "metrics_round0.json"
    stamp = round0.stat().st_mtime_ns
    features = sorted((run / "features").rglob("round=0/*.parquet"))
    feature_stamps = [p.stat().st_mtime_ns for p in features]
    assert features

    monkeypatch.setenv("HNM_RAY_CACHE", str(tmp_path / "cache"))
    assert train_main(["--resume", str(run)]) == 0
    assert round0.stat().st_mtime_ns == stamp, "round 0 was trained again instead of resumed"
    assert [p.stat().st_mtime_ns for p in features] == feature_stamps, "round-0 features were re-extracted"
    metrics = json.loads((run / "metrics.json").read_text())
    reference = json.loads((tiny_run.run / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    assert _comparable(metrics) == _comparable(reference)
    resumed_ft = metrics["finetune"]["finetune_round0"]["last"]
    assert resumed_ft["ft_loss"] == reference["finetune"]["finetune_round0"]["last"]["ft_loss"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_with_token_auth_runs_the_job(tmp_path, demo_cohort):
    """A local head on loopback with token auth on; the job is submitted through JobSubmissionClient."""
    env = _env(tmp_path)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    ray_cli = str(Path(sys.executable).with_name("ray"))
    gcs, dashboard = _free_port(), _free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="hnm_ray_", dir="/tmp"))  # short: Ray's socket paths must stay under 107 bytes
    start = subprocess.run([ray_cli, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                            "--include-dashboard=true", f"--temp-dir={temp_dir}",
                            # own agent ports: the suite's local Ray may hold the defaults (e.g. 52365)
                            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                            f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                            f"--ray-client-server-port={_free_port()}"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        entrypoint = [sys.executable, "-m", "hnm_ray.train", "--runs-dir", str(tmp_path / "runs"), "--run.name", "submitted",
                      "--manifest", str(demo_cohort), "--rounds", "0", "--mil.epochs", "4", "--mil.workers", "0", "--heatmaps", "1",
                      "--pretrain.method", "none"]
        runtime_env = json.dumps({"env_vars": {"HNM_RAY_CACHE": env["HNM_RAY_CACHE"]}})
        # The CLI a user types; the token travels in RAY_AUTH_MODE/RAY_AUTH_TOKEN of the submitting shell.
        deadline = time.time() + 300  # the head's dashboard agent takes seconds (minutes on a loaded box) to register
        while True:
            done = subprocess.run([ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                                   "--runtime-env-json", runtime_env, "--", *entrypoint],
                                  env=env, capture_output=True, text=True, timeout=700)
            logs = done.stdout + done.stderr
            if "No available agent" not in logs or time.time() > deadline:
                break
            time.sleep(3)
        assert done.returncode == 0, logs[-3000:]
        assert "succeeded" in logs.lower()
        assert "joined Ray cluster" in logs
        assert (tmp_path / "runs" / "submitted" / "metrics.json").exists()
        without_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN",)}
        without_token["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-token")
        refused = subprocess.run([ray_cli, "job", "list", "--address", f"http://127.0.0.1:{dashboard}"],
                                 env=without_token, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0, "the dashboard answered a client without the token"
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    wait_for(lambda: not _processes_under(str(temp_dir)), 30, "every process of the test's head to exit")


def _stop_cluster(temp_dir: Path) -> None:
    """Kill only the processes of the cluster under `temp_dir` (`ray stop` would kill every Ray on the machine):
    those naming it on their command line, and those with a file open under it. Ray's agents retitle themselves
    (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) and the client server names only the GCS address, but each
    holds its logs under `temp_dir`; missed, they outlived the test spinning on the dead GCS (~0.5 CPU for minutes,
    slowing every later test of the suite)."""
    for pid in _processes_under(str(temp_dir)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _processes_under(folder: str) -> list[int]:
    """PIDs whose command line names `folder` or which hold a file open below it."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if folder.encode() in (proc / "cmdline").read_bytes() or any(
                    os.readlink(fd).startswith(folder) for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_paper_recipe_runs_end_to_end_on_the_demo(ray_session, tmp_path, demo_cohort, monkeypatch):
    """`--recipe paper` through the same code path, sized down: dsmil_its2clr, fixed MIL epoch, StepLR, uniform BCE
    weight, mining over train+val with uncertain negatives and the update gate, the official two-step loop. The job
    runs in this process on the session's Ray (the CLI's own process and Ray start are the tiny run's to test)."""
    from hnm_ray.train import main as train_main

    small = ["--recipe", "paper", "--run.name", "paper", "--manifest", str(demo_cohort), "--rounds", "2",
             "--epochs-per-round", "1", "--warmup-epochs", "1", "--mil.epochs", "12", "--mil.fixed_epoch", "8",
             "--mil.workers", "0", "--finetune.workers", "0", "--finetune.batch_size", "48", "--heatmaps", "0",
             "--encoder.name", "small_cnn", "--encoder.norm", "affine", "--pretrain.method", "none"]
    monkeypatch.setenv("HNM_RAY_CACHE", str(tmp_path / "cache"))
    assert train_main(["--runs-dir", str(tmp_path / "runs"), *small]) == 0
    run = tmp_path / "runs" / "paper"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["mil"]["aggregator"] == "dsmil_its2clr" and saved["finetune"]["loop"] == "official"
    assert saved["mining"]["update_gate"] and saved["encoder"]["input_space"] == "bgr01"
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["best_epoch"] for r in metrics["rounds"]] == [8, 8, 8]  # the fixed MIL epoch, not the best-val one
    assert metrics["official_protocol"]["test_auc"] >= metrics["final"]["test_auc"] - 1e-9
    state = json.loads((run / "state.json").read_text())
    assert state["finetune_round0"]["uncertain_negatives"] == 0  # they join after the first pseudo-label update
    assert state["mining_round1"]["round"] in (0, 1)  # adopted, or kept by the update gate
    if state["mining_round1"]["round"] == 0:  # the gate kept round 0's labels: no update adopted yet
        assert state["finetune_round1"]["uncertain_negatives"] == 0
    assert (run / "mil_round0_aggregator.json").is_file() and "val_best_f1" in json.loads(
        (run / "metrics_round0.json").read_text())  # the F1 the update gate compared
