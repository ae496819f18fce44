"""Shared test helpers: small configs of the one tree and the store they extract into."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hnm_ray import config as cfg
from hnm_ray.config import TrainConfig
from hnm_ray.store.features import FeatureStore

SMALL = {"encoder": {"name": "small_cnn"}, "extract": {"dtype": "float32", "batch_size": 32}}


def small_config(tree: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig with the fast CPU encoder (small_cnn), float32 features and `tree` on top."""
    return cfg.from_tree(TrainConfig, cfg.merge(SMALL, tree or {}))


def store_for(root: str | Path, config: TrainConfig, round: int = 0) -> FeatureStore:
    """The feature store that `config`'s encoder extracts into under `root`."""
    from hnm_ray.models.encoders import config_tag

    return FeatureStore(root, config_tag(config.encoder), round=round)
