"""Hard negative mining: the exact global top-k queue, the Ray miner actor, positive selection."""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest

from hnm_ray.core.errors import ConfigError, HnmError
from hnm_ray.mining.miner import HardNegativeMiner, get_miner
from hnm_ray.mining.queue import TopKQueue, n_hard_negatives
from hnm_ray.mining.selection import positive_ratio, select_hard_negatives_local, select_positives


def random_rows(n: int, n_slides: int, seed: int, decimals: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (slide_id, tile_id) rows with rounded scores, so that ties at the k-th score are common."""
    rng = np.random.default_rng(seed)
    slides = rng.integers(0, n_slides, n)
    names = np.array([f"slide_{i:02d}" for i in rng.permutation(n_slides)])
    tiles = np.zeros(n, dtype=np.int32)
    for s in range(n_slides):
        where = np.flatnonzero(slides == s)
        tiles[where] = rng.permutation(len(where) * 2)[: len(where)]
    return names[slides], tiles, rng.random(n).round(decimals).astype(np.float32)


def reference_top_k(slide_ids, tile_ids, scores, k: int) -> list[tuple[str, int, float]]:
    """numpy sort-based top-k: greatest score per (slide_id, tile_id), then score desc, slide_id, tile_id."""
    names, slide_codes = np.unique(np.asarray(slide_ids), return_inverse=True)  # codes in lexical order
    keys = (slide_codes.astype(np.int64) << 32) | np.asarray(tile_ids, dtype=np.int64)
    order = np.lexsort((-np.asarray(scores, dtype=np.float32), keys))
    keys, best = keys[order], np.asarray(scores, dtype=np.float32)[order]
    first = np.r_[True, keys[1:] != keys[:-1]]
    keys, best = keys[first], best[first]
    top = np.lexsort((keys, -best))[:k]
    return [(str(names[key >> 32]), int(key & 0xFFFFFFFF), float(s)) for key, s in zip(keys[top], best[top])]


def rows(table: pa.Table) -> list[tuple[str, int, float]]:
    return list(zip(table["slide_id"].to_pylist(), table["tile_id"].to_pylist(), table["score"].to_pylist()))


def push_in_random_batches(target, slide_ids, tile_ids, scores, seed: int) -> None:
    rng = np.random.default_rng(seed)
    start = 0
    while start < len(scores):
        stop = start + int(rng.integers(1, 5000))
        target.push(slide_ids[start:stop], tile_ids[start:stop], scores[start:stop])
        start = stop


@pytest.mark.parametrize("k", [1, 7, 1000, 12_000, 50_000])
def test_topk_queue_equals_sort_reference(k):
    slide_ids, tile_ids, scores = random_rows(40_000, n_slides=9, seed=k)
    queue = TopKQueue(k)
    push_in_random_batches(queue, slide_ids, tile_ids, scores, seed=1)
    table = queue.table()
    assert table.schema == pa.schema([("slide_id", pa.string()), ("tile_id", pa.int32()), ("score", pa.float32())])
    expected = reference_top_k(slide_ids, tile_ids, scores, k)
    assert rows(table) == expected
    assert queue.size == min(k, 40_000)
    assert queue.threshold == (expected[-1][2] if k <= 40_000 else None)
    assert queue.pushed == queue.seen == 40_000


def test_topk_queue_is_idempotent_under_repeated_and_raised_pushes():
    slide_ids, tile_ids, scores = random_rows(30_000, n_slides=5, seed=3)
    rng = np.random.default_rng(4)
    again = rng.permutation(30_000)[:20_000]  # retried rows, pushed again in another order, some higher
    raised = scores[again] + np.where(rng.random(20_000) < 0.3, 0.5, 0.0).astype(np.float32)
    all_slides = np.concatenate([slide_ids, slide_ids[again]])
    all_tiles = np.concatenate([tile_ids, tile_ids[again]])
    all_scores = np.concatenate([scores, raised])
    queue = TopKQueue(6_000)
    push_in_random_batches(queue, slide_ids, tile_ids, scores, seed=5)
    push_in_random_batches(queue, slide_ids[again], tile_ids[again], raised, seed=6)
    push_in_random_batches(queue, slide_ids, tile_ids, scores, seed=7)  # a whole shard retried
    table = queue.table()
    assert rows(table) == reference_top_k(all_slides, all_tiles, all_scores, 6_000)
    keys = list(zip(table["slide_id"].to_pylist(), table["tile_id"].to_pylist()))
    assert len(set(keys)) == len(keys) == 6_000
    assert queue.pushed == 80_000 and queue.seen == 30_000 and queue.duplicates > 0
    assert rows(select_hard_negatives_local(pa.table({"slide_id": all_slides, "tile_id": all_tiles, "score": all_scores}),
                                            0.2)) == rows(table)


def test_topk_queue_result_does_not_depend_on_push_order():
    slide_ids, tile_ids, scores = random_rows(20_000, n_slides=6, seed=8, decimals=1)  # heavy ties
    tables = []
    for seed in (0, 1):
        order = np.random.default_rng(seed).permutation(20_000)
        queue = TopKQueue(3_333)
        push_in_random_batches(queue, slide_ids[order], tile_ids[order], scores[order], seed=seed)
        tables.append(queue.table())
    assert tables[0].equals(tables[1])


def test_topk_queue_memory_stays_bounded_by_k_not_n():
    queue = TopKQueue(100, track_seen=False)
    rng = np.random.default_rng(0)
    for start in range(0, 400_000, 10_000):
        queue.push("slide_a", np.arange(start, start + 10_000), rng.random(10_000))
        assert queue.nbytes <= (65_536 + 10_000 + 100) * 12
    assert queue.size == 100 and queue.nbytes == 100 * 12


def test_topk_queue_accepts_arrow_and_single_slide_ids():
    queue = TopKQueue(4)
    queue.push(pa.array(["b", "a", "b"]).dictionary_encode(), np.array([1, 2, 3], dtype=np.int64), [0.5, 0.9, 0.1])
    queue.push(pa.chunked_array([["c"], ["c"]]), [0, 1], np.array([0.5, 0.5]))
    assert queue.push("a", [2], [0.95]) == 1
    assert rows(queue.table()) == [("a", 2, pytest.approx(0.95)), ("b", 1, 0.5), ("c", 0, 0.5), ("c", 1, 0.5)]


@pytest.mark.parametrize("slide_ids, tile_ids, scores, message", [
    ("s", [0, 1], [0.1], "tile_ids for 1 scores"),
    ("s", [-1], [0.1], r"\[0, 2\*\*31\)"),
    ("s", [0.5], [0.1], "must be integers"),
    (["s", None], [0, 1], [0.1, 0.2], "null slide_ids"),
    (["s"], [0, 1], [0.1, 0.2], "1 slide_ids for 2 scores"),
    ("s", [0, 1], [0.1, np.nan], "1 NaN scores .* slide 's'"),
])
def test_topk_queue_rejects_bad_batches(slide_ids, tile_ids, scores, message):
    with pytest.raises(ValueError, match=message):
        TopKQueue(3).push(slide_ids, tile_ids, scores)


def test_n_hard_negatives_is_exact_ceil():
    assert n_hard_negatives(10, 0.7) == 7
    assert n_hard_negatives(11, 0.2) == 3
    assert n_hard_negatives(3, 0.05) == 1
    assert n_hard_negatives(1_000_000, 1.0) == 1_000_000


@pytest.mark.parametrize("n_neg_total, neg_ratio, key", [(100, 0.0, "neg_ratio"), (100, 1.5, "neg_ratio"),
                                                         (100, -0.2, "neg_ratio"), (0, 0.2, "n_neg_total")])
def test_begin_round_validates(n_neg_total, neg_ratio, key):
    with pytest.raises(ConfigError) as info:
        HardNegativeMiner().begin_round(n_neg_total, neg_ratio)
    assert info.value.key == key


def test_miner_round_push_sample_and_stale_rounds():
    miner = HardNegativeMiner()
    with pytest.raises(HnmError, match="begin_round"):
        miner.push("s", [0], [0.5])
    assert miner.begin_round(n_neg_total=1000, neg_ratio=0.2, round=2) == 200
    slide_ids, tile_ids, scores = random_rows(1000, n_slides=4, seed=9)
    push_in_random_batches(miner, slide_ids, tile_ids, scores, seed=10)
    assert miner.push("stale", [0], [1.0], round=1) == 0
    assert rows(miner.hard_negatives()) == reference_top_k(slide_ids, tile_ids, scores, 200)
    stats = miner.stats()
    assert (stats["round"], stats["k"], stats["pushed"], stats["seen"], stats["size"]) == (2, 200, 1000, 1000, 200)
    assert stats["threshold"] == miner.threshold() == rows(miner.hard_negatives())[-1][2]
    first, again = miner.sample(50, seed=1), miner.sample(50, seed=1)
    assert first.equals(again) and first.num_rows == 50
    assert len(set(zip(first["slide_id"].to_pylist(), first["tile_id"].to_pylist()))) == 50
    assert not first.equals(miner.sample(50, seed=2))
    assert miner.sample(500, seed=0).num_rows == 500  # n > k: with replacement
    with pytest.raises(HnmError, match="without replacement"):
        miner.sample(500, seed=0, replace=False)


def test_miner_save_restore_roundtrip(tmp_path):
    miner = HardNegativeMiner(snapshot_path=str(tmp_path / "miner.npz"), autosave_every_n_pushes=3)
    miner.begin_round(n_neg_total=5000, neg_ratio=0.1, round=1)
    slide_ids, tile_ids, scores = random_rows(5000, n_slides=3, seed=11)
    push_in_random_batches(miner, slide_ids, tile_ids, scores, seed=12)
    path = miner.save(str(tmp_path / "snap" / "round1.npz"))
    restored = HardNegativeMiner()
    stats = restored.restore(path)
    assert restored.hard_negatives().equals(miner.hard_negatives())
    assert {k: v for k, v in stats.items() if k not in ("restored_from", "snapshot_path")} == \
        {k: v for k, v in miner.stats().items() if k not in ("restored_from", "snapshot_path")}
    assert not list((tmp_path / "snap").glob(".*tmp"))
    autosaved = HardNegativeMiner(snapshot_path=str(tmp_path / "miner.npz"))  # what a restarted actor does
    assert autosaved.stats()["restored_from"] == str(tmp_path / "miner.npz")
    assert autosaved.stats()["k"] == 500 and autosaved.stats()["pushed"] > 0


def test_positive_ratio_schedule():
    values = [positive_ratio(epoch, warmup=5, total_epochs=12) for epoch in range(13)]
    assert values[:6] == [0.2] * 6
    assert values[8] == pytest.approx(0.5)
    assert values == sorted(values)
    assert values[11] == values[12] == pytest.approx(0.8)
    assert positive_ratio(3, warmup=3, total_epochs=4) == 0.2
    with pytest.raises(ConfigError):
        positive_ratio(0, warmup=10, total_epochs=10)
    with pytest.raises(ConfigError):
        positive_ratio(0, warmup=1, total_epochs=10, ro=0.9, rT=0.5)


def test_select_positives_keeps_top_fraction_above_threshold():
    table = pa.table({"slide_id": ["a", "a", "b", "b", "c", "c", "c"], "tile_id": pa.array([0, 1, 0, 1, 0, 1, 2], pa.int32()),
                      "score": pa.array([0.9, 0.3, 0.6, 0.95, 0.6, 0.1, 0.31], pa.float32()), "x": [1, 2, 3, 4, 5, 6, 7]})
    picked = select_positives(table, threshold=0.3, ratio=0.5)  # 5 tiles above 0.3 -> ceil(2.5) = 3
    assert rows(picked.select(["slide_id", "tile_id", "score"])) == [
        ("b", 1, pytest.approx(0.95)), ("a", 0, pytest.approx(0.9)), ("b", 0, pytest.approx(0.6))]
    assert picked.column_names == table.column_names
    assert select_positives(table, threshold=0.3, ratio=1.0).num_rows == 5
    assert select_positives(table, threshold=0.99, ratio=0.5).num_rows == 0
    with pytest.raises(HnmError, match="sigmoid"):
        select_positives(table.set_column(2, "score", pa.array([3.0] * 7, pa.float32())), ratio=0.5)
    with pytest.raises(ConfigError):
        select_positives(table, ratio=0.0)


@pytest.mark.timeout(120)
def test_actor_matches_sort_reference_under_concurrent_pushes(ray_session):
    ray = ray_session
    slide_ids, tile_ids, scores = random_rows(200_000, n_slides=24, seed=13)
    miner = get_miner("hnm_miner_concurrency")
    try:
        assert ray.get(miner.begin_round.remote(200_000, 0.2)) == 40_000

        @ray.remote(num_cpus=0.25)
        def push_shard(shard: int, slide_part, tile_part, score_part) -> int:
            worker_miner = get_miner("hnm_miner_concurrency", create=False)
            rng = np.random.default_rng(shard)
            refs, start = [], 0
            while start < len(score_part):
                stop = start + int(rng.integers(500, 12_000))
                refs.append(worker_miner.push.remote(slide_part[start:stop], tile_part[start:stop], score_part[start:stop]))
                start = stop
            ray.get(refs)
            return len(refs)

        shards = np.array_split(np.random.default_rng(14).permutation(200_000), 4)
        n_pushes = ray.get([push_shard.remote(i, slide_ids[s], tile_ids[s], scores[s]) for i, s in enumerate(shards)])
        table = ray.get(miner.hard_negatives.remote())
        assert rows(table) == reference_top_k(slide_ids, tile_ids, scores, 40_000)
        stats = ray.get(miner.stats.remote())
        assert (stats["pushed"], stats["seen"], stats["push_calls"]) == (200_000, 200_000, sum(n_pushes))
    finally:
        ray.kill(miner)


@pytest.mark.timeout(120)
def test_actor_killed_after_save_restarts_with_same_queue(ray_session, tmp_path):
    ray = ray_session
    snapshot = tmp_path / "miner.npz"
    miner = get_miner("hnm_miner_restart", snapshot_path=snapshot, max_restarts=3)
    try:
        ray.get(miner.begin_round.remote(10_000, 0.2, 3))
        slide_ids, tile_ids, scores = random_rows(10_000, n_slides=5, seed=15)
        ray.get([miner.push.remote(slide_ids[i:i + 2500], tile_ids[i:i + 2500], scores[i:i + 2500])
                 for i in range(0, 10_000, 2500)])
        before = ray.get(miner.hard_negatives.remote())
        ray.get(miner.save.remote())
        assert ray.get(miner.stats.remote())["restored_from"] is None
        ray.kill(miner, no_restart=False)
        again = get_miner("hnm_miner_restart", create=False)
        stats = ray.get(again.stats.remote())  # task retries wait for the restarted actor
        deadline = time.monotonic() + 60
        while stats["restored_from"] is None and time.monotonic() < deadline:  # ray.kill lands asynchronously: a call
            time.sleep(0.2)                                                     # may still reach the old actor
            stats = ray.get(again.stats.remote())
        assert stats["restored_from"] == str(snapshot)
        assert (stats["round"], stats["k"], stats["pushed"]) == (3, 2000, 10_000)
        assert ray.get(again.hard_negatives.remote()).equals(before)
    finally:
        ray.kill(miner)


def test_a_push_waits_for_a_restarting_miner_and_gives_up_after_its_patience(monkeypatch):
    """While the miner is temporarily unavailable (its node died, Ray restarts it) a batch is pushed again; past the
    patience the error reaches the caller."""
    import ray

    from hnm_ray.mining.miner import HardNegativeMiner, push_scores

    miner, failures = HardNegativeMiner(), {"left": 2}
    miner.begin_round(n_neg_total=3, neg_ratio=0.5, round=0)

    class Remote:
        def __init__(self, method):
            self.method = method

        def remote(self, *args):
            return lambda: self.method(*args)

    class FlakyHandle:
        push = Remote(miner.push)

    def get(call):
        if failures["left"]:
            failures["left"] -= 1
            raise ray.exceptions.ActorUnavailableError("its node died", None)
        return call()

    monkeypatch.setattr(ray, "get", get)
    push_scores(FlakyHandle(), np.array(["a", "a", "b"]), np.array([0, 1, 0]), np.array([0.9, 0.1, 0.5]),
                first_wait_s=0.01)
    assert failures["left"] == 0 and miner.stats()["seen"] == 3
    failures["left"] = 10**6
    with pytest.raises(ray.exceptions.ActorUnavailableError):
        push_scores(FlakyHandle(), np.array(["c"]), np.array([0]), np.array([0.2]), patience_s=0.05, first_wait_s=0.01)
