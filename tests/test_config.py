"""The one config tree: each knob declared once, defaults < recipe < YAML < flags, errors that name the dotted key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from hnm_ray import config as cfg
from hnm_ray.config import TrainConfig
from hnm_ray.core.errors import ConfigError
from hnm_ray.train import parse_args


def test_defaults_build_and_round_trip_through_yaml(tmp_path):
    config = cfg.from_tree(TrainConfig, {})
    assert config == TrainConfig()
    assert config.mining.neg_ratio == 0.2 and config.mil.margin == 1.0 and config.mil.rank_k == 10
    assert config.mil.w_bag == config.mil.w_ins == 0.5 and config.finetune.temperature == 0.07
    path = cfg.save_yaml(config, tmp_path / "c.yaml")
    assert cfg.from_tree(TrainConfig, cfg.load_yaml(path)) == config
    assert set(yaml.safe_load(path.read_text())) == {"run", "tiling", "encoder", "pretrain", "extract", "mil",
                                                     "mining", "finetune"}


def test_every_knob_is_declared_once_with_help():
    keys = [key for key, _, _ in cfg.leaves(TrainConfig)]
    assert len(keys) == len(set(keys))
    for key, field, _ in cfg.leaves(TrainConfig):
        assert field.metadata["help"], key


def test_flags_override_yaml_which_overrides_recipe_and_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"mining": {"neg_ratio": 0.05}, "mil": {"margin": 2.0}, "run": {"rounds": 3}}))
    config, run_dir = parse_args(["--recipe", "paper", "--config", str(path), "--mil.margin", "0.5", "--run.name", "x",
                                  "--runs-dir", str(tmp_path)])
    assert config.mining.neg_ratio == 0.05 and config.run.rounds == 3  # YAML over the recipe
    assert config.mil.margin == 0.5  # flag over YAML
    assert config.mil.aggregator == "dsmil_its2clr" and config.finetune.loop == "official"  # recipe over defaults
    assert run_dir == (tmp_path / "x").resolve()


def test_flag_spellings_dotted_dashed_and_unique_short_names():
    a, _ = parse_args(["--mining.neg_ratio", "0.1", "--mil.rank-k", "3", "--run.name", "n"])
    b, _ = parse_args(["--neg-ratio", "0.1", "--mil.rank_k", "3", "--run.name", "n"])
    assert a == b and a.mining.neg_ratio == 0.1 and a.mil.rank_k == 3
    with pytest.raises(SystemExit):  # `name` is ambiguous (run.name, encoder.name): no short flag
        parse_args(["--name", "n"])


def test_yaml_accepts_dotted_and_dashed_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mining.neg-ratio: 0.3\nmil:\n  rank-k: 4\n")
    config = cfg.from_tree(TrainConfig, cfg.load_yaml(path))
    assert config.mining.neg_ratio == 0.3 and config.mil.rank_k == 4


@pytest.mark.parametrize("values, key", [
    ({"mining": {"neg_ratio": 0.0}}, "mining.neg_ratio"),
    ({"mining": {"neg_ratio": 1.5}}, "mining.neg_ratio"),
    ({"mil": {"margin": -1.0}}, "mil.margin"),
    ({"mil": {"rank_k": 0}}, "mil.rank_k"),
    ({"mil": {"ranking": "sideways"}}, "mil.ranking"),
    ({"mil": {"epochs": "many"}}, "mil.epochs"),
    ({"mil": {"no_such_knob": 1}}, "mil.no_such_knob"),
    ({"no_such_section": {}}, "no_such_section"),
    ({"tiling": {"tissue": {"median_kernel": 4}}}, "tiling.tissue.median_kernel"),
    ({"tiling": {"level": None, "mpp": None}}, "tiling.level"),
    ({"mining": {"ro": 0.5, "rT": 0.4}}, "mining.rT"),
    ({"finetune": {"warmup_epochs": 9, "epochs_per_round": 2}, "run": {"rounds": 1}}, "finetune.warmup_epochs"),
])
def test_bad_values_raise_config_error_naming_the_dotted_key(values, key):
    with pytest.raises(ConfigError) as info:
        cfg.from_tree(TrainConfig, values)
    assert info.value.key == key
    assert key in str(info.value)


def test_neg_ratio_one_is_allowed():
    assert cfg.from_tree(TrainConfig, {"mining": {"neg_ratio": 1.0}}).mining.neg_ratio == 1.0


def test_bad_yaml_file_and_unknown_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mining: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfg.load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        cfg.load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="shipped recipe"):
        cfg.load_recipe("no-such-recipe")


def test_paper_recipe_is_shipped_and_every_key_is_a_knob():
    assert "paper" in cfg.recipe_names()
    recipe = cfg.load_recipe("paper")
    config = cfg.from_tree(TrainConfig, recipe)  # unknown keys would raise
    assert config.mil.lr == 2e-4 and config.mil.epochs == 350 and config.finetune.momentum == 0.0
    assert config.mining.update_gate and config.mining.uncertain_negatives and config.mining.pool == "train_val"


def test_resume_needs_a_run_folder(tmp_path):
    with pytest.raises(ConfigError, match="config.yaml"):
        parse_args(["--resume", str(tmp_path)])


def test_resume_reloads_saved_config_and_applies_new_flags(tmp_path, caplog):
    run = tmp_path / "run"
    saved = cfg.from_tree(TrainConfig, {"mining": {"neg_ratio": 0.1}, "run": {"name": "run"}})
    cfg.save_yaml(saved, run / "config.yaml")
    config, run_dir = parse_args(["--resume", str(run), "--margin", "3"])
    assert run_dir == run.resolve()
    assert config.mining.neg_ratio == 0.1 and config.mil.margin == 3.0
    assert "mil.margin: 1.0 -> 3.0" in caplog.text


def _run_saved_without(tmp_path, section: str, knobs: tuple[str, ...], **values) -> Path:
    """A run folder whose config.yaml lacks `section`'s `knobs` (as one saved before they existed); `values` set other
    knobs of that section."""
    run = tmp_path / "old"
    tree = cfg.to_tree(cfg.from_tree(TrainConfig, {"run": {"name": "old"}, section: values}))
    for knob in knobs:
        del tree[section][knob]
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    return run


def test_a_run_saved_before_the_fine_tuning_knobs_resumes_with_the_fine_tuning_it_started_with(tmp_path, caplog):
    """A config.yaml written before finetune.optimizer/objective/orientations (its lr 0.01 is SGD's) resumes with
    SGD, SupCon and dihedral views, not the new defaults (Adam at 0.01 wrecked the features: benchmarks/README)."""
    config, _ = parse_args(["--resume", str(_run_saved_without(tmp_path, "finetune", ("optimizer", "objective",
                                                                                    "orientations"), lr=0.01))])
    ft = config.finetune
    assert (ft.optimizer, ft.objective, ft.orientations, ft.lr) == ("sgd", "supcon", "dihedral", 0.01)
    assert "finetune.optimizer" not in caplog.text  # nothing changed for this run
    new = tmp_path / "new"
    cfg.save_yaml(cfg.from_tree(TrainConfig, {"run": {"name": "new"}}), new / "config.yaml")
    config, _ = parse_args(["--resume", str(new)])
    assert (config.finetune.optimizer, config.finetune.step_lr()) == ("adam", 1e-3)  # a new run keeps its own


def test_a_run_saved_before_the_aggregator_knobs_resumes_with_the_aggregator_it_started_with(tmp_path):
    """A config.yaml written before mil.ensemble / mil.embed / mil.min_val_bags resumes with one aggregator, no
    embedding and validation-picked epoch and threshold (what it trained round 0 with), not 5 members of another
    width: its later rounds would otherwise be a different model from its first."""
    old = _run_saved_without(tmp_path, "mil", ("ensemble", "embed", "min_val_bags"))
    config, _ = parse_args(["--resume", str(old)])
    assert (config.mil.ensemble, config.mil.embed, config.mil.min_val_bags) == (1, 0, 0)
    new = tmp_path / "new"
    cfg.save_yaml(cfg.from_tree(TrainConfig, {"run": {"name": "new"}}), new / "config.yaml")
    config, _ = parse_args(["--resume", str(new)])
    assert (config.mil.ensemble, config.mil.min_val_bags) == (5, 10)  # a new run keeps its own


def test_a_run_saved_before_the_positive_floor_resumes_with_r_t_alone(tmp_path):
    """A config.yaml written before mining.min_positives resumes drawing positives as it started (r_t alone), not
    from a floor of 50 its earlier rounds did not have."""
    config, _ = parse_args(["--resume", str(_run_saved_without(tmp_path, "mining", ("min_positives",)))])
    assert config.mining.min_positives == 0
    new = tmp_path / "new"
    cfg.save_yaml(cfg.from_tree(TrainConfig, {"run": {"name": "new"}}), new / "config.yaml")
    config, _ = parse_args(["--resume", str(new)])
    assert config.mining.min_positives == 50  # a new run keeps its own


def test_changed_knobs_lists_dotted_keys():
    old = cfg.to_tree(TrainConfig())
    new = cfg.to_tree(dataclasses.replace(TrainConfig(), mining=dataclasses.replace(TrainConfig().mining, neg_ratio=0.5)))
    assert cfg.changed_knobs(old, new) == {"mining.neg_ratio": (0.2, 0.5)}


def test_help_lists_every_knob_and_the_recipes(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    for key, _, _ in cfg.leaves(TrainConfig):
        assert f"--{key}" in out
    assert "paper" in out and "--resume" in out
