"""Ray Tune sweeps: the grid is the product of the swept values; a 2-trial sweep with a fine-tuning round on a tiny
demo store, SIGKILLed after its first trial result and resumed, writes its table and a best config that
round-trips (one sweep for both: each costs a minute on 2 cores)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hnm_ray import config as cfg
from hnm_ray.config import TrainConfig
from hnm_ray.train import parse_args

# MIL runs in each trial's process, fine-tuning as a 1-worker Ray Train group inside the trial: both paths are tested.
BASE = ["--rounds", "1", "--epochs-per-round", "1", "--warmup-epochs", "0", "--mil.epochs", "3", "--mil.workers", "0",
        "--mil.ensemble", "1",
        "--finetune.workers", "1", "--finetune.batch_size", "16", "--heatmaps", "0", "--pretrain.method", "none"]
SPACE = ["--neg-ratios", "0.1", "0.5", "--margins", "2.0", "--rank-ks", "1", "--w-ranks", "0.1"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HNM_RAY_CACHE"] = str(tmp_path / "cache")
    return env


def _sweep(tmp_path: Path, manifest: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hnm_ray.tune", "--manifest", str(manifest), *BASE, *SPACE, "--search", "grid", "--num-samples", "1",
            "--storage-path", str(tmp_path / "tune"), "--sweep-name", "s", "--runs-dir", str(tmp_path / "runs"), *extra]


def test_grid_search_is_every_combination_of_the_swept_values():
    from ray.tune.search.variant_generator import generate_variants

    from hnm_ray.tune import SweepConfig, search_space, trial_config

    sweep = SweepConfig(neg_ratios=[0.1, 0.5], margins=[0.5, 1.0, 2.0], rank_ks=[1], w_ranks=[0.0, 0.1], search="grid")
    variants = [params for _, params in generate_variants(search_space(sweep))]
    combos = {(p["mining.neg_ratio"], p["mil.margin"], p["mil.rank_k"], p["mil.w_rank"]) for p in variants}
    assert len(variants) == len(combos) == 2 * 3 * 1 * 2
    assert combos == {(n, m, 1, w) for n in (0.1, 0.5) for m in (0.5, 1.0, 2.0) for w in (0.0, 0.1)}
    trial = trial_config({"base": cfg.to_tree(TrainConfig()), **variants[-1]})
    assert (trial.mining.neg_ratio, trial.mil.margin, trial.mil.w_rank) == (0.5, 2.0, 0.1)


def test_fine_tuning_knobs_are_swept_only_when_given_values_and_checked_before_any_work():
    from ray.tune.search.variant_generator import generate_variants

    from hnm_ray.core.errors import ConfigError
    from hnm_ray.tune import TuneConfig, check_swept_values, search_space, trial_config

    base = cfg.to_tree(TrainConfig())
    base["finetune"]["epochs_per_round"] = 4
    one = dict(neg_ratios=[0.2], margins=[1.0], rank_ks=[10], w_ranks=[0.1], search="grid")
    # not given: the base's value in every trial (the space holds only the always-swept knobs)
    kept = [p for _, p in generate_variants(search_space(cfg.tree.from_tree(TuneConfig, {"sweep": one}).sweep))]
    assert len(kept) == 1 and "finetune.epochs_per_round" not in kept[0]
    assert trial_config({"base": base, **kept[0]}).finetune.epochs_per_round == 4
    # given: mining ratio x fine-tuning epochs x r_0 x negative classes, each trial its own
    sweep = cfg.tree.from_tree(TuneConfig, {"sweep": {**one, "neg_ratios": [0.05, 1.0], "finetune_epochs": [2, 6],
                                                      "positive_ratios": [0.1], "negative_classes": [1, 8]}}).sweep
    trials = [trial_config({"base": base, **p}) for _, p in generate_variants(search_space(sweep))]
    combos = {(t.mining.neg_ratio, t.finetune.epochs_per_round, t.mining.ro, t.finetune.negative_classes) for t in trials}
    assert len(trials) == len(combos) == 8
    assert combos == {(n, e, 0.1, k) for n in (0.05, 1.0) for e in (2, 6) for k in (1, 8)}
    # a value the train config refuses (r_0 above the base's rT 0.8) is named before the store is extracted
    bad = cfg.tree.from_tree(TuneConfig, {"sweep": {**one, "positive_ratios": [0.1, 0.9]}})
    with pytest.raises(ConfigError, match="mining.rT"):
        check_swept_values(bad)
    # and from the command line
    args = ["--sweep.finetune_epochs", "2", "6", "--sweep.positive_ratios", "0.05"]
    parser = __import__("argparse").ArgumentParser()
    cfg.add_arguments(parser, TuneConfig)
    parsed = cfg.load_config(TuneConfig, parser.parse_args(args))
    assert (parsed.sweep.finetune_epochs, parsed.sweep.positive_ratios, parsed.sweep.negative_classes) == ([2, 6], [0.05], [])


def _interrupt_after_first_result(proc: subprocess.Popen, state: Path) -> None:
    """SIGKILL the sweep's process group once a trial has reported a result (the sweep still running)."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if any(p.stat().st_size > 0 for p in state.glob("*/result.json")):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_interrupted_grid_sweep_with_a_finetuning_round_restores_and_writes_table_and_best_config(
        ray_session, tmp_path, demo_cohort, monkeypatch):
    """One sweep (two trials, each with a fine-tuning round) SIGKILLed after its first trial result, then resumed
    (in this process, on the session's Ray): the restored sweep finishes every trial and writes the table and a best
    config that `train --config` takes."""
    from hnm_ray.tune import main as tune_main

    proc = subprocess.Popen(_sweep(tmp_path, demo_cohort), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    folder = tmp_path / "tune" / "s"
    _interrupt_after_first_result(proc, folder)
    monkeypatch.setenv("HNM_RAY_CACHE", str(tmp_path / "cache"))
    assert tune_main(_sweep(tmp_path, demo_cohort, "--resume")[3:]) == 0  # the arguments after `python -m hnm_ray.tune`
    table = (folder / "results.csv").read_text().strip().splitlines()
    assert len(table) == 1 + 2, table
    header = table[0].split(",")
    assert {"config/mining.neg_ratio", "config/mil.margin", "val_auc"} <= set(header)
    combos = {tuple(row.split(",")[header.index(k)] for k in ("config/mining.neg_ratio", "config/mil.margin"))
              for row in table[1:]}
    assert combos == {("0.1", "2.0"), ("0.5", "2.0")}
    best = yaml.safe_load((folder / "best_config.yaml").read_text())
    assert best["mining"]["neg_ratio"] in (0.1, 0.5) and best["mil"]["margin"] == 2.0
    # The best config is what `python -m hnm_ray.train --config` takes, unchanged.
    config, _ = parse_args(["--config", str(folder / "best_config.yaml"), "--run.name", "from-sweep",
                            "--runs-dir", str(tmp_path / "runs")])
    assert config.mining.neg_ratio == best["mining"]["neg_ratio"] and config.mil.margin == best["mil"]["margin"]
    expected = cfg.merge(best, {"run": {"name": "from-sweep", "runs_dir": str(tmp_path / "runs")}})
    assert config == cfg.from_tree(TrainConfig, expected)
    # Every trial ran a fine-tuning round, and mined as many hard negatives as its neg_ratio asks for.
    mined = {}
    for state in folder.glob("*/run/state.json"):
        data = json.loads(state.read_text())
        config = yaml.safe_load((state.parent / "config.yaml").read_text())
        mined.setdefault(config["mining"]["neg_ratio"], set()).add(data["finetune_round0"]["hard_negatives"])
    assert set(mined) == {0.1, 0.5}, mined
    assert max(mined[0.1]) < min(mined[0.5]), mined
    # Every trial's job ran to its end (ASHA's max_t once stopped each trial at its last round's report, before the
    # job wrote its final metrics and report).
    runs = sorted(folder.glob("*/run"))
    assert len(runs) == 2 and all((run / "metrics.json").is_file() for run in runs), runs
    # Trials shared the round-0 store extracted once before the sweep.
    stores = list((tmp_path / "tune" / "features").rglob("round=0"))
    assert len(stores) == 1 and len(list(stores[0].glob("*.parquet"))) == 8
