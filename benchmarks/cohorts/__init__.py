"""Benchmark cohorts built from real images (beside the synthetic demo cohort in hnm_ray.slides.synthetic)."""
