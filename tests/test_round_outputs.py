"""A round's saved selection (pseudo_labels) and a run's checkpoint folder (outputs), without Ray."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch

from hnm_ray import config as cfg
from hnm_ray.config import TrainConfig
from hnm_ray.inference import load_aggregator, save_aggregator
from hnm_ray.models.aggregators import build_standardized
from hnm_ray.models.encoders import build_encoder, save_weights
from hnm_ray.outputs import AGGREGATOR, write_checkpoint
from hnm_ray.pseudo_labels import Selection, with_rank


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
