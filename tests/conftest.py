"""Shared fixtures: one local Ray session for the whole suite and a small demo cohort."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


RAY_FIXTURES = {"ray_session", "mil_store", "ray_cluster"}


def pytest_collection_modifyitems(items):
    """Tests that use the shared Ray session (directly or through a fixture) carry the `ray` marker."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_session():
    """One `ray.init(num_cpus=2)` shared by every test that needs Ray; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 namespace="hnm_ray", configure_logging=False)
    yield ray
    ray.shutdown()


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
