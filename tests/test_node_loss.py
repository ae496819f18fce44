"""Node loss on a multi-node Ray cluster: a whole node dies (spot preemption, OOM kill, a lost VM), the job goes on.

The harness (`LocalCluster`) is `ray.cluster_utils.Cluster` on this one machine: a head with no CPUs (GCS and the
drivers' node: Train controllers are pinned there) and 3 worker nodes of 1 logical CPU each, every stage asking
for 0.5-1 CPU, so it fits 2 cores. The Cluster is started with `connect=False`: the job under test runs as a
subprocess driver with RAY_ADDRESS=<cluster address>, exactly as under `ray job submit`, and this test process keeps
the suite's shared local Ray session (`ray_session`) untouched. The test process reads the cluster's GCS through
the Cluster's own GlobalState (actors, their nodes) and kills the node it chooses, with `remove_node(node,
allow_graceful=False)` (SIGKILL of its raylet, object store, agents and workers); a fresh node replaces it before
the next test.

Each test compares the run that lost a node with a fault-free run of the same stage on the same cohort and prints
one `node-loss figures:` JSON line (time to recover, what was redone) for the README table.

The cluster tests (marker `cluster`, ~3.5 min on 2 cores) are left out of the default run (`pytest -q`, the README's
and CI's command, kept under 8 minutes); run them with `pytest -m cluster`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from _support import wait_for as _wait

WORKER_NODES = 3
NODE_CPUS = 1
WORKER_RESOURCE = "node_loss_worker"  # worker nodes only: tests/_mine_driver.py places the miner with it
SMALL = ["--encoder.name", "small_cnn", "--extract.dtype", "float32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_ports() -> dict[str, int]:
    """Explicit agent ports for one node: the suite's local Ray (and other Rays on the machine) may hold the defaults."""
    return {name: _free_port() for name in ("dashboard_agent_listen_port", "metrics_agent_port", "metrics_export_port",
                                            "runtime_env_agent_port")}


class LocalCluster:
    """A head + WORKER_NODES worker nodes on this machine; drivers run as subprocesses joining it by RAY_ADDRESS."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(
            num_cpus=0, include_dashboard=False, gcs_server_port=_free_port(), ray_client_server_port=_free_port(),
            _system_config={"agent_register_timeout_ms": 120_000}, **_agent_ports()))
        self._forget_address()
        self.top_up()

    @property
    def address(self) -> str:
        """The GCS address drivers join (RAY_ADDRESS)."""
        return self.cluster.address

    def top_up(self) -> None:
        """Add worker nodes until there are WORKER_NODES alive (after a test killed one)."""
        while len(self.cluster.worker_nodes) < WORKER_NODES:
            self.cluster.add_node(num_cpus=NODE_CPUS, resources={WORKER_RESOURCE: 1.0}, wait=False, **_agent_ports())
        self.cluster.wait_for_nodes(timeout=60)

    def actors(self, class_part: str = "") -> list[dict[str, Any]]:
        """Actors the GCS knows (State, NodeID, Pid, NumRestarts, Name, ...) whose class name contains `class_part`."""
        table = self.cluster.global_state.actor_table(None)
        return [{**a, "NodeID": a["Address"]["NodeID"]} for a in table.values() if class_part in a["ActorClassName"]]

    def alive(self, class_part: str) -> list[dict[str, Any]]:
        """ALIVE actors whose class name contains `class_part`."""
        return [a for a in self.actors(class_part) if a["State"] == "ALIVE"]

    def kill_node(self, node_id: str) -> None:
        """SIGKILL every process of the worker node `node_id` (a lost VM); the head may not be chosen."""
        if node_id == self.cluster.head_node.node_id:
            pytest.fail("the stage to kill runs on the head node; only worker nodes may be killed")
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)

    def driver(self, args: list[str], tmp_path: Path, **kwargs: Any) -> subprocess.Popen:
        """Start `python args...` as a driver of this cluster (RAY_ADDRESS), output to tmp_path/driver.log."""
        env = {**os.environ, "RAY_ADDRESS": self.address, "HNM_RAY_CACHE": str(tmp_path / "cache")}
        log = open(tmp_path / "driver.log", "ab")
        return subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=subprocess.STDOUT, **kwargs)

    def run(self, args: list[str], tmp_path: Path, timeout: float = 300) -> str:
        """Run a driver to the end; fail with its log when it exits non-zero. Returns the log."""
        proc = self.driver(args, tmp_path)
        code = proc.wait(timeout)
        log = (tmp_path / "driver.log").read_text(errors="replace")
        assert code == 0, f"driver {args} exited {code}:\n{log[-4000:]}"
        return log

    def _forget_address(self) -> None:
        """Remove the head's address from /tmp/ray/ray_current_cluster, where Cluster wrote it: a plain `ray.init()`
        (the suite's `ray_session`, another job on this machine) would join this cluster instead of starting its own."""
        from ray._common.utils import get_ray_address_file
        from ray._private.utils import read_ray_address

        if read_ray_address() == self.address:
            Path(get_ray_address_file(None)).unlink(missing_ok=True)

    def shutdown(self) -> None:
        """Stop every node of the cluster (not Cluster.shutdown: it deletes whatever address file is there)."""
        for node in list(self.cluster.worker_nodes):
            self.cluster.remove_node(node, allow_graceful=False)
        self.cluster.remove_node(self.cluster.head_node, allow_graceful=False)


@pytest.fixture(scope="module")
def cluster() -> LocalCluster:
    """One local multi-node cluster per module; each test gets it topped up to WORKER_NODES worker nodes."""
    started = LocalCluster()
    yield started
    started.shutdown()


@pytest.fixture
def nodes(cluster: LocalCluster) -> LocalCluster:
    """The module's cluster with every worker node alive."""
    cluster.top_up()
    return cluster


def _clean_exit(proc: subprocess.Popen, tmp_path: Path, since: float) -> tuple[float, str]:
    """Wait for the driver to end (killed after 240 s) and check it exited 0 (the log's tail is the failure message).
    Returns (seconds since `since`, the driver's log)."""
    try:
        code = proc.wait(240)
    finally:
        proc.kill()
    seconds = time.monotonic() - since
    log = (tmp_path / "driver.log").read_text(errors="replace")
    assert code == 0, log[-4000:]
    return seconds, log


def _figures(test: str, **figures: Any) -> None:
    """One JSON line of the figures the README's cluster table quotes (run pytest -s to see it)."""
    print(f"node-loss figures: {json.dumps({'test': test, **figures}, default=float)}")


# ---------------------------------------------------------------------------------------- extraction

def _extract_args(manifest: Path, out: Path) -> list[str]:
    return ["-m", "hnm_ray.extract", "--manifest", str(manifest), "--out", str(out), *SMALL,
            "--extract.batch_size", "8", "--extract.cpus_per_encoder", "0.5", "--extract.cpus_per_decoder", "0.5"]


@pytest.fixture(scope="module")
def features(cluster: LocalCluster, demo_cohort: Path, tmp_path_factory) -> Path:
    """The fault-free extraction of the demo cohort on the cluster: the reference store root."""
    folder = tmp_path_factory.mktemp("features")
    cluster.top_up()
    cluster.run(_extract_args(demo_cohort, folder / "store"), folder)
    return folder / "store"


def _slide_files(root: Path) -> dict[str, Path]:
    return {p.name[: -len(".parquet")]: p for p in sorted(root.rglob("round=0/*.parquet"))}


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_extraction_node_dies_mid_extraction(nodes, features, demo_cohort, tmp_path):
    """SIGKILL the node of the encoder actor once the first slide is written: Ray Data restarts the actor on another
    node and re-runs the lost tasks; every slide is written once, each equal to the fault-free extraction."""
    reference = _slide_files(features)
    out = tmp_path / "store"
    proc = nodes.driver(_extract_args(demo_cohort, out), tmp_path)
    try:
        encoder = _wait(lambda: [a for a in nodes.alive("TileEncoder") if _slide_files(out)], 180,
                        "the first slide written while the encoder actor is alive", every=0.02)[0]
        written_before = set(_slide_files(out))
        killed_at = time.monotonic()
        nodes.kill_node(encoder["NodeID"])
    except BaseException:
        proc.kill()
        raise
    recovered, _ = _clean_exit(proc, tmp_path, killed_at)
    assert 1 <= len(written_before) < len(reference), f"not mid-extraction: {len(written_before)} slides written"
    restarted = [a for a in nodes.actors("TileEncoder") if a["NodeID"] != encoder["NodeID"]]
    assert restarted, "no encoder actor ran on another node after the kill"
    written = _slide_files(out)
    assert sorted(written) == sorted(reference)
    for slide_id, path in written.items():  # nothing lost, duplicated or reordered: equal to the fault-free file
        table, expected = pq.read_table(path), pq.read_table(reference[slide_id])
        assert table.column_names == expected.column_names
        np.testing.assert_array_equal(table["tile_id"].to_numpy(), expected["tile_id"].to_numpy())
        np.testing.assert_array_equal(np.stack(table["embedding"].to_numpy(zero_copy_only=False)),
                                      np.stack(expected["embedding"].to_numpy(zero_copy_only=False)))
    assert not list(out.rglob("errors.jsonl")), "a slide was recorded as failed"
    _figures("extraction", slides=len(reference), slides_written_before_kill=len(written_before),
             slides_written_after=len(reference) - len(written_before), seconds_kill_to_done=recovered)


# ---------------------------------------------------------------------------------------- MIL on Ray Train

MIL_EPOCHS = 6
TIMING_KEYS = {"epoch_seconds", "reported_at"}


def _mil_args(store_root: Path, manifest: Path, out: Path) -> list[str]:
    tag = next(store_root.glob("*/round=0")).parent.name
    return ["-m", "hnm_ray.training.mil", "--store", str(store_root), "--tag", tag, "--manifest", str(manifest),
            "--out", str(out), "--mil.workers", "2", "--mil.cpus_per_worker", str(NODE_CPUS), "--mil.epochs",
            str(MIL_EPOCHS), "--mil.checkpoint_every", "1", "--mil.max_failures", "2", "--mil.ensemble", "1"]


def _reports(out: Path) -> dict[str, Any]:
    """Ray Train V2's controller state (one report a line of `current_report_index`), or {} before the first."""
    try:
        return json.loads(next(out.rglob("checkpoint_manager_snapshot.json")).read_text())
    except (StopIteration, OSError, ValueError):
        return {}


def _without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def mil_reference(cluster: LocalCluster, features: Path, demo_cohort: Path, tmp_path_factory) -> Path:
    """The fault-free 2-worker MIL run on the cluster (its out folder: metrics.json, the aggregator)."""
    folder = tmp_path_factory.mktemp("mil_reference")
    cluster.top_up()
    cluster.run(_mil_args(features, demo_cohort, folder / "run"), folder)
    return folder / "run"


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_mil_train_worker_node_dies_mid_training(nodes, features, mil_reference, demo_cohort, tmp_path):
    """SIGKILL the node of one of the 2 Train workers after 2 epoch reports: FailureConfig restarts the worker
    group on the remaining nodes from the last checkpoint, and the run ends with the fault-free run's model and
    metrics exactly (seeded pairing, dropout 0, state restored at epoch ends: the job is deterministic)."""
    from safetensors.numpy import load_file

    out = tmp_path / "run"
    proc = nodes.driver(_mil_args(features, demo_cohort, out), tmp_path)
    try:
        workers = _wait(lambda: len(w := nodes.alive("RayTrainWorker")) == 2 and _reports(out).get(
            "current_report_index", 0) >= 2 and w, 180, "2 Train workers and 2 reports", every=0.02)
        reports_at_kill = _reports(out)["current_report_index"]
        assert len({w["NodeID"] for w in workers}) == 2, "both Train workers run on one node"
        killed_at = time.monotonic()
        nodes.kill_node(workers[0]["NodeID"])
        fresh = _wait(lambda: [w for w in nodes.alive("RayTrainWorker") if w["ActorID"] not in
                               {x["ActorID"] for x in workers}], 120, "a new Train worker group")
        regrouped = time.monotonic() - killed_at
    except BaseException:
        proc.kill()
        raise
    done, log = _clean_exit(proc, tmp_path, killed_at)
    assert reports_at_kill < MIL_EPOCHS, "training ended before the kill"
    assert workers[0]["NodeID"] not in {w["NodeID"] for w in fresh}
    state = _reports(out)
    assert state["latest_checkpoint_result"]["metrics"]["epoch"] == MIL_EPOCHS - 1
    # Resumed, not restarted: each epoch reported once (the one in flight at the kill at most twice); a restart
    # from scratch would have reported reports_at_kill + MIL_EPOCHS times.
    assert MIL_EPOCHS <= state["current_report_index"] <= MIL_EPOCHS + 1, state["current_report_index"]
    metrics = json.loads((out / "metrics.json").read_text())
    reference = json.loads((mil_reference / "metrics.json").read_text())
    assert _without_timings(metrics) == _without_timings(reference)
    weights, expected = load_file(out / "mil_aggregator.safetensors"), load_file(mil_reference / "mil_aggregator.safetensors")
    assert weights.keys() == expected.keys()
    for key in weights:
        np.testing.assert_array_equal(weights[key], expected[key], err_msg=key)
    _figures("mil", epochs=MIL_EPOCHS, reports_at_kill=reports_at_kill,
             reports_total=state["current_report_index"], seconds_kill_to_new_group=regrouped,
             seconds_kill_to_done=done)


# ---------------------------------------------------------------------------------------- the miner actor

@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_miner_node_dies_between_pushes(nodes, features, mil_reference, demo_cohort, tmp_path):
    """SIGKILL the node of the HardNegativeMiner between two waves of pushes: the actor restarts on another node from
    its snapshot, mining pushes the lost scores again, and the round's hard negatives equal the fault-free round's."""
    tag = next(features.glob("*/round=0")).parent.name
    out = tmp_path / "out"
    out.mkdir()
    script = Path(__file__).with_name("_mine_driver.py")
    proc = nodes.driver([str(script), str(features), tag, str(demo_cohort),
                         str(mil_reference / "mil_aggregator.safetensors"), str(out)], tmp_path)
    name = "node-loss-miner-fault"
    try:
        _wait(lambda: (out / "pushed").exists() or proc.poll() is not None, 240, "the first wave of pushes")
        assert proc.poll() is None, (tmp_path / "driver.log").read_text(errors="replace")[-4000:]
        miner = next(a for a in nodes.alive("HardNegativeMiner") if a["Name"] == name)
        killed_at = time.monotonic()
        nodes.kill_node(miner["NodeID"])
        (out / "killed").write_text(miner["NodeID"])
        back = _wait(lambda: [a for a in nodes.alive("HardNegativeMiner") if a["Name"] == name
                              and a["NumRestarts"] >= 1], 120, "the miner to restart")[0]
        restarted = time.monotonic() - killed_at
    except BaseException:
        proc.kill()
        raise
    done, log = _clean_exit(proc, tmp_path, killed_at)
    assert back["NodeID"] != miner["NodeID"]
    stats = json.loads((out / "fault_stats.json").read_text())
    assert stats["restored_from"], "the restarted miner did not restore its snapshot"
    assert stats["seen"] == stats["n_neg_total"], stats  # every negative tile's score is in the queue, once
    # The pushes of the first wave died with the miner: pushed again from the scores table, or by a second scoring
    # pass when the second wave itself met the dying node (Ray had not yet marked it dead).
    recovered_by = [m for m in ("pushing the lost scores again", "scoring again") if m in log]
    assert recovered_by, log[-4000:]
    hard, reference = (pq.read_table(out / f"{n}_hard_negatives.parquet") for n in ("fault", "ref"))
    assert hard.num_rows == json.loads((out / "ref_stats.json").read_text())["k"] > 0
    # The same tiles in the same order; a slide scored again ran on another node with its own torch thread count, and
    # float32 sums in another order differ in the last bit (seen: 0.6775374 vs 0.6775375), so scores match to 1e-5.
    for column in ("slide_id", "tile_id"):
        assert hard.column(column).equals(reference.column(column)), column
    np.testing.assert_allclose(hard.column("score").to_numpy(), reference.column("score").to_numpy(), rtol=1e-5)
    _figures("miner", hard_negatives=hard.num_rows, negative_tiles=stats["n_neg_total"],
             tiles_pushed_before_kill=int((out / "pushed").read_text()), recovered_by=recovered_by,
             seconds_kill_to_restart=restarted,
             seconds_kill_to_done=done)


# ---------------------------------------------------------------------------------------- the driver (spot preemption)

JOB = ["--rounds", "1", "--epochs-per-round", "1", "--warmup-epochs", "0", "--mil.epochs", "4", "--mil.workers", "0",
       "--finetune.workers", "0", "--finetune.batch_size", "32", "--heatmaps", "0", "--pretrain.method", "none",
       "--mil.ensemble", "1", *SMALL]


def _job_args(features: Path, manifest: Path, runs: Path, name: str) -> list[str]:
    return ["-m", "hnm_ray.train", "--manifest", str(manifest), "--run.store", str(features), "--runs-dir", str(runs),
            "--run.name", name, *JOB]


def _rounds(run: Path) -> list[dict[str, Any]]:
    """Each round's metrics without paths (what must not depend on a preemption and resume)."""
    drop = ("model_path", "encoder_weights")
    return [{k: v for k, v in r.items() if k not in drop} for r in json.loads((run / "metrics.json").read_text())["rounds"]]


@pytest.mark.cluster
@pytest.mark.timeout(400)
def test_driver_sigterm_mid_round_then_resume_finishes_the_job(nodes, features, demo_cohort, tmp_path):
    """SIGTERM the driver (a spot preemption of its node) once round 0's hard negatives are mined: the job stops,
    `--resume` on the cluster keeps the finished stages and ends with the fault-free job's metrics."""
    runs = tmp_path / "runs"
    (tmp_path / "ref").mkdir()
    nodes.run(_job_args(features, demo_cohort, runs, "ref"), tmp_path / "ref")
    run = runs / "preempted"
    proc = nodes.driver(_job_args(features, demo_cohort, runs, "preempted"), tmp_path)
    try:
        _wait(lambda: "mining_round0" in _state(run) or proc.poll() is not None, 240, "round 0's mining")
        assert proc.poll() is None, "the job ended before it could be preempted"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        proc.kill()
    log = (tmp_path / "driver.log").read_text(errors="replace")
    assert code == 128 + signal.SIGTERM and not (run / "metrics.json").exists(), log[-4000:]
    assert "received SIGTERM" in log and "--resume" in log
    finished = set(_state(run))
    stamp = (run / "metrics_round0.json").stat().st_mtime_ns
    started = time.monotonic()
    nodes.run(["-m", "hnm_ray.train", "--resume", str(run)], tmp_path)
    resumed = time.monotonic() - started
    assert (run / "metrics_round0.json").stat().st_mtime_ns == stamp, "round 0's MIL ran again"
    assert _rounds(run) == _rounds(runs / "ref")
    _figures("driver", stages_done_at_sigterm=sorted(s for s in finished if s != "seconds"), exit_code=code,
             seconds_resume=resumed)


def _state(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def test_an_error_ray_cannot_recover_from_is_one_line_and_exit_code_3(capsys):
    """A Ray failure that reaches a CLI (retries spent, a node lost with no restarts left) is one line saying the same
    command continues the job, and exit code 3; other exceptions still propagate."""
    import ray.exceptions

    from hnm_ray.run.cli import entry_point

    @entry_point
    def lost(argv=None) -> int:
        raise ray.exceptions.ActorDiedError()

    @entry_point
    def bug(argv=None) -> int:
        raise KeyError("ours")

    assert lost([]) == 3
    lines = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "Ray could not recover from a failure (ActorDiedError" in lines[0], lines
    assert "--resume" in lines[0]
    with pytest.raises(KeyError):
        bug([])
