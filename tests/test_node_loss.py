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
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
import pytest

WORKER_NODES = 3
NODE_CPUS = 1
SMALL = ["--encoder.name", "small_cnn", "--extract.dtype", "float32"]
pytestmark = pytest.mark.slow


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
        self.top_up()

    @property
    def address(self) -> str:
        """The GCS address drivers join (RAY_ADDRESS)."""
        return self.cluster.address

    def top_up(self) -> None:
        """Add worker nodes until there are WORKER_NODES alive (after a test killed one)."""
        while len(self.cluster.worker_nodes) < WORKER_NODES:
            self.cluster.add_node(num_cpus=NODE_CPUS, wait=False, **_agent_ports())
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

    def shutdown(self) -> None:
        """Stop every node of the cluster."""
        self.cluster.shutdown()


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


def _wait(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


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
        code = proc.wait(240)
    finally:
        proc.kill()
    recovered = time.monotonic() - killed_at
    log = (tmp_path / "driver.log").read_text(errors="replace")
    assert code == 0, log[-4000:]
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
