"""Selection rules: self-paced positives (paper step 5, ItS2CLR) with their ratio r_t, ItS2CLR's uncertain
negatives, the one-machine reference of the miner's hard negatives, and the official update gate."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hnm_ray.config import check_range
from hnm_ray.core.errors import ConfigError, HnmError
from hnm_ray.mining.queue import HARD_NEGATIVE_SCHEMA, RANK_ORDER, n_hard_negatives


def positive_ratio(epoch: int, warmup: int, total_epochs: int, ro: float = 0.2, rT: float = 0.8) -> float:
    """Self-paced fraction r_t of positives kept: ro up to the warm-up epoch, linear to rT at the last epoch.

    Epochs count from 0; epoch `warmup` gives ro and epoch `total_epochs - 1` gives rT (ro throughout
    when the warm-up ends at the last epoch).
    """
    check_range("ro", ro, 0.0, 1.0, low_open=True)
    check_range("rT", rT, ro, 1.0)
    if not 0 <= warmup < total_epochs:
        raise ConfigError("warmup", f"{warmup!r} must lie in [0, total_epochs={total_epochs}); shorten the warm-up")
    span = total_epochs - 1 - warmup
    if span == 0:
        return float(ro)
    return float(ro + (rT - ro) * min(max(epoch - warmup, 0), span) / span)


def positive_rank_floor(n_positives: int, min_positives: int) -> float:
    """The smallest r_t that keeps the top `min_positives` of `n_positives` ranked positives (all when fewer; 0 when
    `min_positives` is 0): the k-th has pos_rank k / n, half a rank more keeps float32 rounding out."""
    if min_positives <= 0 or n_positives <= 0:
        return 0.0
    return min(1.0, (min_positives + 0.5) / n_positives)


def _ranked(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=RANK_ORDER))


def select_positives(table: pa.Table, threshold: float = 0.3, *, ratio: float) -> pa.Table:
    """Paper step 5: among positive-slide tiles with p > threshold, the top fraction `ratio` by p.

    `table` has slide_id, tile_id and score = p = sigmoid(instance logit) in [0, 1] (other columns
    are kept). Returns ceil(ratio * n_above) rows by score desc, then slide_id, tile_id.
    """
    check_range("ratio", ratio, 0.0, 1.0, low_open=True)
    check_range("threshold", threshold, 0.0, 1.0, high_open=True)
    scores = table["score"]
    if table.num_rows and (pc.min(scores).as_py() < 0 or pc.max(scores).as_py() > 1):
        raise HnmError(f"select_positives needs probabilities in [0, 1], got scores in [{pc.min(scores).as_py()}, "
                       f"{pc.max(scores).as_py()}]: pass p = sigmoid(logit), not logits")
    above = _ranked(table.filter(pc.greater(scores, pa.scalar(threshold, type=scores.type))))  # 0.3 as float32 too
    return above.slice(0, math.ceil(Fraction(str(ratio)) * above.num_rows))


def select_hard_negatives_local(table: pa.Table, neg_ratio: float) -> pa.Table:
    """Reference for the miner on one machine: dedupe (greatest score), full sort, top ceil(neg_ratio * N)."""
    check_range("neg_ratio", neg_ratio, 0.0, 1.0, low_open=True)
    distinct = table.group_by(["slide_id", "tile_id"]).aggregate([("score", "max")])
    distinct = pa.table([distinct["slide_id"].cast(pa.string()), distinct["tile_id"].cast(pa.int32()),
                         distinct["score_max"].cast(pa.float32())], schema=HARD_NEGATIVE_SCHEMA)
    return _ranked(distinct).slice(0, n_hard_negatives(distinct.num_rows, neg_ratio))


def uncertain_negatives(table: pa.Table, threshold: float = 0.3, *, ratio: float) -> pa.Table:
    """ItS2CLR's uncertain negatives: positive-slide tiles with p <= threshold, the lowest fraction `ratio` by p.

    As the official code selects them (InssepSPLDataset.init_bag): q = np.quantile(p of those tiles,
    ratio) with linear interpolation, keep every tile with p <= q (ties included), i.e.
    floor(ratio * (n - 1)) + 1 tiles without ties. `table` holds positive-slide tiles with slide_id,
    tile_id and score = p in [0, 1]; returned by score ascending, then slide_id, tile_id. They are
    label 0 in the official step B (after the first adopted pseudo-label update).
    """
    check_range("ratio", ratio, 0.0, 1.0, low_open=True)
    check_range("threshold", threshold, 0.0, 1.0, high_open=True)
    scores = table["score"]
    # The complement of select_positives' candidates (p > threshold, threshold cast to the score type).
    below = table.filter(pc.less_equal(scores, pa.scalar(threshold, type=scores.type)))
    if below.num_rows == 0:
        return below
    values = below["score"].to_numpy().astype(np.float64)  # the official code compares Python floats
    kept = below.filter(pa.array(values <= np.quantile(values, ratio)))
    return kept.take(pc.sort_indices(kept, sort_keys=[("score", "ascending"), ("slide_id", "ascending"),
                                                      ("tile_id", "ascending")]))


def adopt_round(new_best_val_f1: float, best_so_far: float) -> bool:
    """Official update gate: adopt a round's pseudo labels and hard negatives iff its best val F1 >= the best so far."""
    return bool(new_best_val_f1 >= best_so_far)
