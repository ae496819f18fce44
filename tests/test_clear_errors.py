"""Clear errors for what users get wrong: a plug-in that fails to build, a file that is not weights, --resume with
changed knobs, a cohort whose training split lacks a class. Encoder weights as safetensors (and .pt state dicts)."""
from __future__ import annotations

import csv

import pytest
import torch

from hnm_ray import config as cfg
from hnm_ray.config import TrainConfig
from hnm_ray.core.errors import ConfigError, ManifestError
from hnm_ray.models.aggregators import build_aggregator
from hnm_ray.models.encoders import build_encoder
from hnm_ray.models.weights import read_weights, save_weights
from hnm_ray.store.manifest import SlideRecord, require_both_classes


@pytest.mark.parametrize("spec, key, build", [
    ("os:system", "encoder.name", lambda s: build_encoder(s)),
    ("os:system", "mil.aggregator", lambda s: build_aggregator(s, 8)),
    ("json:dumps", "encoder.name", lambda s: build_encoder(s)),
])
def test_a_plugin_that_fails_to_build_is_one_line_naming_it_and_the_cause(spec, key, build):
    with pytest.raises(ConfigError) as info:
        build(spec)
    message = str(info.value)
    assert info.value.key == key and "\n" not in message
    assert f"plug-in {spec!r} failed to build: TypeError:" in message


def test_a_plugin_module_that_raises_on_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('needs a GPU\\nand more')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot load plug-in 'broken_plugin:make': RuntimeError: needs a GPU and more"):
        build_encoder("broken_plugin:make")


def test_a_file_that_is_not_weights_says_what_was_expected(tmp_path):
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(ConfigError, match="expected encoder weights: a .safetensors file, or a torch state dict") as info:
        build_encoder("small_cnn", text)
    assert info.value.key == "encoder.weights" and "\n" not in str(info.value)


def test_weights_load_from_safetensors_and_from_weights_only_state_dicts(tmp_path):
    source = build_encoder("small_cnn")
    save_weights(source.state_dict(), tmp_path / "enc.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "simclr.pth")
    for name in ("enc.safetensors", "simclr.pth"):
        loaded = build_encoder("small_cnn", tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    (tmp_path / "enc.safetensors").rename(tmp_path / "renamed.pt")  # recognised by its header, not its name
    assert read_weights(tmp_path / "renamed.pt").keys() == source.state_dict().keys()


def test_resume_with_a_changed_knob_applies_it_and_logs_it(tmp_path, caplog):
    from hnm_ray.train import parse_args

    run = tmp_path / "run"
    cfg.save_yaml(cfg.from_tree(TrainConfig, {"run": {"name": "run"}}), run / "config.yaml")
    config, run_dir = parse_args(["--resume", str(run), "--neg-ratio", "0.5"])
    assert run_dir == run.resolve() and config.mining.neg_ratio == 0.5
    assert "resume: applying changed knobs" in caplog.text and "mining.neg_ratio: 0.2 -> 0.5" in caplog.text


def _records(labels: list[int]) -> list[SlideRecord]:
    return [SlideRecord(f"s{i}", f"/x/s{i}.svs", y, "train") for i, y in enumerate(labels)]


def test_a_training_split_of_one_class_is_refused_naming_the_counts():
    require_both_classes(_records([0, 1, 0]), "ok.csv")
    with pytest.raises(ManifestError, match="train split has 3 negative .* and 0 positive"):
        require_both_classes(_records([0, 0, 0]), "neg.csv")


def test_the_job_refuses_a_one_class_cohort_before_any_extraction(tmp_path, monkeypatch, demo_cohort):
    import hnm_ray.run.cluster
    import hnm_ray.train

    rows = list(csv.DictReader(demo_cohort.open()))
    manifest = tmp_path / "negatives.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["slide_id", "path", "label"])
        writer.writeheader()
        writer.writerows({"slide_id": r["slide_id"], "path": str(demo_cohort.parent / r["path"]), "label": 0}
                         for r in rows)
    monkeypatch.setattr(hnm_ray.run.cluster, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(hnm_ray.train, "extract_features", lambda *a, **k: pytest.fail("extraction started"))
    config = cfg.from_tree(TrainConfig, {"run": {"manifest": str(manifest)}, "pretrain": {"method": "none"}})
    with pytest.raises(ManifestError, match="training needs both classes"):
        hnm_ray.train.run_job(config, tmp_path / "run")


def test_our_errors_survive_copy_and_pickle_so_a_tune_trial_shows_them():
    """A sweep trial's ConfigError (e.g. --run.store_tag naming a store of another dim) reached the user as 'TypeError:
    ConfigError.__init__() missing 1 required positional argument': Ray Tune copies a trial's error, and the
    exceptions with more than one argument could not be rebuilt from their message."""
    import copy
    import pickle

    from hnm_ray.core.errors import NoTissueError, SlideError

    for error in (ConfigError("run.store_tag", "dim 64 there, 512 here"), ManifestError("m.csv", ["row 1: bad"]),
                  SlideError("s1", "file not found", "check the path"), NoTissueError("s2", "no tissue")):
        for again in (copy.copy(error), pickle.loads(pickle.dumps(error))):
            assert type(again) is type(error) and str(again) == str(error) and vars(again) == vars(error)
