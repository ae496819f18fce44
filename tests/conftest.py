"""Shared fixtures: one local Ray session for the whole suite and a small demo cohort."""
from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


RAY_FIXTURES = {"ray_session", "mil_store", "ray_cluster"}


FIRST_MODULES = ("test_node_loss.py",)


def pytest_collection_modifyitems(items):
    """Tests that use the shared Ray session (directly or through a fixture) carry the `ray` marker. The node-loss
    module runs first, before the shared session exists: its multi-node clusters start and kill Ray nodes from this
    process, and in a full run the shared session's GCS died with them (every later Ray test then failed)."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
    items.sort(key=lambda item: item.path.name not in FIRST_MODULES)  # stable: the order within is kept


@pytest.fixture(scope="session")
def ray_session():
    """One `ray.init(num_cpus=2)` shared by every test that needs Ray; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 namespace="hnm_ray", configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def console(caplog):
    """hnm_ray's log lines at INFO (its logger may not propagate to the root logger that caplog watches: where it
    does, a line is in caplog twice)."""
    logger = logging.getLogger("hnm_ray")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="hnm_ray")
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> Path:
    """A small deterministic demo cohort (manifest.csv + slides + masks), made once per session."""
    from hnm_ray.slides.synthetic import make_demo_cohort

    out = tmp_path_factory.mktemp("demo")
    return make_demo_cohort(out, n_slides=8, seed=0, size=2048)


@pytest.fixture(scope="session")
def mil_cohort(tmp_path_factory) -> Path:
    """A 16-slide demo cohort large enough for MIL (4 test slides, ~60 tiles a slide)."""
    from hnm_ray.slides.synthetic import make_demo_cohort

    return make_demo_cohort(tmp_path_factory.mktemp("mil_demo"), n_slides=16, seed=1, size=3072)


@pytest.fixture(scope="session")
def mil_store(ray_session, mil_cohort, tmp_path_factory):
    """Round-0 small_cnn features of `mil_cohort`, extracted once through the real pipeline."""
    from _support import small_config, store_for

    from hnm_ray.extract import extract_features
    from hnm_ray.store.manifest import load_manifest

    config = small_config({"extract": {"batch_size": 64}})
    store = store_for(tmp_path_factory.mktemp("mil_store"), config)
    extract_features(load_manifest(mil_cohort, require_labels=False), store, config)
    return store


@dataclass(frozen=True)
class TinyRun:
    """The suite's one finished tiny job: its folder (runs/, cache/, mlruns/), run folder and console."""

    folder: Path
    run: Path
    done: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def tiny_run(demo_cohort, tmp_path_factory) -> TinyRun:
    """`python -m hnm_ray.train` on `demo_cohort` with TINY_JOB and MLflow tracking, run once for the whole suite:
    the end-to-end, report, MLflow and predict tests all read this run (each job costs a minute on 2 cores)."""
    from _support import TINY_JOB, job_env

    folder = tmp_path_factory.mktemp("tiny_run")
    cmd = [sys.executable, "-m", "hnm_ray.train", "--runs-dir", str(folder / "runs"), "--run.name", "tiny",
           "--manifest", str(demo_cohort), *TINY_JOB, "--tracking", "mlflow", "--tracking-uri", str(folder / "mlruns")]
    done = subprocess.run(cmd, env=job_env(folder / "cache"), capture_output=True, text=True, timeout=550)
    return TinyRun(folder, folder / "runs" / "tiny", done)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, options) -> a tmpfs folder under tmp_path (e.g. "size=48k", "ro"); skips where mount is refused."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs ({options}) here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)
