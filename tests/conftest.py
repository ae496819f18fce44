"""Shared fixtures: one local Ray session for the whole suite and a small demo cohort."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One `ray.init(num_cpus=2)` shared by every test that needs Ray; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 namespace="hnm_ray", configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> Path:
    """A small deterministic demo cohort (manifest.csv + slides + masks), made once per session."""
    from hnm_ray.slides.synthetic import make_demo_cohort

    out = tmp_path_factory.mktemp("demo")
    return make_demo_cohort(out, n_slides=8, seed=0, size=2048)
