"""Pseudo labels: score every tile with the instance classifier, feed the miner.

A pass over the feature store (slide by slide in the driver on one node; a Ray Data actor pool on a
cluster): the scorer loads the trained aggregator once, scores each batch of tiles (p = sigmoid(instance
logit)), pushes the instance logits of negative training slides to the `HardNegativeMiner` actor (the
global top-k queue), and returns `slide_id, tile_id, logit, score` rows that the driver writes as one
Parquet table beside the store.

The miner ranks logits, not p: the order is the same (sigmoid is monotone), but float32 p rounds to
exactly 1.0 above a logit of about 17, and such ties would be broken by (slide_id, tile_id) instead of
by the model. The miner's threshold is therefore a logit; p = sigmoid(threshold).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from hnm_ray.core import storage
from hnm_ray.run.progress import Progress
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord

log = logging.getLogger("hnm_ray")

SCORES_SCHEMA = pa.schema([("slide_id", pa.string()), ("tile_id", pa.int32()), ("logit", pa.float32()),
                           ("score", pa.float32())])


class InstanceScorer:
    """Ray Data actor: instance logits of tile embeddings; pushes negative-slide logits to the miner."""

    def __init__(self, model_path: str, miner_name: str | None, negative_slides: list[str],
                 torch_threads: int | None = 1, plugin: str | None = None) -> None:
        import torch

        from hnm_ray.models.inference import load_aggregator

        if torch_threads:  # an actor of its own; in the driver's process (torch_threads None) leave its threads be
            torch.set_num_threads(torch_threads)
        self.model, _ = load_aggregator(model_path, plugin)
        self.miner = None
        if miner_name:
            from hnm_ray.mining.miner import get_miner

            self.miner = get_miner(miner_name, create=False)
        self.negative = set(negative_slides)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from hnm_ray.models.inference import instance_logits
        from hnm_ray.mining.miner import push_scores

        embedding = batch["embedding"]  # (N, D), or N row arrays from a Ray Data batch of list values
        embedding = embedding if embedding.dtype != object else np.stack(embedding)
        features = torch.from_numpy(np.require(embedding, np.float32, ["C", "W"]))  # Ray's batches are read-only
        logits = instance_logits(self.model, features)  # the instance branch only: the batch mixes slides
        scores = torch.sigmoid(logits).numpy()  # no overflow warning for very negative logits
        logits = logits.numpy()
        slide_ids = np.asarray(batch["slide_id"]).astype(str)
        if self.miner is not None:
            is_negative = np.fromiter((s in self.negative for s in slide_ids), bool, len(slide_ids))
            if is_negative.any():
                push_scores(self.miner, slide_ids[is_negative], batch["tile_id"][is_negative], logits[is_negative])
        return {"slide_id": slide_ids, "tile_id": batch["tile_id"], "logit": logits.astype(np.float32),
                "score": scores.astype(np.float32)}


def score_tiles(model_path: str | Path, store: FeatureStore, records: list[SlideRecord], out_path: str | Path,
                miner_name: str | None = None, num_scorers: int = 1, batch_size: int = 4096,
                in_process: bool | None = None, plugin: str | None = None) -> pa.Table:
    """Score every tile of `records` in the store; write and return the scores table.

    With `miner_name`, the negative slides' instance logits are pushed to that miner (call its `begin_round`
    first, with n_neg_total = `count_tiles` of the negative slides); its threshold is then a logit.
    `in_process` (default: on a one-node cluster) scores slide by slide in this process; else a Ray Data pass
    with `num_scorers` actors reads the store where the cluster's nodes are. The scorer is a linear layer: an
    actor's start (a process importing torch, ~2-3 s on 2 CPUs) was most of a round's mining on one machine.
    """
    from hnm_ray.run.cluster import single_node

    wanted = sorted({r.slide_id for r in records} & store.completed())
    negatives = [r.slide_id for r in records if r.label == 0 and r.slide_id in wanted]
    if in_process if in_process is not None else single_node():
        scorer = InstanceScorer(str(model_path), miner_name, negatives, torch_threads=None, plugin=plugin)
        batches = (scorer(batch) for batch in _slide_batches(store, wanted, Progress("score (slides)", len(wanted))))
    else:
        batches = _scored_by_ray_data(store, wanted, (str(model_path), miner_name, negatives, 1, plugin), num_scorers,
                                      batch_size)
    parts = [pa.Table.from_pydict({k: batch[k] for k in SCORES_SCHEMA.names}, schema=SCORES_SCHEMA)
             for batch in batches]
    table = pa.concat_tables(parts) if parts else SCORES_SCHEMA.empty_table()
    table = table.sort_by([("slide_id", "ascending"), ("tile_id", "ascending")])
    storage.write_table(table, Path(out_path))
    log.info("scored %d tiles of %d slides -> %s", table.num_rows, len(wanted), out_path)
    return table


def _slide_batches(store: FeatureStore, slide_ids: list[str], progress: Progress) -> Iterator[dict[str, np.ndarray]]:
    """One batch of (slide_id, tile_id, embedding) per slide, read one slide at a time."""
    for slide_id in slide_ids:
        bag = store.read_bag(slide_id)
        yield {"slide_id": np.full(len(bag), slide_id, object), "tile_id": bag.tile_ids, "embedding": bag.features}
        progress.update(1, tiles=len(bag))


def _scored_by_ray_data(store: FeatureStore, slide_ids: list[str], scorer_args: tuple, num_scorers: int,
                        batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The scored batches of a Ray Data pass over the store with `num_scorers` InstanceScorer actors."""
    import ray

    ds = store.dataset(["slide_id", "tile_id", "embedding"], slide_ids=slide_ids)
    ds = ds.map_batches(InstanceScorer, fn_constructor_args=scorer_args, batch_size=batch_size, batch_format="numpy",
                        num_cpus=0.5, compute=ray.data.ActorPoolStrategy(size=num_scorers))
    return ds.iter_batches(batch_size=None, batch_format="numpy")


def count_tiles(store: FeatureStore, slide_ids: list[str]) -> int:
    """Number of tiles of these slides in the store (from Parquet footers, no data read)."""
    return sum(storage.num_rows(store.slide_path(s)) for s in slide_ids)
