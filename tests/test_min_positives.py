"""mining.min_positives: a fine-tuning round draws its positives from r_t's top fraction of the pool, but from at
least min_positives of them (benchmarks/README "The positive pool": on a small cohort r_t 0.2 of a few dozen tiles
left ~10 tiles, each repeated ~150 times a round). The floor must reach both places that apply r_t: the rows
round_rows samples and the worker's per-epoch filter."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest

from _support import small_config

from hnm_ray.mining.pseudo_labels import Selection, with_rank
from hnm_ray.mining.selection import positive_rank_floor, select_positives
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training import finetune, finetune_rows, rounds, tile_batches
from hnm_ray.training.official_steps import POSITIVE

TILES = 12


@pytest.mark.parametrize("k", [1, 7, 50])
def test_the_floor_keeps_exactly_the_top_k_ranked_positives(k):
    rng = np.random.default_rng(k)
    for n in range(1, 300):
        table = pa.table({"slide_id": ["s"] * n, "tile_id": pa.array(np.arange(n), pa.int32()),
                          "score": pa.array(rng.uniform(0.31, 1, n).astype(np.float32))})
        ranked = with_rank(select_positives(table, 0.3, ratio=1.0))
        kept = np.asarray(ranked["pos_rank"]) <= positive_rank_floor(n, k)
        assert kept.sum() == min(k, n)
        top = np.sort(np.asarray(ranked["score"]))[::-1][:min(k, n)]
        assert np.sort(np.asarray(ranked["score"])[kept])[::-1] == pytest.approx(top)
    assert positive_rank_floor(40, 0) == 0.0 and positive_rank_floor(0, 50) == 0.0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 normal slides (their tiles the hard negatives) and 3 tumour slides whose 36 tiles all score above 0.3."""
    store = FeatureStore(tmp_path_factory.mktemp("min_positives"), "fixture", round=0)
    rng = np.random.default_rng(5)
    records, negatives, positives = [], [], []
    for name in [f"normal_{i}" for i in range(4)] + [f"tumor_{i}" for i in range(3)]:
        tiles = pa.table({"tile_id": np.arange(TILES, dtype=np.int32), "x": np.arange(TILES, dtype=np.int32) * 64,
                          "y": np.zeros(TILES, np.int32), "level": np.zeros(TILES, np.int8),
                          "size": np.full(TILES, 64, np.int16)})
        store.write_slide(name, tiles, rng.normal(0, 1, (TILES, 4)).astype(np.float32))
        records.append(SlideRecord(name, f"/slides/{name}.tif", int(name.startswith("tumor")), "train"))
        low = 0.35 if name.startswith("tumor") else 0.0
        part = pa.table({"slide_id": [name] * TILES, "tile_id": np.arange(TILES, dtype=np.int32),
                         "score": rng.uniform(low, 1, TILES).astype(np.float32)})
        (positives if name.startswith("tumor") else negatives).append(part)
    ranked = with_rank(select_positives(pa.concat_tables(positives), 0.3, ratio=1.0))
    selection = Selection(pa.concat_tables(negatives), ranked, ranked.slice(0, 0), {})
    return {"store": store, "records": records, "selection": selection}


def _config(min_positives: int):
    return small_config({"run": {"rounds": 2}, "mining": {"min_positives": min_positives, "ro": 0.2, "rT": 0.8},
                         "finetune": {"epochs_per_round": 2, "warmup_epochs": 1, "pos_per_neg": 5}})


def _positive_keys(rows: pa.Table, mask: np.ndarray | None = None) -> set[tuple[str, int]]:
    keep = np.asarray(rows["kind"]) == POSITIVE
    keep = keep if mask is None else keep & mask
    return {(s, int(t)) for s, t, k in zip(rows["slide_id"].to_pylist(), rows["tile_id"].to_pylist(), keep) if k}


def _top(selection: Selection, k: int) -> set[tuple[str, int]]:
    top = selection.positives.sort_by([("score", "descending")]).slice(0, k)
    return set(zip(top["slide_id"].to_pylist(), top["tile_id"].to_pylist()))


@pytest.mark.parametrize("min_positives, pool", [(0, 7), (20, 20), (100, 36)])
def test_the_first_round_trains_on_the_floor_of_positives_through_the_worker_filter(cohort, monkeypatch, caplog,
                                                                                      min_positives, pool):
    """finetune_round -> round_rows -> fit_finetune(positive_floor) -> epoch_batches -> the worker's filter: round
    0's rows draw from the top max(r_t 0.2 of the 36 = 7, min_positives) positives, and every positive row reaches a
    batch in both of the round's epochs (r_t stays 0.2 through the warm-up)."""
    config = _config(min_positives)
    captured = {}

    def fit(config_, rows, weights, run_dir, **span):
        captured.update(rows=rows, **span)
        return finetune.FinetuneResult(None, "head", [])

    monkeypatch.setattr(rounds, "fit_finetune", fit)
    caplog.set_level(logging.INFO, "hnm_ray")
    rounds.finetune_round(config, cohort["store"], cohort["records"], cohort["selection"], None, 0, None, None, False)
    assert f"positive rows drawn from the top {pool} of 36 positives" in caplog.text  # what the user sees
    rows = captured["rows"]
    drawn = _positive_keys(rows)
    assert drawn <= _top(cohort["selection"], pool)
    assert len(drawn) > 0.8 * pool  # 240 rows drawn with replacement from the pool: (nearly) all of it
    share = tile_batches.worker_share(rows, 0, 1)
    loop = finetune.schedule(config, config.finetune, captured["total_epochs"], True, captured["positive_floor"])
    for epoch in range(captured["first_epoch"], captured["last_epoch"]):
        _, _, ratio = finetune.epoch_batches(loop, share, epoch, 0, 1)
        usable = finetune._usable({**share, "error": np.zeros(len(share["label"]), bool)}, ratio, True)
        assert _positive_keys(rows, usable) == drawn


class _Stop(Exception):
    """Raised by a spy once it has seen what it was after."""


def test_an_adapter_round_applies_the_same_floor(cohort, monkeypatch, tmp_path):
    """finetune.scope adapter: finetune_round -> fit_adapter -> its loop -> epoch_batches gets the round's floor."""
    config = small_config({"run": {"rounds": 2}, "mining": {"min_positives": 20},
                           "finetune": {"epochs_per_round": 2, "warmup_epochs": 1, "scope": "adapter"}})
    seen = []

    def spy(loop, *args):
        seen.append(loop["positive_floor"])
        raise _Stop

    monkeypatch.setattr(finetune, "epoch_batches", spy)
    with pytest.raises(_Stop):
        rounds.finetune_round(config, cohort["store"], cohort["records"], cohort["selection"], tmp_path, 0, None, None,
                              False, round0=cohort["store"])
    assert seen == [pytest.approx(positive_rank_floor(36, 20))]
