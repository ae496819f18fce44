"""benchmarks/positive_pool.py: what a round's positive pool holds against tile truth, and that it rescores the pool a
finished job mined (the joint: a job's run folder -> the benchmark)."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks.mil_seed_spread import finished_run
from benchmarks.positive_pool import analyse_round, estimated_precision, pool, top_k_precision


def test_a_pool_counts_the_tiles_above_the_threshold_and_their_tumour_share():
    scores, truth = np.array([0.9, 0.8, 0.4, 0.2, 0.1]), np.array([1, 0, 1, 0, 0], bool)
    assert pool(scores, truth, 0.3) == {"n": 3, "precision": pytest.approx(2 / 3)}
    assert pool(scores, truth, 0.95) == {"n": 0, "precision": None}
    assert top_k_precision(scores, truth, 2) == 0.5 and top_k_precision(scores, truth, 6) is None


def test_negative_slides_estimate_the_normal_tiles_above_the_threshold():
    negatives = np.array([0.1] * 90 + [0.5] * 10, np.float32)  # 10 % of normal tiles score above 0.3
    # 1,000 positive-slide tiles, 150 above 0.3: ~100 of them normal, precision 1/3
    assert estimated_precision(negatives, 1000, 0.3, 150) == pytest.approx(1 - 100 / 150)
    assert estimated_precision(negatives, 1000, 0.3, 0) is None


def test_the_pool_at_the_job_threshold_is_the_pool_the_job_mined(tiny_run, tmp_path):
    assert tiny_run.done.returncode == 0, tiny_run.done.stderr[-2000:]
    row = analyse_round(tiny_run.run, 0, cross_fit=False, work=tmp_path)
    mined = pq.read_table(tiny_run.run / "selection_round0" / "positives.parquet")
    _, _, store_of = finished_run(tiny_run.run)
    truth = [bool(store_of(0).read_table(s, columns=["tile_id", "truth"]).to_pandas().set_index("tile_id")
                  .loc[t, "truth"] > 0) for s, t in zip(mined["slide_id"].to_pylist(), mined["tile_id"].to_pylist())]
    assert row["pool_0.3"]["n"] == mined.num_rows > 0
    assert row["pool_0.3"]["precision"] == pytest.approx(np.mean(truth))
    assert len(row["member_pools_0.3"]) == 5  # the default ensemble's members, each rescored
