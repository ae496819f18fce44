"""Driver of tests/test_node_loss.py's miner test: one round's mining twice on a cluster (RAY_ADDRESS).

    python tests/_mine_driver.py STORE_ROOT TAG MANIFEST MODEL OUT

First fault-free (miner `ref`), then with scoring in two waves (miner `fault`): after the first wave's pushes the
driver writes OUT/pushed and waits for OUT/killed (the test kills the miner's node meanwhile), then scores the rest.
Each run's hard negatives go to OUT/<miner>_hard_negatives.parquet, the miner's stats to OUT/<miner>_stats.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hnm_ray.mining import pseudo_labels
from hnm_ray.run.cluster import init_ray
from hnm_ray.config import MiningConfig
from hnm_ray.mining.miner import get_miner
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import load_manifest

MINER_PREFIX = "node-loss-miner-"
WORKER_RESOURCE = "node_loss_worker"  # tests/test_node_loss.py gives it to every worker node


def mine(name: str, store: FeatureStore, manifest: str, model: str, out: Path) -> None:
    """One round's mining with the miner named MINER_PREFIX + name; writes its hard negatives and stats."""
    import ray

    records = load_manifest(manifest, seed=0)
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    # Hold a handle, as the job's driver does for a round: a non-detached actor without one is garbage collected.
    # Only worker nodes have WORKER_RESOURCE: the miner never lands on the head (0 CPUs, but a 0-CPU actor may go
    # there), whose loss the test does not simulate. It takes no CPU, so the scoring stage still fits after a kill.
    miner = get_miner(MINER_PREFIX + name, snapshot_path=str(run_dir / "miner_snapshot.npz"),
                      resources={WORKER_RESOURCE: 0.01})
    selection = pseudo_labels.mine_round(MiningConfig(), store, records, model, run_dir, 0, MINER_PREFIX + name, 0.2)
    pq.write_table(selection.hard_negatives, out / f"{name}_hard_negatives.parquet")
    (out / f"{name}_stats.json").write_text(json.dumps(ray.get(miner.stats.remote()), default=float))


def main(store_root: str, tag: str, manifest: str, model: str, out: str) -> None:
    """The fault-free round, then the round whose scoring pauses for the node kill between two waves of pushes."""
    folder = Path(out)
    init_ray()
    store = FeatureStore(store_root, tag, round=0)
    mine("ref", store, manifest, model, folder)
    score_tiles = pseudo_labels.score_tiles

    def two_waves(model_path, store, records, out_path, miner_name=None, plugin=None) -> pa.Table:
        half = len(records) // 2
        first = score_tiles(model_path, store, records[:half], Path(out_path).with_suffix(".wave1"), miner_name,
                            plugin=plugin)
        (folder / "pushed").write_text(str(first.num_rows))
        while not (folder / "killed").exists():
            time.sleep(0.05)
        second = score_tiles(model_path, store, records[half:], Path(out_path).with_suffix(".wave2"), miner_name,
                             plugin=plugin)
        table = pa.concat_tables([first, second]).sort_by([("slide_id", "ascending"), ("tile_id", "ascending")])
        pq.write_table(table, out_path)
        return table

    pseudo_labels.score_tiles = two_waves
    mine("fault", store, manifest, model, folder)


if __name__ == "__main__":
    main(*sys.argv[1:])
