"""Benchmark cohorts built from real images (beside the synthetic demo cohort in hnm_ray.slides.synthetic)."""
from __future__ import annotations

from pathlib import Path

COHORTS = ("camelyon", "digits")


def cached_cohort(name: str) -> Path:
    """The folder of a benchmark cohort at 64 px tiles, seed 0 (camelyon: the Camelyon16-regime cohort; digits: 160
    slides), written once into the cache ($HNM_RAY_CACHE or ~/.cache/hnm_ray) on first use."""
    from benchmarks.cohorts.camelyon import make_camelyon_cohort
    from benchmarks.cohorts.digits import DigitsConfig, cache_folder, make_digits_cohort

    if name not in COHORTS:
        raise ValueError(f"unknown cohort {name!r}; choose one of {COHORTS}")
    folder = cache_folder() / ("camelyon-seed0" if name == "camelyon" else "digits-n160-px64-seed0")
    if not (folder / "manifest.csv").exists():
        make_camelyon_cohort(folder) if name == "camelyon" else make_digits_cohort(folder, DigitsConfig(tile_px=64))
    return folder
