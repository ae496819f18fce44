"""The rows fine-tuning trains on, one a tile (`TILE_ROW_SCHEMA`): a round's hard negatives (label 0), self-paced
positives (label 1, with their rank among positives) and, in the official loop, uncertain negatives, in a seeded
order; with `finetune.negative_classes` K > 1 the negatives' k-means classes."""
from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa

from hnm_ray.config import TrainConfig
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training.official_steps import HARD_NEGATIVE, POSITIVE, UNCERTAIN_NEGATIVE

log = logging.getLogger("hnm_ray")

TILE_ROW_SCHEMA = pa.schema([("slide_id", pa.string()), ("path", pa.string()), ("tile_id", pa.int32()),
                             ("x", pa.int32()), ("y", pa.int32()), ("level", pa.int8()), ("size", pa.int16()),
                             ("label", pa.int8()), ("pos_rank", pa.float32()), ("kind", pa.int8()),
                             ("score", pa.float32()), ("supcon_class", pa.int16())])
# score: pseudo-label p of positives and uncertain negatives; supcon_class: the row's SupCon class (our loop): the label
# (0 negative, 1 positive), or with finetune.negative_classes K > 1 the negatives' k-means cluster 0..K-1, K positives


def sample_positives(positives: pa.Table, n: int, max_rank: float, seed: int) -> pa.Table:
    """`n` positives for one round's epochs, drawn from those with pos_rank <= max_rank (the round's largest r_t);
    with replacement only when fewer exist. Workers drop those above each epoch's own r_t."""
    pool = positives.filter(pa.compute.less_equal(positives["pos_rank"], max_rank))
    if pool.num_rows == 0 or n <= 0:
        return pool.slice(0, 0)
    rng = np.random.default_rng(seed)
    return pool.take(np.sort(rng.choice(pool.num_rows, n, replace=pool.num_rows < n)))


def tile_rows(store: FeatureStore, records: list[SlideRecord], selections: list[tuple[pa.Table, int]],
              seed: int) -> pa.Table:
    """Coordinates of selected tiles (tables of slide_id, tile_id[, pos_rank, score]) with their kind and label,
    shuffled."""
    paths = {r.slide_id: r.path for r in records}
    parts = []
    for table, kind in selections:
        for slide_id in sorted(set(table["slide_id"].to_pylist())):
            chosen = table.filter(pa.compute.equal(table["slide_id"], slide_id))
            coords = store.read_table(slide_id, columns=["tile_id", "x", "y", "level", "size"])
            joined = chosen.join(coords, keys="tile_id", join_type="inner")
            n = joined.num_rows
            zeros = pa.array(np.zeros(n, np.float32))
            parts.append(pa.table({"slide_id": pa.array([slide_id] * n), "path": pa.array([paths[slide_id]] * n),
                                   "tile_id": joined["tile_id"], "x": joined["x"], "y": joined["y"],
                                   "level": joined["level"], "size": joined["size"],
                                   "label": pa.array(np.full(n, int(kind == POSITIVE), np.int8)),
                                   "pos_rank": joined["pos_rank"] if "pos_rank" in joined.column_names else zeros,
                                   "kind": pa.array(np.full(n, kind, np.int8)),
                                   "score": joined["score"].cast(pa.float32()) if "score" in joined.column_names
                                   else zeros,
                                   "supcon_class": pa.array(np.full(n, int(kind == POSITIVE), np.int16))},
                                  schema=TILE_ROW_SCHEMA))
    rows = pa.concat_tables(parts) if parts else TILE_ROW_SCHEMA.empty_table()
    return rows.take(np.random.default_rng(seed).permutation(rows.num_rows))


def round_rows(config: TrainConfig, store: FeatureStore, records: list[SlideRecord], selection, round_: int,
               uncertain_joined: bool) -> pa.Table:
    """A round's fine-tuning rows: every hard negative; our loop: `pos_per_neg` positives per hard negative drawn
    from the round's top r_t; the official loop: every positive above the threshold (step A cycles through them, step
    B takes the top r_t of them each epoch). The uncertain negatives join once `uncertain_joined` (officially after
    the first adopted pseudo-label update)."""
    from hnm_ray.mining.selection import positive_rank_floor, positive_ratio

    ft, seed = config.finetune, config.run.seed + round_
    hard = selection.hard_negatives.select(["slide_id", "tile_id"])
    if ft.loop == "official":
        chosen = selection.positives
    else:
        last_epoch = (round_ + 1) * ft.epochs_per_round - 1
        max_rank = max(positive_ratio(last_epoch, ft.warmup_epochs, config.total_finetune_epochs, config.mining.ro,
                                      config.mining.rT),
                       positive_rank_floor(selection.positives.num_rows, config.mining.min_positives))
        chosen = sample_positives(selection.positives, math.ceil(ft.pos_per_neg * hard.num_rows), max_rank, seed)
        distinct = int(np.sum(np.asarray(selection.positives["pos_rank"]) <= max_rank))
        log.info("round %d fine-tuning: %d hard negatives and %d positive rows drawn from the top %d of %d positives "
                 "(r_t %.2f, mining.min_positives %d)", round_, hard.num_rows, chosen.num_rows, distinct,
                 selection.positives.num_rows, max_rank, config.mining.min_positives)
    uncertain = selection.uncertain if uncertain_joined else selection.uncertain.slice(0, 0)
    rows = tile_rows(store, records, [(hard, HARD_NEGATIVE),
                                      (chosen.select(["slide_id", "tile_id", "pos_rank", "score"]), POSITIVE),
                                      (uncertain.select(["slide_id", "tile_id", "score"]), UNCERTAIN_NEGATIVE)], seed)
    return negative_classes(rows, store, ft.negative_classes, seed) if ft.negative_classes > 1 else rows


def negative_classes(rows: pa.Table, store: FeatureStore, k: int, seed: int) -> pa.Table:
    """The rows with `supcon_class` = the k-means cluster (0..k-1) of each negative's features in `store` (the
    round's starting features) and k for the positives (finetune.negative_classes)."""
    from sklearn.cluster import KMeans

    negative = np.flatnonzero(np.asarray(rows["label"]) == 0)
    classes = np.where(np.asarray(rows["label"]) == 0, 0, k).astype(np.int16)  # one class when too few negatives
    if len(negative) >= k:
        features = store.select_tiles(rows.take(negative).select(["slide_id", "tile_id"]), "negatives").features
        classes[negative] = KMeans(k, n_init=4, random_state=seed).fit(features).labels_
    return rows.set_column(rows.schema.get_field_index("supcon_class"), "supcon_class", pa.array(classes))
