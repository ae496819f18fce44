"""`mil.ensemble`'s members trained one after another in this process vs at once as Ray tasks (`fit_members`): the
wall seconds of the same `fit_mil` both ways, in one process (Ray started between them, with the machine's CPUs), the
ratio, and whether the members' weights agree. One JSON line.

    python -m benchmarks.ensemble_tasks --run /tmp/s3/abl0/dsmil_rank_embed_128_seed0 --members 5 \
        --out benchmarks/results/ensemble_tasks.json

`--run`: a finished job's folder (its config.yaml, metrics.json and round-0 store), e.g. an ablation run.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.ablation import emit
from benchmarks.mil_seed_spread import finished_run
from hnm_ray.run.cluster import init_ray
from hnm_ray.training.mil import fit_mil


def timed_fit(config, store, records, folder: Path, seed: int) -> tuple[float, dict]:
    """Seconds of one `fit_mil` and the weights it saved."""
    started = time.perf_counter()
    fitted = fit_mil(config, store, records, folder, name="ensemble", seed=seed)
    return time.perf_counter() - started, load_file(fitted.model_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.getLogger("hnm_ray").setLevel(logging.WARNING)
    run = Path(args.run)
    config, records, store_of = finished_run(run)
    store = store_of(0)
    mil = replace(config.mil, ensemble=args.members, workers=0)
    with tempfile.TemporaryDirectory(prefix="ensemble_tasks_") as work:
        load_before = os.getloadavg()[0]
        in_process, weights = timed_fit(mil, store, records, Path(work) / "in_process", config.run.seed)
        init_ray(num_cpus=os.cpu_count())
        as_tasks, task_weights = timed_fit(mil, store, records, Path(work) / "tasks", config.run.seed)
        load_after = os.getloadavg()[0]
    emit({"benchmark": "ensemble_tasks", "run": str(run), "members": args.members, "cpus": os.cpu_count(),
          "cpus_per_member": mil.cpus_per_worker, "in_process_seconds": round(in_process, 1),
          "ray_tasks_seconds": round(as_tasks, 1), "ratio_tasks_vs_in_process": round(as_tasks / in_process, 3),
          "same_weights": all(torch.equal(weights[k], task_weights[k]) for k in weights),
          "load_1min": [round(load_before, 2), round(load_after, 2)]}, args.out)


if __name__ == "__main__":
    main()
