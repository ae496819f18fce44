"""Extraction pipeline throughput and memory: Ray Data pipeline vs its decode-only and encode-only stages (one JSON line).

On one demo cohort (64 slides of --size px, made in a temp folder): for each encoder, `extract_features` end to end
(tile index + Ray Data index stream -> encoder actor that decodes and encodes -> per-slide Parquet, Ray already
started) against the two stages alone in this process on the same tiles: `TileDecoder` (cuCIM batched reads) and
`TileEncoder.embed` (on pre-decoded tiles, the same torch threads as the pipeline's encoder actor). Efficiency =
pipeline tiles/s / min(decode, encode); `stream` figures start when the driver starts gathering, `steady` ones
also leave out the actor start (first to last actor call, timed inside the actor; on CPUs two calls overlap, one
decoding while the other encodes). The 64-slide run computes every slide's tile index (tissue detection, round 0);
`pipeline_64_slides_stored_index` runs again on the index it stored, as rounds >= 1 and re-runs do, and
`..._one_thread` once more with the encoder actor on 1 torch thread (the baseline of the pool's shared torch threads).
Memory: peak RSS and private memory (RSS - shared) of the driver and of each Ray worker role (index task, encoder;
sampled every 0.1 s) on 16 and on 64 slides; `memory_flat`: private peaks grow < 25% + 64 MiB.
Run: python benchmarks/extract.py > benchmarks/results/extract.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

import hnm_ray.extract as extract
from hnm_ray.run.cluster import live_nodes
from hnm_ray.extraction.encoder_pool import plan_encoder_pool
from hnm_ray.config import TrainConfig, from_tree
from hnm_ray.extraction.decode import TileReaders, decode_batch
from hnm_ray.extract import TileEncoder, extract_features
from hnm_ray.models.encoders import config_tag
from hnm_ray.slides.reader import cuda_available
from hnm_ray.slides.synthetic import make_demo_cohort
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord, load_manifest


class RssSampler:
    """Peak memory of this process and of the Ray workers below it (by role), sampled in a thread every 0.1 s.

    RSS counts the object-store pages a worker has touched (shared memory, bounded by the store), so the private
    part (RSS - shared) is what would show a leak.
    """

    def __init__(self, every_s: float = 0.1) -> None:
        import ray  # noqa: F401 - Ray ships psutil in its thirdparty_files

        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.every_s = every_s
        self.peaks: dict[str, list[int]] = {}  # role -> [peak rss, peak private]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _note(self, role: str, info) -> None:
        peak = self.peaks.setdefault(role, [0, 0])
        peak[0] = max(peak[0], info.rss)
        peak[1] = max(peak[1], info.rss - info.shared)

    def _sample(self) -> None:
        self._note("driver", self.me.memory_info())
        for proc in self.me.children(recursive=True):
            try:
                name = proc.name()
                if name.startswith("ray::") and "IDLE" not in name:
                    role = _role(name)  # a Tune trial's process by its pid: trials are told apart
                    self._note(f"{role}_pid{proc.pid}" if role == "tune_trial" else role, proc.memory_info())
            except self.psutil.Error:
                continue

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, dict[str, float]]:
        mib = 2**20
        return {"peak_mib": {role: {"rss": round(rss / mib), "private": round(private / mib)}
                             for role, (rss, private) in sorted(self.peaks.items())}}


INDEX_COLUMNS = ("slide_id", "path", "tile_id", "x", "y", "level", "size")
CALL_LOG = os.path.join(tempfile.gettempdir(), f"hnm_extract_bench_{os.getpid()}.log")


def _role(name: str) -> str:
    """A Ray worker's job from its process title: index task, encoder actor, Ray Data internals."""
    for key, role in (("ReadTileIndex", "index_task"), ("Encoder", "encoder"), ("TrainWorker", "train_worker"),
                      ("HardNegativeMiner", "miner"), ("ImplicitFunc", "tune_trial")):
        if key in name:
            return role
    return "other"


class TileDecoder:
    """The decode stage alone: tile coordinate rows -> decoded uint8 tiles (cuCIM batched reads on CPU), as the
    encoder actor decodes them."""

    def __init__(self, tile_size: int, num_workers: int = 1) -> None:
        self.tile_size = tile_size
        self.num_workers = num_workers
        self.readers = TileReaders(device="cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tiles, errors = decode_batch(self.readers, batch, self.tile_size, self.num_workers)
        return {**batch, "tiles": tiles, "error": errors}


class TimedEncoder(TileEncoder):
    """TileEncoder that appends (start, end, rows) of each call to CALL_LOG (pickled by value into the actors)."""

    def __call__(self, batch):
        start = time.time()
        out = super().__call__(batch)
        with open(CALL_LOG, "a") as f:
            f.write(f"encode {start:.4f} {time.time():.4f} {len(batch['tile_id'])}\n")
        return out


class StageClock:
    """Swaps the timed stages into the pipeline and notes when the driver starts gathering (= the index is done)."""

    def __init__(self) -> None:
        self.gather_start = float("nan")
        self._saved = (extract.TileEncoder, extract.SlideGatherer.__init__)

    def __enter__(self) -> StageClock:
        clock, init = self, self._saved[1]

        def gatherer_init(gatherer, *args, **kwargs):
            clock.gather_start = time.time()
            init(gatherer, *args, **kwargs)

        Path(CALL_LOG).write_text("")
        extract.TileEncoder, extract.SlideGatherer.__init__ = TimedEncoder, gatherer_init
        return self

    def __exit__(self, *exc: object) -> None:
        extract.TileEncoder, extract.SlideGatherer.__init__ = self._saved

    def phases(self, end: float) -> dict[str, float]:
        """Actor start (gathering begins -> first actor call), busy window (first call start -> last call end)."""
        calls = []
        for line in Path(CALL_LOG).read_text().splitlines():
            _, start, stop, rows = line.split()
            calls.append((float(start), float(stop), int(rows)))
        Path(CALL_LOG).unlink(missing_ok=True)
        first = min(c[0] for c in calls)  # the actor is up and its first batch of tile rows arrived
        last = max(c[1] for c in calls)
        busy = last - first
        return {"actor_start_s": round(first - self.gather_start, 2), "busy_s": round(busy, 2),
                "driver_tail_s": round(end - last, 2), "steady_tiles_per_s": round(sum(c[2] for c in calls) / busy, 1),
                "actor_calls": len(calls)}


def run_pipeline(records: list[SlideRecord], store: FeatureStore, config: TrainConfig,
                 index_root: Path | None = None) -> dict:
    """extract_features end to end (tile index in `index_root`, default the store's), its phases, throughput and
    peak memory."""
    with RssSampler() as rss, StageClock() as clock:
        start = time.time()
        summary = extract_features(records, store, config, index_root)
        end = time.time()
    assert not summary.slides_failed, summary.slides_failed
    wall = end - start
    return {"slides": summary.slides_written, "tiles": summary.tiles_written, "seconds": round(wall, 2),
            "tiles_per_s": round(summary.tiles_written / wall, 1),
            "index_s": round(clock.gather_start - start, 2),
            "stream_s": round(end - clock.gather_start, 2),
            "stream_tiles_per_s": round(summary.tiles_written / (end - clock.gather_start), 1),
            **clock.phases(end), **rss.result()}


def index_batches(store: FeatureStore, paths: dict[str, str], batch_size: int, max_tiles: int | None) -> list[dict]:
    """The pipeline's tile rows (from the store it wrote), cut into batches as Ray Data would hand them."""
    tables = []
    for slide_id in sorted(store.completed()):
        t = store.read_table(slide_id, columns=["slide_id", "tile_id", "x", "y", "level", "size"])
        tables.append(t.append_column("path", pa.array([paths[slide_id]] * t.num_rows)))
    table = pa.concat_tables(tables).select(list(INDEX_COLUMNS))
    if max_tiles:
        table = table.slice(0, max_tiles)
    batches = [{k: table[k][s: s + batch_size].to_numpy(zero_copy_only=False) for k in INDEX_COLUMNS}
               for s in range(0, table.num_rows, batch_size)]
    for batch in batches:  # the stream's bookkeeping columns (see hnm_ray.extraction.index_stream)
        batch["n_tiles"] = np.zeros(len(batch["tile_id"]), np.int64)
        batch["error"] = np.full(len(batch["tile_id"]), "", object)
    return batches


def stage_rates(config: TrainConfig, batches: list[dict], threads: int) -> dict:
    """Decode-only and encode-only tiles/s in this process (best of 2 passes), as the pipeline's stages run them
    (`threads`: the pipeline's encoder torch threads)."""
    n = sum(len(b["tile_id"]) for b in batches)
    tile_size, extract_ = config.tiling.tile_size, config.extract
    decoder = TileDecoder(tile_size, extract_.decode_workers)
    decoder(batches[0])  # open the first slide, warm caches
    best_decode, decoded = 0.0, []
    for _ in range(2):
        start = time.perf_counter()
        decoded = [decoder(b) for b in batches]
        best_decode = max(best_decode, n / (time.perf_counter() - start))
    encoder = TileEncoder(config.encoder, config.run.seed, False, threads, tile_size, extract_.decode_workers)
    encoder.embed(decoded[0]["tiles"])  # warm-up
    best_encode = 0.0
    for _ in range(2):
        start = time.perf_counter()
        for b in decoded:
            encoder.embed(b["tiles"])
        best_encode = max(best_encode, n / (time.perf_counter() - start))
    return {"tiles": n, "decode_tiles_per_s": round(best_decode, 1), "encode_tiles_per_s": round(best_encode, 1),
            "encode_torch_threads": threads}


def main() -> None:
    """Make the cohort, run every measurement, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=64, help="cohort size (memory run); the 16-slide run is a prefix")
    parser.add_argument("--size", type=int, default=2048, help="demo slide width in px")
    parser.add_argument("--resnet-slides", type=int, default=4, help="slides for the resnet18_in pipeline run")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import ray

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        manifest = make_demo_cohort(Path(folder) / "demo", n_slides=args.slides, seed=0, size=args.size)
        cohort_s = time.perf_counter() - started
        cohort = load_manifest(manifest, require_labels=False)
        paths = {r.slide_id: r.path for r in cohort}
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, namespace="hnm_ray",
                 configure_logging=False)

        def config(encoder: str) -> TrainConfig:
            # float16 storage, as this benchmark has always measured (the extract section's default is float32)
            return from_tree(TrainConfig, {"encoder": {"name": encoder},
                                           "extract": {"batch_size": args.batch_size, "dtype": "float16"}})

        def store(config: TrainConfig, out: str) -> FeatureStore:
            return FeatureStore(Path(folder) / out, config_tag(config.encoder), round=0)

        results = {}
        # small_cnn: 16 slides then all 64 (memory must not grow), then both stages alone on the 16-slide tiles.
        small = config("small_cnn")
        pool = plan_encoder_pool(small.extract, False, live_nodes())
        threads = pool.threads
        small16 = store(small, "small16")
        pipe16 = run_pipeline(cohort[:16], small16, small)
        pipe64 = run_pipeline(cohort, store(small, "small64"), small)
        pipe64_stored = run_pipeline(cohort, store(small, "small64_again"), small, index_root=Path(folder) / "small64")
        # Baseline of the shared torch threads: the same run with the encoder actor on 1 thread (the old default).
        shared_threads = extract.plan_encoder_pool
        extract.plan_encoder_pool = lambda *args: dataclasses.replace(shared_threads(*args), threads=1)
        pipe64_one_thread = run_pipeline(cohort, store(small, "small64_one_thread"), small,
                                         index_root=Path(folder) / "small64")
        extract.plan_encoder_pool = shared_threads
        stages = stage_rates(small, index_batches(small16, paths, args.batch_size, None), threads)
        results["small_cnn"] = _efficiency(pipe16, stages)
        results["small_cnn"]["pipeline_64_slides"] = pipe64
        results["small_cnn"]["efficiency_64_slides"] = round(pipe64["tiles_per_s"] / results["small_cnn"]["bound_tiles_per_s"], 3)
        results["small_cnn"]["pipeline_64_slides_stored_index"] = pipe64_stored
        results["small_cnn"]["efficiency_64_slides_stored_index"] = round(
            pipe64_stored["tiles_per_s"] / results["small_cnn"]["bound_tiles_per_s"], 3)
        results["small_cnn"]["pipeline_64_slides_stored_index_one_thread"] = pipe64_one_thread
        results["small_cnn"]["shared_threads_vs_one_thread_tiles_per_s"] = round(
            pipe64_stored["tiles_per_s"] / pipe64_one_thread["tiles_per_s"], 3)
        # resnet18_in on a few slides (about 7 tiles/s per CPU thread here).
        resnet = config("resnet18_in")
        resnet_store = store(resnet, "resnet")
        pipe = run_pipeline(cohort[: args.resnet_slides], resnet_store, resnet)
        stages = stage_rates(resnet, index_batches(resnet_store, paths, args.batch_size, 128), threads)
        results["resnet18_in"] = _efficiency(pipe, stages)
        ray.shutdown()
    memory = {role: {"rss_16_vs_64": [pipe16["peak_mib"][role]["rss"], pipe64["peak_mib"][role]["rss"]],
                     "private_16_vs_64": [pipe16["peak_mib"][role]["private"], pipe64["peak_mib"][role]["private"]]}
              for role in ("driver", "encoder", "index_task") if role in pipe16["peak_mib"] and role in pipe64["peak_mib"]}
    flat = all(m["private_16_vs_64"][1] <= 1.25 * m["private_16_vs_64"][0] + 64 for m in memory.values())
    print(json.dumps({
        "benchmark": "extract", "cohort": {"slides": args.slides, "size_px": args.size, "tile_px": 224, "seconds": round(cohort_s, 1)},
        "resources": {"encoder_cpus": small.extract.cpus_per_encoder, "decode_cpus_per_encoder": small.extract.cpus_per_decoder,
                      "num_encoders": pool.actors, "batch_size": args.batch_size},
        "encoders": results, "memory": memory,
        "memory_flat": flat,
        "target_efficiency": 0.85, "total_s": round(time.perf_counter() - started, 1),
        "machine": {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "cuda_available": cuda_available(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
    }))


def _efficiency(pipe: dict, stages: dict) -> dict:
    bound = min(stages["decode_tiles_per_s"], stages["encode_tiles_per_s"])
    return {"pipeline": pipe, "stages": stages, "bound_tiles_per_s": bound,
            "efficiency": round(pipe["tiles_per_s"] / bound, 3),
            "efficiency_stream": round(pipe["stream_tiles_per_s"] / bound, 3),
            "efficiency_steady": round(pipe["steady_tiles_per_s"] / bound, 3)}


if __name__ == "__main__":
    main()
