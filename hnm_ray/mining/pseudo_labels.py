"""One round's pseudo labels and selections (paper steps 4-6): score tiles with the instance classifier, fill
the HardNegativeMiner's global top-k queue, pick self-paced positives (and uncertain negatives), and keep a
round's selection only when the update gate adopts it."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hnm_ray.core import storage
from hnm_ray.config import MiningConfig
from hnm_ray.core.errors import HnmError
from hnm_ray.mining.miner import get_miner, push_scores
from hnm_ray.mining.selection import select_positives, uncertain_negatives
from hnm_ray.mining.scoring import count_tiles, score_tiles
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord

log = logging.getLogger("hnm_ray")

MINER_SNAPSHOT = "miner_snapshot.npz"  # the miner's queue after each round's mining, in the run folder
POOL_SPLITS = {"train": ("train",), "train_val": ("train", "val")}


@dataclass
class Selection:
    """A round's tiles for fine-tuning: hard negatives, positives and uncertain negatives (slide_id, tile_id, ...)."""

    hard_negatives: pa.Table
    positives: pa.Table  # with pos_rank: rank fraction by score, 0 = most confident
    uncertain: pa.Table  # positive-slide tiles with p <= threshold, by score ascending
    stats: dict[str, Any]

    def save(self, folder: Path) -> Path:
        """Write the three tables as Parquet under `folder` (read back by `load`)."""
        for name in ("hard_negatives", "positives", "uncertain"):
            storage.write_table(getattr(self, name), folder / f"{name}.parquet")
        return folder

    @classmethod
    def load(cls, folder: Path, stats: dict[str, Any]) -> Selection:
        """A selection saved by `save`."""
        return cls(*(pq.read_table(folder / f"{n}.parquet") for n in ("hard_negatives", "positives", "uncertain")),
                   stats=stats)


def mine_round(mining: MiningConfig, store: FeatureStore, records: list[SlideRecord], model_path: str, run_dir: Path,
               round_: int, miner_name: str, max_ratio: float, plugin: str | None = None) -> Selection:
    """Pseudo labels for every tile of the mining pool, its global hard negatives, positives and uncertain negatives
    (the lowest `max_ratio` fraction, the round's largest r_t)."""
    import ray

    pool = [r for r in records if r.split in POOL_SPLITS[mining.pool] and r.slide_id in store.completed()
            and r.label is not None]
    negatives = [r.slide_id for r in pool if r.label == 0]
    miner = get_miner(miner_name, snapshot_path=str(run_dir / MINER_SNAPSHOT))
    n_negative_tiles = count_tiles(store, negatives)
    ray.get(miner.begin_round.remote(n_negative_tiles, mining.neg_ratio, round_))
    scores = score_once_more_on_node_loss(lambda: score_tiles(model_path, store, pool, run_dir /
                                                              f"scores_round{round_}.parquet", miner_name=miner_name,
                                                              plugin=plugin))
    repush_lost_scores(miner, scores, negatives, n_negative_tiles, round_)
    ray.get(miner.save.remote(str(run_dir / MINER_SNAPSHOT)))
    hard = ray.get(miner.hard_negatives.remote())
    positive_ids = [r.slide_id for r in pool if r.label == 1]
    on_positive = scores.filter(np.isin(scores["slide_id"].to_numpy(zero_copy_only=False), positive_ids))
    on_positive = on_positive.select(["slide_id", "tile_id", "score"])
    positives = with_rank(select_positives(on_positive, mining.threshold, ratio=1.0))
    uncertain = (uncertain_negatives(on_positive, mining.threshold, ratio=max_ratio) if mining.uncertain_negatives
                 else on_positive.slice(0, 0))
    stats = ray.get(miner.stats.remote())
    logit = stats.get("threshold")
    log.info("round %d mining: %d hard negatives (global top %.0f%% of %d negative tiles, p >= %.3f), %d positives "
             "above p=%.2f, %d uncertain negatives", round_, hard.num_rows, 100 * mining.neg_ratio,
             stats.get("n_neg_total", 0), 1 / (1 + np.exp(-logit)) if logit is not None else np.nan,
             positives.num_rows, mining.threshold, uncertain.num_rows)
    return Selection(hard, positives, uncertain, {k: v for k, v in stats.items() if not isinstance(v, np.ndarray)})


def score_once_more_on_node_loss(score: Callable[[], pa.Table]) -> pa.Table:
    """`score()`, run a second time when Ray fails it: a pass that starts while a node is dying (Ray has not yet
    marked it dead) may place a reader or scorer actor there and fail. Scoring is idempotent (pushes keep the
    greatest score, the scores file is written once at the end), so a second pass gives the same round."""
    import ray

    try:
        return score()
    except ray.exceptions.RayError as exc:
        log.warning("scoring failed in Ray (%s: %s); scoring again", type(exc).__name__, str(exc).splitlines()[0])
        return score()


def repush_lost_scores(miner: Any, scores: pa.Table, negatives: list[str], n_negative_tiles: int, round_: int,
                       chunk: int = 1 << 16) -> None:
    """Make sure the miner holds every negative tile's score: when its node died during scoring, the actor came back
    (max_restarts) from its last snapshot (taken at begin_round) and lost the pushes acknowledged since; those are
    pushed again from the scores table (pushes are idempotent: the round's hard negatives come out identical)."""
    import ray

    seen = ray.get(miner.stats.remote())["seen"]
    if seen == n_negative_tiles:
        return
    log.warning("round %d mining: the miner holds %d of %d negative tiles (it restarted, e.g. its node died, and "
                "restored its last snapshot); pushing the lost scores again", round_, seen, n_negative_tiles)
    on_negative = scores.filter(np.isin(scores["slide_id"].to_numpy(zero_copy_only=False), negatives))
    for start in range(0, on_negative.num_rows, chunk):
        part = on_negative.slice(start, chunk)
        push_scores(miner, part["slide_id"], part["tile_id"].to_numpy(), part["logit"].to_numpy())
    seen = ray.get(miner.stats.remote())["seen"]
    if seen != n_negative_tiles:
        raise HnmError(f"round {round_} mining: the miner holds {seen} of {n_negative_tiles} negative tiles after "
                       "pushing every score again; rerun the job with --resume to mine the round afresh")


def with_rank(positives: pa.Table) -> pa.Table:
    """Add pos_rank: a positive's rank fraction by score (0 = most confident), for the self-paced ratio r_t."""
    order = np.argsort(-positives["score"].to_numpy(), kind="stable")
    rank = np.empty(len(order), np.float32)
    rank[order] = (np.arange(len(order)) + 1) / max(1, len(order))
    return positives.append_column("pos_rank", pa.array(rank))
