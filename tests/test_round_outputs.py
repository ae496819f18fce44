"""A round's saved selection (pseudo_labels), a run's checkpoint folder and the round a run keeps as its final model
(outputs; the last test reads the shared demo features)."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from hnm_ray import config as cfg
from hnm_ray.config import TrainConfig
from hnm_ray.models.inference import load_aggregator, save_aggregator
from hnm_ray.models.aggregators import build_standardized
from hnm_ray.models.encoders import build_encoder
from hnm_ray.models.weights import save_weights
from hnm_ray.report.outputs import AGGREGATOR, finish, kept_round, write_checkpoint
from hnm_ray.mining.pseudo_labels import Selection, with_rank


def _scores(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"slide_id": [f"s{i % 3}" for i in range(n)], "tile_id": pa.array(np.arange(n), pa.int32()),
                     "score": pa.array(rng.random(n).astype(np.float32))})


def test_pos_rank_is_the_rank_fraction_by_score():
    table = with_rank(_scores(8, 0))
    order = np.argsort(-table["score"].to_numpy(), kind="stable")
    np.testing.assert_allclose(table["pos_rank"].to_numpy()[order], (np.arange(8) + 1) / 8)


def test_selection_round_trips_through_its_folder(tmp_path):
    chosen = Selection(_scores(5, 1), with_rank(_scores(7, 2)), _scores(3, 3), {"k": 5})
    back = Selection.load(chosen.save(tmp_path / "selection_round0"), {"k": 5})
    for name in ("hard_negatives", "positives", "uncertain"):
        assert getattr(back, name).equals(getattr(chosen, name)), name


def test_checkpoint_folder_holds_model_files_that_load_and_the_config_tree(tmp_path):
    config = cfg.from_tree(TrainConfig, {"run": {"seed": 4}})
    cfg.save_yaml(config, tmp_path / "config.yaml")
    torch.manual_seed(0)
    model = build_standardized("dsmil", 128, hidden=8, dropout=0.0)
    meta = {"aggregator": "dsmil", "hidden": 8, "dropout": 0.0, "dim": 128, "threshold": 0.3, "epoch": 2,
            "encoder_tag": "small_cnn"}
    model_path = save_aggregator(tmp_path / "mil_round1_aggregator", model.state_dict(), meta)
    encoder = build_encoder("small_cnn")
    weights = save_weights(encoder.state_dict(), tmp_path / "finetune_round0_encoder.safetensors")
    last = {"round": 1, "model_path": str(model_path), "encoder_weights": str(weights), "val_threshold": 0.3}
    folder = write_checkpoint(tmp_path, last, config, tile_threshold=0.7)
    loaded, saved = load_aggregator(folder / AGGREGATOR)
    bag = torch.randn(5, 128)
    for a, b in zip(loaded(bag), model.eval()(bag)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert json.loads((folder / "meta.json").read_text())["round"] == 1 and saved["threshold"] == 0.3
    assert json.loads((folder / "meta.json").read_text())["tile_threshold"] == 0.7
    assert cfg.from_tree(TrainConfig, cfg.load_yaml(folder / "config.yaml")) == config
    again = build_encoder("small_cnn", folder / json.loads((folder / "meta.json").read_text())["encoder_weights"])
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)


def _round(index: int, val_auc: float) -> dict:
    return {"round": index, "val_auc": val_auc}


def test_the_kept_round_is_the_best_validation_auc_ties_to_the_later_nan_losing_or_the_last_by_the_knob():
    history = [_round(0, 0.9), _round(1, 0.8), _round(2, 0.7)]
    assert kept_round(history, "best_val")[0] == 0
    assert "validation slide AUC" in kept_round(history, "best_val")[1]
    assert kept_round(history, "last") == (2, "the last round (run.final_round last)")
    assert kept_round([_round(0, 0.8), _round(1, 0.9), _round(2, 0.9)], "best_val")[0] == 2  # tie: the later round
    assert kept_round([_round(0, 0.6), _round(1, math.nan), _round(2, 0.5)], "best_val")[0] == 0  # NaN loses
    assert kept_round([_round(0, math.nan), {"round": 1}], "best_val")[0] == 1  # no AUC anywhere: the last
    # test metrics never take part
    assert kept_round([{**_round(0, 0.7), "test_auc": 0.2}, {**_round(1, 0.6), "test_auc": 0.99}], "best_val")[0] == 0
    assert cfg.from_tree(TrainConfig, {}).run.final_round == "best_val"


@pytest.mark.timeout(300)
def test_finish_writes_the_best_validation_rounds_aggregator_encoder_and_outputs_from_its_store(mil_store, mil_cohort,
                                                                                               tmp_path):
    """A run whose round 0 has the best validation AUC: checkpoint/ holds round 0's aggregator and encoder, metrics
    "final" is round 0 saying why, and the outputs are made from round 0's store (round 1's here holds nothing)."""
    from _support import small_config

    from hnm_ray.store.features import FeatureStore
    from hnm_ray.store.manifest import load_manifest

    config = small_config({"run": {"heatmaps": 1}})
    cfg.save_yaml(config, tmp_path / "config.yaml")
    records = load_manifest(mil_cohort)
    dim = mil_store.read_bag(records[0].slide_id).features.shape[1]
    history, models, encoders = [], [], []
    for index, val_auc in enumerate((0.9, 0.7)):
        torch.manual_seed(index)
        model = build_standardized("dsmil", dim, hidden=8, dropout=0.0)
        meta = {"aggregator": "dsmil", "hidden": 8, "dropout": 0.0, "dim": dim, "threshold": 0.5, "epoch": 1,
                "encoder_tag": "small_cnn"}
        path = save_aggregator(tmp_path / f"mil_round{index}_aggregator", model.state_dict(), meta)
        encoder = build_encoder("small_cnn")
        weights = save_weights(encoder.state_dict(), tmp_path / f"round{index}_encoder.safetensors")
        models.append(model.eval())
        encoders.append(encoder)
        history.append({"round": index, "val_auc": val_auc, "val_threshold": 0.4 + index / 10, "test_auc": 0.5 + index,
                        "model_path": str(path), "encoder_weights": str(weights), "official_protocol": {"round": index}})
    stores = [mil_store, FeatureStore(tmp_path / "round1_features", "finetuned", round=1)]
    final = finish(tmp_path, history, records, stores, {}, config)

    assert final["final"]["round"] == 0 and "best validation slide AUC" in final["final"]["kept"]
    assert final["final"]["val_auc_over_round0"] is None  # round 0 kept: no gain to measure
    assert final["official_protocol"] == {"round": 0} and final["skipped"]["count"] == 0
    meta = json.loads((tmp_path / "checkpoint" / "meta.json").read_text())
    assert meta["round"] == 0 and meta["threshold"] == 0.4
    loaded, _ = load_aggregator(tmp_path / "checkpoint" / AGGREGATOR)
    bag = torch.randn(5, dim)
    for a, b in zip(loaded(bag), models[0](bag)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    again = build_encoder("small_cnn", tmp_path / "checkpoint" / meta["encoder_weights"])
    for key, value in encoders[0].state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)
    assert len(list((tmp_path / "qupath").glob("*.geojson"))) == len(records)
    assert "Final model: round 0, the best validation slide AUC" in (tmp_path / "report.html").read_text()


def test_a_later_kept_round_says_its_validation_gain_over_round0_on_the_same_slides_with_its_interval(
        mil_store, mil_cohort, tmp_path, caplog):
    """What finish records when round 1 is kept: round 1's validation slide AUC minus round 0's, each round's model on
    its own store (here one store, two models), on the validation slides both scored, with a paired interval; the
    console says whether the gain is shown."""
    from hnm_ray.models.inference import split_probabilities
    from hnm_ray.models.metrics import roc_auc
    from hnm_ray.report.outputs import gain_over_round0
    from hnm_ray.store.manifest import load_manifest

    records = load_manifest(mil_cohort)
    dim = mil_store.read_bag(records[0].slide_id).features.shape[1]
    history = []
    for index in range(2):
        torch.manual_seed(10 + index)
        model = build_standardized("dsmil", dim, hidden=8, dropout=0.0)
        meta = {"aggregator": "dsmil", "hidden": 8, "dropout": 0.0, "dim": dim, "threshold": 0.5, "epoch": 1,
                "encoder_tag": "small_cnn"}
        history.append({"round": index, "model_path": str(save_aggregator(tmp_path / f"r{index}", model.state_dict(),
                                                                          meta))})
    with caplog.at_level("INFO", logger="hnm_ray"):
        gain = gain_over_round0(history, [mil_store, mil_store], 1, records, "dsmil")
    (labels, p0, _), (_, p1, _) = (split_probabilities(h["model_path"], mil_store, records, "val") for h in history)
    assert gain["difference"] == pytest.approx(roc_auc(labels, p1) - roc_auc(labels, p0))
    assert gain["low"] <= gain["difference"] <= gain["high"] and gain["n"] == labels.size
    assert gain["shown"] == (gain["low"] > 0)
    assert "validation slide AUC, round 1 over round 0" in caplog.text
    assert gain_over_round0(history, [mil_store, mil_store], 0, records, "dsmil") is None


def test_heatmap_thumbnails_decode_within_the_runs_pixel_budget(mil_store, mil_cohort, tmp_path):
    """Heatmaps read their thumbnail under the run's tiling.tissue.max_decoded_pixels (as tissue detection does), not
    the default: a budget no level fits refuses the heatmap and keeps the QuPath file; the default draws it."""
    from hnm_ray.report.slides import Thresholds, write_slide_outputs
    from hnm_ray.store.manifest import load_manifest

    record = load_manifest(mil_cohort)[0]
    dim = mil_store.read_bag(record.slide_id).features.shape[1]
    model = build_standardized("dsmil", dim, hidden=8, dropout=0.0)
    path = save_aggregator(tmp_path / "aggregator", model.state_dict(), {
        "aggregator": "dsmil", "hidden": 8, "dropout": 0.0, "dim": dim, "threshold": 0.5, "epoch": 1,
        "encoder_tag": "small_cnn"})
    for budget, drawn in ((1, False), (None, True)):
        picture = tmp_path / f"heatmap-{budget}.png"
        write_slide_outputs(path, mil_store, [record], tmp_path / f"qupath-{budget}", {record.slide_id: picture},
                            Thresholds(0.5, 0.5), max_pixels=budget)
        assert picture.exists() == drawn
        assert (tmp_path / f"qupath-{budget}" / f"{record.slide_id}.geojson").exists()
