"""Shared test helpers: small configs of the one tree and the store they extract into."""
from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hnm_ray import config as cfg
from hnm_ray.config import TrainConfig
from hnm_ray.store.features import FeatureStore

# One aggregator a round (mil.ensemble 1): the jobs of these tests are about other stages; the suite's tiny job
# (conftest.tiny_run: the CLI's defaults) and tests/test_mil_ensemble.py run the default ensemble.
SMALL = {"encoder": {"name": "small_cnn"}, "extract": {"dtype": "float32", "batch_size": 32}, "mil": {"ensemble": 1}}


def small_config(tree: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig with the fast CPU encoder (small_cnn), float32 features and `tree` on top."""
    return cfg.from_tree(TrainConfig, cfg.merge(SMALL, tree or {}))


def store_for(root: str | Path, config: TrainConfig, round: int = 0) -> FeatureStore:
    """The feature store that `config`'s encoder extracts into under `root`."""
    from hnm_ray.models.encoders import config_tag

    return FeatureStore(root, config_tag(config.encoder), round=round)


def kept_store(run: Path) -> FeatureStore:
    """The features of the round a finished run kept as its final model (metrics.json "final"): where the job put
    them (hnm_ray.train.round_store, with that round's encoder weights)."""
    import json

    from hnm_ray.train import round_store

    metrics = json.loads((run / "metrics.json").read_text())
    kept = metrics["final"]["round"]
    config = cfg.from_tree(TrainConfig, cfg.load_yaml(run / "config.yaml"))
    return round_store(config, run, kept, metrics["rounds"][kept]["encoder_weights"])


# The tiny job of the end-to-end tests: one fine-tuning round on the 8-slide demo cohort, in seconds per stage.
TINY_JOB = ["--rounds", "1", "--epochs-per-round", "2", "--warmup-epochs", "1", "--mil.epochs", "6",
            "--mil.workers", "0", "--finetune.workers", "0", "--finetune.batch_size", "32", "--heatmaps", "2",
            "--pretrain.epochs", "1", "--pretrain.tiles", "64"]


def job_env(cache: Path) -> dict[str, str]:
    """The environment of a job run as a subprocess: a local Ray (no RAY_ADDRESS) and its own cache folder."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HNM_RAY_CACHE"] = str(cache)
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy (returned); fail the test after `timeout` seconds."""
    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


class LiveBags:
    """Counts the Bag objects a store's `read_bag` returned that are still alive (weakref finalizers) and the peak of
    their bytes: what a stage holds in memory at once. `store_class()` is a FeatureStore that reports to it."""

    def __init__(self) -> None:
        self.live_bytes = self.peak_bytes = self.reads = 0

    def _release(self, size: int) -> None:
        self.live_bytes -= size

    def store_class(self) -> type[FeatureStore]:
        from hnm_ray.store.bag_cache import bag_bytes

        counter = self

        class CountingStore(FeatureStore):
            def read_bag(self, slide_id, label=None, as_stored=False):
                bag = super().read_bag(slide_id, label, as_stored)
                size = bag_bytes(bag)
                counter.reads += 1
                counter.live_bytes += size
                counter.peak_bytes = max(counter.peak_bytes, counter.live_bytes)
                weakref.finalize(bag, counter._release, size)
                return bag

        return CountingStore


def last_json_line(stdout: str) -> str:
    """The job's summary: its last stdout line that is a JSON object (a Ray worker's forwarded output, e.g. cuFile's
    "initialization failed" notice on a CPU machine, can be flushed after it when Ray shuts down)."""
    return [line for line in stdout.splitlines() if line.startswith("{")][-1]
