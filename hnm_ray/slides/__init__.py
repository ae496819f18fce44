"""Slides: cuCIM reader, tissue detection, tile grid, annotations and the synthetic demo cohort."""
from hnm_ray.slides.annotation import load_annotation, tile_truth
from hnm_ray.config import TilingConfig, TissueConfig
from hnm_ray.slides.grid import GRID_SCHEMA, tile_geometry, tile_grid
from hnm_ray.slides.reader import SlideInfo, SlideReader, open_slide
from hnm_ray.slides.synthetic import make_demo_cohort
from hnm_ray.slides.tissue import tissue_mask

__all__ = [
    "GRID_SCHEMA", "SlideInfo", "SlideReader", "TilingConfig", "TissueConfig", "load_annotation",
    "make_demo_cohort", "open_slide", "tile_geometry", "tile_grid", "tile_truth", "tissue_mask",
]
