"""The SimCLR warm start: its tile sample, and the cache keyed by cohort + encoder + tiling + knobs (no Ray)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import pyarrow as pa

from hnm_ray import config as cfg
from hnm_ray.training import augment
from hnm_ray.training.augment import AugmentConfig
from hnm_ray.config import PretrainConfig, TrainConfig
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training import pretrain
from hnm_ray.training.finetune_rows import TILE_ROW_SCHEMA


def _records(tmp_path, names=("a", "b", "c")) -> list[SlideRecord]:
    out = []
    for i, name in enumerate(names):
        path = tmp_path / f"{name}.svs"
        path.write_bytes(b"x" * (10 + i))
        out.append(SlideRecord(slide_id=name, path=str(path), label=i % 2, split="train"))
    return out


def _index(n_slides: int = 3, n_tiles: int = 20) -> dict[str, pa.Table]:
    return {f"s{i}": pa.table({"slide_id": [f"s{i}"] * n_tiles, "path": [f"/p/s{i}.svs"] * n_tiles,
                               "tile_id": pa.array(np.arange(n_tiles), pa.int32()),
                               "x": pa.array(np.arange(n_tiles) * 64, pa.int32()), "y": pa.array([0] * n_tiles, pa.int32()),
                               "level": pa.array([0] * n_tiles, pa.int8()), "size": pa.array([64] * n_tiles, pa.int16()),
                               "truth": pa.array([-1] * n_tiles, pa.int8())}) for i in range(n_slides)}


def test_sample_tile_rows_are_fine_tuning_rows_drawn_without_replacement_and_seeded():
    index = _index()
    rows = pretrain.sample_tile_rows(index, 25, seed=3)
    assert rows.schema == TILE_ROW_SCHEMA and rows.num_rows == 25
    keys = set(zip(rows["slide_id"].to_pylist(), rows["tile_id"].to_pylist()))
    assert len(keys) == 25  # no tile twice
    assert rows.equals(pretrain.sample_tile_rows(index, 25, seed=3))
    assert not rows.equals(pretrain.sample_tile_rows(index, 25, seed=4))
    assert pretrain.sample_tile_rows(index, 1000, seed=0).num_rows == 60  # capped at what exists


def test_warm_start_key_changes_with_cohort_encoder_tiling_and_seed(tmp_path):
    records = _records(tmp_path)
    base = TrainConfig()
    key = pretrain.warm_start_key(base, records)
    assert key == pretrain.warm_start_key(TrainConfig(), records)
    assert key != pretrain.warm_start_key(base, records[:2])  # another cohort
    for change in ({"encoder": {"name": "resnet18_in"}}, {"tiling": {"tile_size": 64}}, {"run": {"seed": 1}},
                   {"pretrain": {"epochs": 9}}, {"finetune": {"augment": "official"}}):
        assert key != pretrain.warm_start_key(cfg.from_tree(TrainConfig, change), records), change
    assert key == pretrain.warm_start_key(cfg.from_tree(TrainConfig, {"mining": {"neg_ratio": 0.5}}), records)


def test_warm_start_key_changes_with_the_augmentation_defaults(tmp_path, monkeypatch):
    """Weights cached with the old augmentation strengths (colour jitter 0.3) are not reused under the new default."""
    records = _records(tmp_path)
    key = pretrain.warm_start_key(TrainConfig(), records)
    old = dataclasses.replace(AugmentConfig(), brightness=0.3, contrast=0.3, saturation=0.3)
    monkeypatch.setattr(augment, "AugmentConfig", lambda: old)
    assert pretrain.warm_start_key(TrainConfig(), records) != key


def test_warm_start_pretrains_once_per_key_and_reuses_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_pretrain(config, records, run_dir, index):
        calls.append(config.encoder.name)
        weights, head = tmp_path / f"w{len(calls)}.bin", tmp_path / f"h{len(calls)}.pt"
        weights.write_bytes(b"weights %d" % len(calls))
        head.write_bytes(b"head %d" % len(calls))
        return str(weights), str(head)

    monkeypatch.setattr(pretrain, "pretrain_simclr", fake_pretrain)
    records, cache = _records(tmp_path), tmp_path / "cache"
    first = pretrain.warm_start(TrainConfig(), records, tmp_path / "run1", cache, None)
    again = pretrain.warm_start(TrainConfig(), records, tmp_path / "run2", cache, None)
    assert first == again and calls == ["small_cnn"]  # the second run does no pre-training
    assert pretrain.warm_start_head(first).read_bytes() == b"head 1"  # the SimCLR head is cached with the weights
    other = pretrain.warm_start(cfg.from_tree(TrainConfig, {"encoder": {"name": "resnet18_in"}}), records,
                                tmp_path / "run3", cache, None)
    assert other != first and len(calls) == 2
    assert not list((cache / "warm_start").glob(".*tmp"))


def test_the_warm_start_trains_with_its_own_optimiser_not_fine_tunings(tmp_path, monkeypatch):
    """SimCLR keeps pretrain.lr/momentum (0.01, 0.9: the measured warm start) whatever fine-tuning uses (momentum 0 by
    default: 0.9 collapsed the SupCon projection); its cache key follows what it trains with, and a default warm start
    keeps the key it had when it read finetune's knobs (cached weights stay valid)."""
    records = _records(tmp_path)
    seen = []
    monkeypatch.setattr(pretrain, "slide_indexes", lambda *a: _index())
    monkeypatch.setattr(pretrain, "fit_finetune", lambda config, *a, **k: seen.append(config.finetune) or
                        type("Out", (), {"encoder_weights": "w", "head_weights": "h"})())
    config = cfg.from_tree(TrainConfig, {"finetune": {"momentum": 0.0, "lr": 0.5, "optimizer": "adam"}})
    pretrain.pretrain_simclr(config, records, tmp_path, None)
    assert (seen[0].lr, seen[0].momentum, seen[0].optimizer) == (0.01, 0.9, "sgd")
    assert pretrain.warm_start_key(TrainConfig(), records) == pretrain.warm_start_key(config, records)  # not its optimiser
    # the views every warm start had before the knob, and its epochs before pretrain.epochs became 10
    dihedral = {"finetune": {"orientations": "dihedral"}, "pretrain": {"epochs": 3}}
    key = pretrain.warm_start_key(cfg.from_tree(TrainConfig, dihedral), records)
    assert key != pretrain.warm_start_key(cfg.from_tree(TrainConfig, {**dihedral, "pretrain": {"epochs": 3,
                                                                                            "momentum": 0.5}}), records)
    legacy = {"slides": sorted((r.slide_id, str(r.path), os.path.getsize(r.path)) for r in records),
              "encoder": {"name": "small_cnn", "weights": None, "norm": "affine", "input_space": "rgb_imagenet",
                          "precision": "float32"}, "tiling": dataclasses.asdict(TrainConfig().tiling),
              "pretrain": {"epochs": 3, "method": "simclr", "tiles": 4096}, "seed": 0,
              "finetune": [0.01, 0.9, 1e-4, 64, 0.07, 256, "ours"],
              "augment": {k: v for k, v in dataclasses.asdict(AugmentConfig()).items() if k != "orientations"}}
    digest = hashlib.sha256(json.dumps(legacy, sort_keys=True, default=str).encode())
    assert key == digest.hexdigest()[:16]  # the key of this stop's start (before the optimiser and encoder knobs)
    assert key != pretrain.warm_start_key(cfg.from_tree(TrainConfig, {"encoder": {"input_size": 96}, **dihedral}),
                                          records)
    # the views' orientations (newer than the key) enter it only when not the dihedral set the cached ones used: the
    # default (none) is a new warm start
    others = {pretrain.warm_start_key(cfg.from_tree(TrainConfig, {"finetune": {"orientations": o}}), records)
              for o in ("hflip", "none")}
    assert len(others) == 2 and key not in others
    assert pretrain.warm_start_key(TrainConfig(), records) in others


def test_the_warm_start_benchmark_trains_with_the_products_warm_start_optimiser():
    """benchmarks/warm_start.py measures the warm start the product runs: SGD at pretrain.lr / pretrain.momentum, not
    the fine-tuning's (lr unset -> Adam's default, momentum 0), which it had taken before."""
    from benchmarks.warm_start import Recipe

    recipe, warm = Recipe(), PretrainConfig()
    assert (recipe.lr, recipe.momentum) == (warm.lr, warm.momentum) == (0.01, 0.9)
