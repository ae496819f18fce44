"""Config machinery: flags < YAML < defaults, validation errors that name the key."""
from __future__ import annotations

import pytest
import yaml

from hnm_ray import config as cfg
from hnm_ray.errors import ConfigError
from hnm_ray.train import TrainConfig, build_config, parse_args


def test_defaults_build_and_flatten_round_trip(tmp_path):
    config = build_config({})
    assert isinstance(config, TrainConfig)
    assert config.job.neg_ratio == 0.2 and config.mil.margin == 1.0 and config.mil.rank_k == 10
    assert config.mil.w_bag == config.mil.w_ins == 0.5 and config.ft.temperature == 0.07
    path = cfg.save_yaml_mapping(config.to_flat(), tmp_path / "c.yaml")
    assert build_config(cfg.load_yaml(path)) == config


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"neg_ratio": 0.05, "margin": 2.0, "rounds": 3}))
    config, run_dir = parse_args(["--config", str(path), "--margin", "0.5", "--name", "x", "--runs-dir", str(tmp_path)])
    assert config.job.neg_ratio == 0.05 and config.job.rounds == 3
    assert config.mil.margin == 0.5
    assert run_dir == (tmp_path / "x").resolve()


@pytest.mark.parametrize("values, key", [
    ({"neg_ratio": 0.0}, "neg_ratio"),
    ({"neg_ratio": 1.5}, "neg_ratio"),
    ({"margin": -1.0}, "margin"),
    ({"rank_k": 0}, "rank_k"),
    ({"ranking": "sideways"}, "ranking"),
    ({"mil_epochs": "many"}, "mil_epochs"),
    ({"no_such_knob": 1}, "no_such_knob"),
    ({"warmup_epochs": 9, "rounds": 1, "epochs_per_round": 2}, "warmup_epochs"),
])
def test_bad_values_raise_config_error_naming_the_key(values, key):
    with pytest.raises(ConfigError) as info:
        build_config(values)
    assert info.value.key == key
    assert key in str(info.value)


def test_neg_ratio_one_is_allowed():
    assert build_config({"neg_ratio": 1.0}).job.neg_ratio == 1.0


def test_unknown_yaml_key_and_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("neg_ratio: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfg.load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        cfg.load_yaml(tmp_path / "missing.yaml")


def test_resume_needs_a_run_folder(tmp_path):
    with pytest.raises(ConfigError, match="config.yaml"):
        parse_args(["--resume", str(tmp_path)])


def test_resume_reloads_saved_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg.save_yaml_mapping({**build_config({"neg_ratio": 0.1}).to_flat(), "name": "run"}, run / "config.yaml")
    config, run_dir = parse_args(["--resume", str(run), "--margin", "3"])
    assert run_dir == run.resolve()
    assert config.job.neg_ratio == 0.1 and config.mil.margin == 3.0


def test_help_lists_every_knob(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--neg-ratio", "--margin", "--rank-k", "--w-rank", "--ro", "--rT", "--threshold", "--rounds",
                 "--epochs-per-round", "--encoder", "--ft-workers", "--mil-workers", "--ft-use-gpu", "--resume"):
        assert flag in out
