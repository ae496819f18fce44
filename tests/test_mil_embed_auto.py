"""`mil.embed` unset (auto, the default): the learnt instance embedding where the cohort is large enough. The job
resolves it once, from its training split, before anything else of the run is written, and records the width in
config.yaml (a --resume keeps it); `fit_mil` resolves an unset one from its own training bags; the paper recipe pins
none."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import yaml

from _support import small_config
from test_mil_training import array_store

from hnm_ray import config as cfg
from hnm_ray import train
from hnm_ray.config import MILConfig, TrainConfig
from hnm_ray.config.sections import EMBED_AUTO_MIN_BAGS, EMBED_AUTO_WIDTH
from hnm_ray.models.inference import load_aggregator
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training.mil import fit_mil


def cohort(n_train: int) -> list[SlideRecord]:
    """`n_train` training slides (both classes) and a few validation and test slides."""
    return [SlideRecord(f"s{i:03d}", "", i % 2, split) for i, split in
            enumerate(["train"] * n_train + ["val"] * 4 + ["test"] * 4)]


def saved_embed(run) -> int | None:
    return yaml.safe_load((run / "config.yaml").read_text())["mil"]["embed"]


def test_the_job_resolves_auto_from_its_training_split_and_a_resume_keeps_the_width(tmp_path, monkeypatch, caplog):
    """run_job (stopped where Ray would start): one slide below the threshold no embedding, at it 128, logged and
    written into config.yaml; --resume of the 128 run reads 128 back and keeps it on a split now below the threshold."""
    def stop(*args, **kwargs):
        raise AssertionError("the job went on to start Ray")

    monkeypatch.setattr(train, "route_ray_logs", stop)  # the first step of a job after its checks and records
    caplog.set_level(logging.INFO, logger="hnm_ray")
    assert small_config().mil.embed is None  # the default: unset (auto)
    for n, width in ((EMBED_AUTO_MIN_BAGS - 1, 0), (EMBED_AUTO_MIN_BAGS, EMBED_AUTO_WIDTH)):
        with pytest.raises(AssertionError, match="start Ray"):
            train.run_job(small_config({"run": {"name": f"n{n}"}}), tmp_path / f"n{n}", records=cohort(n))
        assert saved_embed(tmp_path / f"n{n}") == width
        assert f"mil.embed unset (auto): {width}, for {n} labelled training slides" in caplog.text
    # --resume reads the width the run's start recorded, even where the split it now gets is below the threshold
    run = tmp_path / f"n{EMBED_AUTO_MIN_BAGS}"
    resumed, _ = train.parse_args(["--resume", str(run)])
    assert resumed.mil.embed == EMBED_AUTO_WIDTH
    with pytest.raises(AssertionError, match="start Ray"):
        train.run_job(resumed, run, records=cohort(EMBED_AUTO_MIN_BAGS - 1))
    assert saved_embed(run) == EMBED_AUTO_WIDTH


def test_a_set_width_and_the_paper_recipe_are_kept_whatever_the_cohort():
    """Only an unset mil.embed is resolved: the paper recipe's 0 on a large cohort, 16 on a small one."""
    large = cohort(3 * EMBED_AUTO_MIN_BAGS)
    paper = cfg.from_tree(TrainConfig, cfg.load_recipe("paper"))
    assert train.with_mil_embed(paper, large).mil.embed == 0
    assert train.with_mil_embed(small_config({"mil": {"embed": 16}}), cohort(4)).mil.embed == 16


def test_fit_mil_resolves_an_unset_width_from_the_bags_it_trains_on(tmp_path):
    """A direct caller of fit_mil (the benchmarks, MILConfig() defaults): the model saved holds the embedding from
    EMBED_AUTO_MIN_BAGS training bags with features on, none below."""
    rng = np.random.default_rng(0)
    records = cohort(EMBED_AUTO_MIN_BAGS)
    store = array_store(tmp_path / "store", {r.slide_id: rng.normal(r.label, 1, (2, 4)).astype(np.float32)
                                             for r in records})
    config = MILConfig(ensemble=1, epochs=1, workers=0, checkpoint_every=1)
    for name, chosen, width in (("below", records[1:], 0), ("at", records, EMBED_AUTO_WIDTH)):
        result = fit_mil(config, store, chosen, tmp_path / name, seed=0)
        _, meta = load_aggregator(result.model_path)
        assert meta["embed"] == width, name
