"""MLflow tracking (`--run.tracking mlflow`) into a temp file store, read back with the MLflow client: params, rounds
as steps, no duplicates when a resumed run replays its rounds, changed knobs tagged, final metrics and artifacts."""
from __future__ import annotations

import json
import sys

import pytest

from hnm_ray import config as cfg
from hnm_ray.run import tracking
from hnm_ray.config import TrainConfig
from hnm_ray.core.errors import ConfigError

mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny is in the test extra; install hnm-ray[tracking]")


def _config(tmp_path, **job) -> TrainConfig:
    return cfg.from_tree(TrainConfig, {"run": {"tracking": "mlflow", "tracking_uri": str(tmp_path / "mlruns"), **job}})


def _client(tmp_path):
    return tracking._client(str(tmp_path / "mlruns"))


def test_rounds_are_steps_params_are_dotted_keys_and_a_resumed_run_logs_no_round_twice(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    config = _config(tmp_path)
    rounds = [{"round": r, "val_auc": 0.5 + r / 10, "test_auc": 0.6 + r / 10, "model_path": "x",
               "official_protocol": {"test_auc": 0.7 + r / 10}} for r in range(2)]
    for result in rounds:
        tracking.log_round(run_dir, config, result)
    tracking.log_round(run_dir, config, rounds[0])  # replayed from state.json on --resume
    config.mining.neg_ratio = 0.5  # a knob changed on --resume
    (run_dir / "report.html").write_text("<html></html>")
    tracking.log_final(run_dir, config, {"final": {**rounds[1], "test_auc": 0.7}, "official_protocol": {"test_auc": 0.8},
                                         "rounds": rounds})
    client = _client(tmp_path)
    run_id = json.loads((run_dir / tracking.RUN_FILE).read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.params["mining.neg_ratio"] == "0.2" and run.data.params["tiling.tissue.median_kernel"] == "7"
    assert run.data.params["encoder.weights"] == ""
    assert run.data.tags["changed.mining.neg_ratio"] == "0.2 -> 0.5"
    history = client.get_metric_history(run_id, "test_auc")
    assert [(m.step, m.value) for m in history] == [(0, 0.6), (1, 0.7)]
    assert [m.step for m in client.get_metric_history(run_id, "official_test_auc")] == [0, 1]
    assert run.data.metrics["final_test_auc"] == 0.7 and run.data.metrics["final_official_test_auc"] == 0.8
    assert "model_path" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id)} == {"report.html", "metrics.json"}
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"


def test_tune_trials_get_one_run_each_in_the_sweeps_experiment(tmp_path):
    config = _config(tmp_path)
    ids = [tracking.start(tmp_path / "sweep" / f"trial_{i}" / "run", config, experiment="sweep", run_name=f"trial_{i}",
                          tags={"trial_id": str(i)}) for i in range(2)]
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(ids) and len(set(ids)) == 2
    assert sorted(r.data.tags["trial_id"] for r in runs) == ["0", "1"]


def test_no_tracking_logs_nothing_and_the_uri_defaults_to_runs_dir_mlruns(tmp_path):
    config = cfg.from_tree(TrainConfig, {"run": {"runs_dir": str(tmp_path / "runs")}})
    assert tracking.start(tmp_path / "run", config) is None
    tracking.log_round(tmp_path / "run", config, {"round": 0, "test_auc": 0.5})
    assert not (tmp_path / "run").exists()
    assert tracking.resolve_uri(config.run) == str((tmp_path / "runs" / "mlruns").resolve())
    assert tracking.resolve_uri(_config(tmp_path, tracking_uri="http://mlflow:5000").run) == "http://mlflow:5000"


def test_tracking_without_mlflow_installed_stops_before_any_work(tmp_path, monkeypatch):
    from hnm_ray.run.run_folder import resolve_run

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(ConfigError, match="hnm-ray\\[tracking\\]") as info:
        resolve_run(_config(tmp_path), None, None)
    assert info.value.key == "run.tracking"
