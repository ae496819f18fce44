"""Tumour annotations: a mask image aligned to level 0 (any scale) and the tile truth it implies."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from hnm_ray.core.errors import SlideError
from hnm_ray.slides.tissue import mask_fraction


def load_annotation(path: str | Path) -> np.ndarray:
    """Tumour mask (bool (H, W)) from an image file; non-zero pixels are tumour, the image spans the whole slide."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L")) > 0
    except (OSError, ValueError) as exc:
        raise SlideError(path.stem, f"cannot read the annotation mask {path} ({exc})",
                         "fix the manifest's annotation column or remove it for this slide") from exc


def tile_truth(mask: np.ndarray, level0_dims: tuple[int, int], x: np.ndarray, y: np.ndarray, extent_level0: float,
               min_fraction: float = 0.5) -> np.ndarray:
    """Tile truth (int8: 1 tumour, 0 not): at least `min_fraction` of the tile's level-0 square lies in the mask."""
    return (mask_fraction(mask, level0_dims, x, y, extent_level0) >= min_fraction).astype(np.int8)
