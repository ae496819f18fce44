"""Peak memory of scoring the largest bag of a store whole vs in chunks (mil.eval_chunk_tiles); prints one JSON line.

Each (aggregator, chunk) runs in a fresh process: the store's largest bag is read (float32, as evaluation reads it),
an aggregator of the store's dim is built (random weights: memory does not depend on them), run once on 64 tiles
(torch's one-time set-up), then `model(features)` runs under `torch.no_grad()`, as `inference.evaluate_bags` calls
it. Peak RSS is sampled every millisecond in a thread (psutil), with glibc told to hand blocks above 64 KiB back to
the system when freed (MALLOC_MMAP_THRESHOLD_); the JSON gives the peak above the RSS before the call (the bag and
the model already held), the seconds, and the largest difference of the chunked logits from the whole bag's.

    PYTHONPATH=. python benchmarks/chunked_eval.py --store /tmp/scale_store --tag scale_synthetic \
        --out benchmarks/results/chunked_eval.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MIB = 2 ** 20
# glibc returns blocks above 64 KiB to the system when freed (mmap), so RSS follows what is alive rather than what
# the allocator kept from the chunks before.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure(store_root: str, tag: str, aggregator: str, chunk: int, out: str) -> None:
    """In this process: score the largest bag with `chunk` (0: whole) and save its logits and memory to `out`."""
    import numpy as np
    import ray  # noqa: F401 - Ray ships psutil in its thirdparty_files
    import torch

    import psutil

    from hnm_ray.models.aggregators import build_standardized
    from hnm_ray.mining.scoring import count_tiles
    from hnm_ray.store.features import FeatureStore

    torch.set_num_threads(1)
    store = FeatureStore(store_root, tag, round=0)
    largest = max(sorted(store.completed()), key=lambda s: count_tiles(store, [s]))
    features = torch.from_numpy(store.read_bag(largest).features)
    torch.manual_seed(0)
    model = build_standardized(aggregator, features.shape[1], eval_chunk=chunk).eval()
    with torch.no_grad():
        model(features[:64])  # torch's one-time set-up (thread pools, kernels) is not the bag's cost
    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.001)

    before = me.memory_info().rss
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    with torch.no_grad():
        inst, bag = model(features)
    seconds = time.perf_counter() - started
    done.set()
    thread.join()
    np.save(out + ".npy", np.append(inst.numpy(), bag.numpy()))
    Path(out).write_text(json.dumps({"slide": largest, "tiles": int(features.shape[0]), "dim": int(features.shape[1]),
                                     "bag_mib": round(features.numel() * 4 / MIB, 1), "seconds": round(seconds, 3),
                                     "rss_before_mib": round(before / MIB), "peak_above_mib": round(
                                         (max(peak[0], me.memory_info().rss) - before) / MIB, 1)}))


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--aggregators", nargs="+", default=["dsmil", "dsmil_its2clr", "abmil"])
    parser.add_argument("--chunks", nargs="+", type=int, default=[0, 8192, 2048], help="0: the whole bag")
    parser.add_argument("--out", default=None)
    parser.add_argument("--measure", nargs=3, metavar=("AGGREGATOR", "CHUNK", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.store, args.tag, args.measure[0], int(args.measure[1]), args.measure[2])
        return
    results = {}
    for aggregator in args.aggregators:
        runs = {}
        for chunk in args.chunks:
            out = f"/tmp/chunked_eval_{os.getpid()}_{aggregator}_{chunk}.json"
            subprocess.run([sys.executable, __file__, "--store", args.store, "--tag", args.tag, "--measure",
                            aggregator, str(chunk), out], check=True,
                           env={**os.environ, "PYTHONPATH": os.getcwd(), **MALLOC})
            runs[chunk] = {**json.loads(Path(out).read_text()), "logits": np.load(out + ".npy")}
            Path(out).unlink()
            Path(out + ".npy").unlink()
        whole = runs[0]["logits"]
        results[aggregator] = {str(c): {**{k: v for k, v in r.items() if k != "logits"},
                                        "max_abs_logit_difference": float(np.abs(r["logits"] - whole).max())}
                               for c, r in runs.items()}
    line = json.dumps({"benchmark": "chunked_eval", "store": args.store, "aggregators": results,
                       "load_avg_1m": round(os.getloadavg()[0], 1)})
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
