"""Faults: a killed Ray Train worker, a killed miner actor, a full output disk.

A killed extraction driver (rerun adds exactly the missing slides, no duplicate or lost tile) is
tests/test_extract.py::test_resume_after_the_process_is_killed; it is not repeated here.

Each test kills or starves a real process/resource and checks that the run recovers from its saved state (last
checkpoint, miner snapshot, finished slide files) with nothing duplicated, lost or half-written.
Actor processes are found through the GCS (`ray._private.state.actors()`): the public `ray.util.state` API needs
the dashboard, which the test session does not start, and refuses to guess when several Rays share the machine.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from _support import small_config, store_for
from _support import wait_for as _wait

from hnm_ray.core.errors import StoreError
from hnm_ray.extract import extract_features
from hnm_ray.extraction.index import tile_index
from hnm_ray.store.manifest import load_manifest



def _actors(class_name: str | None = None, actor_id: str | None = None) -> list[dict]:
    """Actors of this session's cluster as the GCS reports them (State, Pid, NumRestarts, ...)."""
    import ray._private.state as state

    if actor_id is not None:
        return [state.actors(actor_id=actor_id)]
    return [a for a in state.actors().values() if class_name is None or a["ActorClassName"] == class_name]


# ---------------------------------------------------------------------------------------- Ray Train worker

@pytest.mark.timeout(600)
def test_killed_train_worker_resumes_from_the_last_checkpoint(ray_session, mil_store, mil_cohort, tmp_path):
    """SIGKILL the RayTrainWorker after 3 epochs: FailureConfig restarts it from the epoch-2 checkpoint."""
    import torch

    from hnm_ray.config import MILConfig
    from hnm_ray.training.mil import CHECKPOINT_FILE, fit_mil

    epochs, kill_after = 8, 3
    config = MILConfig(ensemble=1, epochs=epochs, workers=1, cpus_per_worker=0.5, checkpoint_every=1, max_failures=2)
    records = load_manifest(mil_cohort)
    storage = tmp_path / "run" / "ray_train" / "mil_fault"
    snapshot = storage / "checkpoint_manager_snapshot.json"  # Ray Train V2's controller state, one line a report
    seen: dict[str, int] = {}
    finished = threading.Event()

    def reports() -> int:
        try:
            return int(json.loads(snapshot.read_text())["current_report_index"])
        except (OSError, ValueError, KeyError):
            return 0

    def alive_workers() -> list[int]:
        return [a["Pid"] for a in _actors("RayTrainWorker") if a["State"] == "ALIVE"]

    def killer() -> None:
        while not finished.is_set():
            workers = alive_workers()
            if workers and reports() >= kill_after:
                seen["reports_at_kill"] = reports()
                os.kill(workers[0], signal.SIGKILL)
                seen["killed"] = workers[0]
                break
            time.sleep(0.05)
        while not finished.is_set():
            if fresh := [p for p in alive_workers() if p != seen.get("killed")]:
                seen["restarted"] = fresh[0]
                return
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = fit_mil(config, mil_store, records, tmp_path / "run", name="mil_fault")
    finally:
        finished.set()
        thread.join(10)

    assert "killed" in seen, "the worker finished before it could be killed"
    assert kill_after <= seen["reports_at_kill"] < epochs
    assert seen.get("restarted"), "no new RayTrainWorker came up after the kill"
    state = json.loads(snapshot.read_text())
    assert state["latest_checkpoint_result"]["metrics"]["epoch"] == epochs - 1
    # Resumed, not restarted: every epoch was reported once (the epoch in flight at the kill at most twice).
    # A restart from scratch would have reported reports_at_kill + epochs times.
    assert epochs <= state["current_report_index"] <= epochs + 1, (state["current_report_index"], seen)
    latest = storage / state["latest_checkpoint_result"]["checkpoint_dir_name"] / CHECKPOINT_FILE
    saved = torch.load(latest, map_location="cpu", weights_only=True)
    assert saved["epoch"] == epochs - 1
    assert 0 <= result.best_epoch < epochs and Path(result.model_path).is_file()


# ---------------------------------------------------------------------------------------- miner actor

@pytest.mark.timeout(300)
def test_killed_miner_restores_its_queue_and_the_round_completes_exactly(ray_session, tmp_path):
    import ray

    from hnm_ray.mining.miner import get_miner

    n, neg_ratio = 3000, 0.1
    k = int(np.ceil(n * neg_ratio))
    rng = np.random.default_rng(0)
    slide_ids = np.array([f"neg_{i % 7}" for i in range(n)], dtype=object)
    tile_ids = (np.arange(n) // 7).astype(np.int32)
    scores = (rng.permutation(n) / n).astype(np.float32)  # distinct: a unique top-k
    snap = tmp_path / "miner.npz"
    name = f"fault_miner_{uuid.uuid4().hex[:8]}"
    miner = get_miner(name, snapshot_path=str(snap))
    actor_id = miner._actor_id.hex()
    try:
        assert ray.get(miner.begin_round.remote(n, neg_ratio, 0)) == k
        half = n // 2
        for part in np.array_split(np.arange(half), 3):
            ray.get(miner.push.remote(slide_ids[part].tolist(), tile_ids[part], scores[part]))
        ray.get(miner.save.remote())
        before = ray.get(miner.hard_negatives.remote())
        first = _actors(actor_id=actor_id)[0]
        assert first["State"] == "ALIVE" and before.num_rows == k

        ray.kill(miner, no_restart=False)  # mid-round: the actor process dies, max_restarts brings it back

        def restarted() -> dict | None:
            actor = _actors(actor_id=actor_id)[0]
            alive = actor["State"] == "ALIVE" and actor["NumRestarts"] >= 1 and actor["Pid"] != first["Pid"]
            return actor if alive else None

        _wait(restarted, 120, "the miner actor to restart in a new process")
        stats = ray.get(miner.stats.remote())
        assert stats["restored_from"] == str(snap) and stats["k"] == k and stats["round"] == 0
        assert ray.get(miner.hard_negatives.remote()).equals(before)

        rest = np.arange(half, n)
        ray.get(miner.push.remote(slide_ids[rest].tolist(), tile_ids[rest], scores[rest]))
        final = ray.get(miner.hard_negatives.remote())
    finally:
        ray.kill(miner, no_restart=True)
    top = np.lexsort((tile_ids, slide_ids, -scores))[:k]  # score desc, then slide_id, tile_id
    assert final.column("slide_id").to_pylist() == slide_ids[top].tolist()
    assert final.column("tile_id").to_numpy().tolist() == tile_ids[top].tolist()
    np.testing.assert_array_equal(final.column("score").to_numpy(), scores[top])


# ---------------------------------------------------------------------------------------- extraction driver

@pytest.fixture
def tiny_disk(tmpfs):
    """A 48 KiB tmpfs: room for about two slide files of the demo cohort; skipped where mount is refused."""
    return tmpfs("disk", "size=48k")


@pytest.mark.timeout(600)
def test_full_disk_stops_with_a_clear_error_and_leaves_no_partial_file(ray_session, demo_cohort, tiny_disk):
    config = small_config()
    store = store_for(tiny_disk / "store", config)
    with pytest.raises(StoreError) as info:
        extract_features(load_manifest(demo_cohort, require_labels=False)[:4], store, config)
    message = str(info.value)
    assert "No space left on device" in message and str(store.directory) in message, message
    failed = message.split("'")[1]  # "slide '<id>': cannot write features to <store>/<id>.parquet: ..."
    assert message.startswith(f"slide '{failed}'") and failed not in store.completed()
    leftovers = [p.name for p in store.directory.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temp files left on the full disk: {leftovers}"
    records = {r.slide_id: r for r in load_manifest(demo_cohort, require_labels=False)[:4]}
    assert 1 <= len(store.files()) < len(records)
    for path in store.files():  # the slides written before the disk filled are complete and readable
        slide_id = path.name[: -len(".parquet")]
        table = pq.read_table(path)
        np.testing.assert_array_equal(table["tile_id"].to_numpy(),
                                      tile_index(records[slide_id], config.tiling)["tile_id"].to_numpy())
