"""Hard-negative miner throughput and memory: TopKQueue and the Ray actor against a heapq baseline.

Prints one JSON line. Scores arrive per slide in batches of 65,536 tiles (as scoring workers push
them; `queue_mixed_slide_ids`: each batch mixes 50 slides, ids as a numpy str array); k = ceil(neg_ratio * N). Speed comes from an untraced run; peak memory from tracemalloc in a
second run (inputs allocated before tracing; heapq traced at 1M only); the actor reports the bytes
its state holds. The heapq baseline neither dedupes retried pushes nor breaks ties deterministically.
Run: python benchmarks/miner.py > benchmarks/results/miner.json
"""
from __future__ import annotations

import heapq
import json
import platform
import time
import tracemalloc

import numpy as np

from hnm_ray.mining.miner import get_miner
from hnm_ray.mining.queue import TopKQueue, n_hard_negatives

NEG_RATIO = 0.2
BATCH = 65_536
SIZES = (1_000_000, 10_000_000)
HEAPQ_BUDGET_S = 20.0  # heapq on 10M only when 1M took less than a tenth of this


def batches(n: int, seed: int = 0):
    """(slide_id, tile_ids, scores) per slide of BATCH tiles, random float32 scores."""
    scores = np.random.default_rng(seed).random(n, dtype=np.float32)
    tiles = np.arange(BATCH, dtype=np.int32)
    return [(f"slide_{i // BATCH:05d}", tiles[: min(BATCH, n - i)], scores[i:i + BATCH]) for i in range(0, n, BATCH)]


def mixed_batches(n: int, n_slides: int = 50, seed: int = 0):
    """Batches whose rows come from n_slides slides, slide ids as a numpy str array (the slower input path)."""
    scores = np.random.default_rng(seed).random(n, dtype=np.float32)
    names = np.array([f"slide_{i:05d}" for i in range(n_slides)])
    out = []
    for i in range(0, n, BATCH):
        index = np.arange(i, min(i + BATCH, n))
        out.append((names[index % n_slides], (index // n_slides).astype(np.int32), scores[i:i + BATCH]))
    return out


def measure(fn, trace: bool = True) -> tuple[float, float, int | None]:
    """(result, seconds of an untraced run, tracemalloc peak bytes of a second, traced run or None)."""
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    if not trace:
        return result, seconds, None
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def run_queue(data, k: int) -> float:
    queue = TopKQueue(k)
    for slide_id, tiles, scores in data:
        queue.push(slide_id, tiles, scores)
    return queue.threshold


def run_heapq(data, k: int) -> float:
    """Single-process baseline: bounded min-heap of (score, slide_id, tile_id), heappushpop per score."""
    heap: list[tuple[float, str, int]] = []
    for slide_id, tiles, scores in data:
        for tile, score in zip(tiles.tolist(), scores.tolist()):
            if len(heap) < k:
                heapq.heappush(heap, (score, slide_id, tile))
            elif score > heap[0][0]:
                heapq.heappushpop(heap, (score, slide_id, tile))
    return heap[0][0]


def run_actor(ray, data, n: int) -> tuple[float, float, dict]:
    """(threshold, seconds from the first push to the last one done, stats); actor start-up not timed."""
    miner = get_miner("bench_miner")
    try:
        ray.get(miner.begin_round.remote(n, NEG_RATIO))
        start = time.perf_counter()
        refs = []
        for slide_id, tiles, scores in data:
            refs.append(miner.push.remote(slide_id, tiles, scores))
            if len(refs) >= 8:  # bounded in-flight pushes, as a scoring worker would keep
                ray.wait(refs, num_returns=len(refs) - 4)
                refs = refs[-4:]
        ray.get(refs)
        threshold = ray.get(miner.threshold.remote())
        seconds = time.perf_counter() - start
        return threshold, seconds, ray.get(miner.stats.remote())
    finally:
        ray.kill(miner)


def main() -> None:
    import ray

    result: dict = {"benchmark": "miner", "neg_ratio": NEG_RATIO, "batch": BATCH, "goal_scores_per_s": 5e6,
                    "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "runs": []}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="hnm_ray", configure_logging=False)
    heapq_1m_s = None
    try:
        for n in SIZES:
            data = batches(n)
            k = n_hard_negatives(n, NEG_RATIO)
            reference = float(np.sort(np.concatenate([b[2] for b in data]))[n - k])
            row: dict = {"n": n, "k": k}
            threshold, seconds, peak = measure(lambda: run_queue(data, k))
            assert threshold == reference, (threshold, reference)
            row["queue"] = {"seconds": round(seconds, 3), "scores_per_s": round(n / seconds), "peak_bytes": peak,
                            "peak_bytes_per_k": round(peak / k, 1)}
            mixed = mixed_batches(n)
            threshold, seconds, _ = measure(lambda: run_queue(mixed, k), trace=False)
            assert threshold == float(np.sort(np.concatenate([b[2] for b in mixed]))[n - k])
            del mixed
            row["queue_mixed_slide_ids"] = {"seconds": round(seconds, 3), "scores_per_s": round(n / seconds)}
            threshold, seconds, stats = run_actor(ray, data, n)
            assert threshold == reference, (threshold, reference)
            row["actor"] = {"seconds": round(seconds, 3), "scores_per_s": round(n / seconds),
                            "state_bytes": stats["memory_bytes"], "state_bytes_per_k": round(stats["memory_bytes"] / k, 1)}
            if n == SIZES[0] or (heapq_1m_s is not None and heapq_1m_s * n / SIZES[0] <= HEAPQ_BUDGET_S):
                threshold, seconds, peak = measure(lambda: run_heapq(data, k), trace=n == SIZES[0])
                assert threshold == reference, (threshold, reference)
                heapq_1m_s = heapq_1m_s or seconds
                row["heapq"] = {"seconds": round(seconds, 3), "scores_per_s": round(n / seconds), "peak_bytes": peak,
                                "peak_bytes_per_k": round(peak / k, 1) if peak else None}
                row["speedup_queue_vs_heapq"] = round(row["queue"]["scores_per_s"] / row["heapq"]["scores_per_s"], 1)
                row["speedup_actor_vs_heapq"] = round(row["actor"]["scores_per_s"] / row["heapq"]["scores_per_s"], 1)
            else:
                row["heapq"] = f"skipped: 1M took {heapq_1m_s:.1f} s, {n // SIZES[0]}x that exceeds {HEAPQ_BUDGET_S} s"
            result["runs"].append(row)
    finally:
        ray.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
