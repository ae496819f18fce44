"""Tile grid: level-0 top-left corners of the tissue tiles of a slide, at a pyramid level or a target mpp."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from hnm_ray.config import TilingConfig
from hnm_ray.core.errors import NoTissueError, SlideError
from hnm_ray.slides.reader import SlideReader, SlideInfo
from hnm_ray.slides.tissue import mask_fraction, tissue_mask

GRID_SCHEMA = pa.schema([
    ("tile_id", pa.int32()), ("x", pa.int32()), ("y", pa.int32()),
    ("level", pa.int8()), ("size", pa.int16()), ("tissue_fraction", pa.float32()),
])
MPP_TOLERANCE = 0.05  # a level within 5% of the target mpp counts as that mpp (0.502 um/px is 20x)


def tile_geometry(info: SlideInfo, config: TilingConfig) -> tuple[int, int, float]:
    """(level, px to read at that level, level-0 extent of one tile) for a slide and a tiling config."""
    if config.mpp is None:
        if config.level >= info.level_count:
            raise SlideError(info.slide_id, f"level {config.level} does not exist (the slide has {info.level_count})",
                             "choose a lower level or tile by mpp")
        return config.level, config.tile_size, config.tile_size * info.level_downsamples[config.level]
    base = info.mpp or config.fallback_mpp
    if base is None:
        raise SlideError(info.slide_id, f"the slide has no MPP in its metadata, so it cannot be tiled at {config.mpp} um/px",
                         "set --tiling.fallback_mpp (the scanner's um/px at level 0) or tile by level instead")
    mpps = np.asarray(info.level_downsamples) * base
    fine_enough = np.flatnonzero(mpps <= config.mpp * (1 + MPP_TOLERANCE))
    level = int(fine_enough.max()) if len(fine_enough) else 0
    size = int(round(config.tile_size * config.mpp / mpps[level]))
    return level, size, size * info.level_downsamples[level]


def tile_grid(reader: SlideReader, config: TilingConfig | None = None) -> pa.Table:
    """Tissue tiles of a slide (GRID_SCHEMA, row-major tile ids); NoTissueError when no tile has enough tissue."""
    config = config or TilingConfig()
    info = reader.info
    level, size, extent = tile_geometry(info, config)
    stride = (config.stride or config.tile_size) * extent / config.tile_size
    w0, h0 = info.level_dimensions[0]
    xs = np.arange(0, w0 - extent + 1, stride)
    ys = np.arange(0, h0 - extent + 1, stride)
    if len(xs) == 0 or len(ys) == 0:
        raise SlideError(info.slide_id, f"the slide ({w0}x{h0} px) is smaller than one tile ({extent:.0f} level-0 px)",
                            "use a smaller tile_size or a finer mpp")
    mask = tissue_mask(reader.thumbnail(config.tissue.thumbnail_size, config.tissue.max_decoded_pixels), config.tissue)
    gx, gy = np.meshgrid(xs, ys)
    fraction = mask_fraction(mask, (w0, h0), gx, gy, extent)
    rows, cols = np.nonzero(fraction >= max(config.min_tissue, 1e-9))
    if len(rows) == 0:
        raise NoTissueError(info.slide_id, f"no tile holds >= {config.min_tissue:.0%} tissue (tissue covers "
                            f"{mask.mean():.1%} of the thumbnail)",
                            "check the slide, or lower --tiling.tissue.min_saturation / --tiling.min_tissue for faint tissue")
    n = len(rows)
    mpp0 = info.mpp or config.fallback_mpp
    return pa.table({
        "tile_id": np.arange(n, dtype=np.int32),
        "x": np.floor(xs[cols]).astype(np.int32),
        "y": np.floor(ys[rows]).astype(np.int32),
        "level": np.full(n, level, np.int8),
        "size": np.full(n, size, np.int16),
        "tissue_fraction": fraction[rows, cols].astype(np.float32),
    }, schema=GRID_SCHEMA.with_metadata({
        "slide_id": info.slide_id, "tile_size": str(config.tile_size), "extent_level0": f"{extent:g}",
        "tile_mpp": "" if mpp0 is None else f"{mpp0 * extent / config.tile_size:g}",
    }))
