"""`mil.ensemble`: K aggregators (seeds seed .. seed + K - 1) averaged into the round's model. What the pipeline feeds
on from it (evaluation, tile scoring for mining, the saved files a predict loads) sees one model; K = 1 is the single
aggregator as before."""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import replace

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from safetensors.torch import load_file

from test_mil_training import array_store

from hnm_ray.config import MILConfig
from hnm_ray.core.errors import ModelFileError, StoreError
from hnm_ray.mining.scoring import score_tiles
from hnm_ray.models.ensemble import AggregatorEnsemble
from hnm_ray.models.inference import evaluate_split, load_aggregator
from hnm_ray.models.metrics import youden_threshold
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training.mil import fit_member, fit_mil

CONFIG = MILConfig(ensemble=1, epochs=3, workers=0, checkpoint_every=1, embed=0, min_val_bags=5)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 training, 10 validation and 6 test bags (half positive: one shifted instance), 6-d features, no Ray."""
    rng = np.random.default_rng(1)
    bags, records = {}, []
    for i, split in enumerate(["train"] * 12 + ["val"] * 10 + ["test"] * 6):
        label = i % 2
        features = rng.normal(0, 1, (5, 6)).astype(np.float32)
        features[0, 0] += 2.0 * label
        bags[f"b{i:02d}"] = features
        records.append(SlideRecord(f"b{i:02d}", "", label, split))
    return array_store(tmp_path_factory.mktemp("ensemble_store"), bags), records


@pytest.fixture(scope="module")
def fitted(cohort, tmp_path_factory):
    """An ensemble of 3 and the single aggregator of the same seed, trained on the cohort."""
    store, records = cohort
    run = tmp_path_factory.mktemp("ensemble_run")
    ensemble = fit_mil(replace(CONFIG, ensemble=3), store, records, run, name="m", seed=4)
    single = fit_mil(CONFIG, store, records, run, name="single", seed=4)
    return run, ensemble, single


def test_the_ensemble_is_the_mean_of_its_members_and_loads_as_one_model(cohort, fitted):
    store, _ = cohort
    run, ensemble, single = fitted
    model, meta = load_aggregator(ensemble.model_path)
    assert isinstance(model, AggregatorEnsemble) and meta["members"] == 3 and len(meta["member_epochs"]) == 3
    members = [load_aggregator(run / f"m_member{i}_aggregator")[0] for i in range(3)]
    features = torch.from_numpy(store.read_bag("b20").features)
    with torch.no_grad():
        outputs = [member(features) for member in members]
        inst, bag = model(features)
        assert torch.allclose(inst, torch.stack([o[0] for o in outputs]).mean(0))
        assert torch.allclose(bag, torch.stack([o[1] for o in outputs]).mean(0))
        assert torch.allclose(model.instance_logits(features), inst)
        assert not torch.allclose(outputs[0][0], outputs[1][0])  # different seeds, different draws
    # member 0 is the single aggregator of the same seed: K = 1 trains exactly what an ensemble starts from
    plain, plain_meta = load_aggregator(single.model_path)
    assert not isinstance(plain, AggregatorEnsemble) and "members" not in plain_meta
    with torch.no_grad():
        assert torch.equal(plain(features)[0], outputs[0][0])


def test_the_ensemble_threshold_and_metrics_are_its_own_on_validation(cohort, fitted):
    store, records = cohort
    _, ensemble, _ = fitted
    model, _ = load_aggregator(ensemble.model_path)
    val = [r for r in records if r.split == "val"]
    with torch.no_grad():
        probs = [torch.sigmoid(model(torch.from_numpy(store.read_bag(r.slide_id).features))[1]).item() for r in val]
    labels = [r.label for r in val]
    assert ensemble.threshold == pytest.approx(youden_threshold(np.asarray(labels), np.asarray(probs)))
    again = evaluate_split(ensemble.model_path, store, records, "val")
    assert again["val_auc"] == pytest.approx(ensemble.metrics["val_auc"])
    assert again["val_threshold"] == pytest.approx(ensemble.threshold)
    assert len(ensemble.metrics["val_auc_members"]) == 3  # each member's own validation AUC, recorded beside


def test_mining_scores_tiles_with_the_ensemble(cohort, fitted, tmp_path):
    """The joint mining feeds on: tile scores of the saved ensemble are its averaged instance logits."""
    store, records = cohort
    _, ensemble, _ = fitted
    table = score_tiles(ensemble.model_path, store, records, tmp_path / "scores.parquet", in_process=True)
    model, _ = load_aggregator(ensemble.model_path)
    b00 = table.filter(pc.equal(table.column("slide_id"), "b00")).sort_by("tile_id")
    with torch.no_grad():
        expected = model.instance_logits(torch.from_numpy(store.read_bag("b00").features)).numpy()
    np.testing.assert_allclose(b00.column("logit").to_numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("members", ["three", 0])
def test_a_bad_member_count_is_refused_naming_the_file(fitted, tmp_path, members):
    run, ensemble, _ = fitted
    meta = json.loads((run / "m_aggregator.json").read_text())
    (tmp_path / "bad_aggregator.safetensors").write_bytes((run / "m_aggregator.safetensors").read_bytes())
    (tmp_path / "bad_aggregator.json").write_text(json.dumps({**meta, "members": members}))
    with pytest.raises(ModelFileError, match="bad_aggregator.json.*members"):
        load_aggregator(tmp_path / "bad_aggregator")


def test_weights_of_another_ensemble_size_are_refused(fitted, tmp_path):
    run, _, _ = fitted
    meta = json.loads((run / "m_aggregator.json").read_text())
    (tmp_path / "bad_aggregator.safetensors").write_bytes((run / "m_aggregator.safetensors").read_bytes())
    (tmp_path / "bad_aggregator.json").write_text(json.dumps({**meta, "members": 2}))
    with pytest.raises(ModelFileError, match="does not hold the aggregator"):
        load_aggregator(tmp_path / "bad_aggregator")


def test_with_ray_up_the_members_train_in_ray_tasks_and_equal_those_trained_in_process(cohort, ray_session, tmp_path,
                                                                                       console):
    store, records = cohort
    config = replace(CONFIG, ensemble=2)
    fit_mil(config, store, records, tmp_path / "tasks", name="m", seed=7)
    finished = {m for m in console.messages if re.match(r"MIL: aggregator \d of 2 finished", m)}  # a set: see console
    pids = {int(re.search(r"in process (\d+)", m).group(1)) for m in finished}
    assert len(finished) == 2 and os.getpid() not in pids  # each ran in a Ray worker, not in this process
    for i in range(2):  # the sequential path's member: fit_member in this process, same name and seed
        alone = fit_member(config, store, records, tmp_path / "alone", f"m_member{i}", seed=7 + i)
        expected = load_file(alone.model_path)
        got = load_file(tmp_path / "tasks" / f"m_member{i}_aggregator.safetensors")
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_member_task_error_reaches_the_caller_as_our_own_error(cohort, ray_session, tmp_path, console):
    store, records = cohort
    negatives_only = [replace(r, label=0) for r in records]
    with pytest.raises(StoreError, match="needs positive and negative training slides") as raised:
        fit_mil(replace(CONFIG, ensemble=2), store, negatives_only, tmp_path, name="m")
    assert type(raised.value) is StoreError  # not Ray's RayTaskError(StoreError) with a remote traceback for text
    assert any("as Ray tasks" in m for m in console.messages)  # raised in a task


def test_a_too_small_validation_split_is_said_once_not_by_every_member(cohort, tmp_path, caplog):
    """The small-validation warning is the ensemble's, logged once by fit_mil (before: once per member, and from
    Ray tasks each a line of Ray's on the console)."""
    store, records = cohort
    caplog.set_level(logging.WARNING, logger="hnm_ray")
    fit_mil(replace(CONFIG, ensemble=2, epochs=1, min_val_bags=6), store, records, tmp_path, name="few", seed=0)
    assert caplog.text.count("too few to pick the epoch and threshold") == 1


def test_the_members_share_one_standardisation_computed_once(cohort, tmp_path, caplog, monkeypatch):
    """mil.standardize auto is resolved (one pass over the training bags, one log line) by fit_mil for the K
    members, not by each (before: K passes and K identical lines a round); every member keeps those statistics."""
    import hnm_ray.training.mil as mil
    import hnm_ray.training.mil_ensemble as mil_ensemble

    store, records = cohort
    passes = []
    statistics = mil.feature_statistics
    monkeypatch.setattr(mil, "feature_statistics", lambda *a: passes.append(1) or statistics(*a))
    monkeypatch.setattr(mil_ensemble, "in_tasks", lambda config: False)  # members in this process: passes counted
    caplog.set_level(logging.INFO, logger="hnm_ray")
    fit_mil(replace(CONFIG, ensemble=3, epochs=1, standardize="auto"), store, records, tmp_path, name="a", seed=0)
    assert len(passes) == 1 and caplog.text.count("mil.standardize auto ->") == 1
    alone = fit_member(replace(CONFIG, epochs=1, standardize="auto"), store, records, tmp_path / "alone", "a")
    expected = load_file(alone.model_path)["std"]
    for i in range(3):
        assert torch.equal(load_file(tmp_path / f"a_member{i}_aggregator.safetensors")["std"], expected)
