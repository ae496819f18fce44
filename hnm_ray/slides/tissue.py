"""Tissue detection on a thumbnail: HSV saturation -> median blur -> Otsu (with a floor) -> morphology."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from hnm_ray.config import TissueConfig


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max of an RGB uint8 image, as uint8 0..255."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # pairwise max/min: ~5x faster than a length-3 reduce
    top = np.maximum(np.maximum(red, green), blue).astype(np.int32)
    spread = top - np.minimum(np.minimum(red, green), blue)
    return (spread * 255 // np.maximum(top, 1)).astype(np.uint8)


def median_along(values: np.ndarray, kernel: int, axis: int) -> np.ndarray:
    """Median of every `kernel` (odd) consecutive values along `axis` of a 2-D array, edges repeated: exactly
    scipy.ndimage.median_filter(mode="nearest") with a 1-D window, ~10x faster for small kernels on uint8 (a
    min/max selection network over shifted views instead of a per-pixel sort)."""
    half = kernel // 2
    padding = [(0, 0), (0, 0)]
    padding[axis] = (half, half)
    padded = np.pad(values, padding, mode="edge")
    length = values.shape[axis]
    window = [np.array(padded[i:i + length] if axis == 0 else padded[:, i:i + length]) for i in range(kernel)]
    # Bubble the largest value up half + 1 times: the last value bubbled into place (index `half`) is the median.
    for top in range(kernel - 1, half - 1, -1):
        for i in range(top):
            low = np.minimum(window[i], window[i + 1])
            np.maximum(window[i], window[i + 1], out=window[i + 1])
            window[i] = low
    return window[half]


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (the level that maximises the between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    mean0 = np.cumsum(hist * levels) / np.maximum(weight0, 1)
    mean1 = ((hist * levels).sum() - np.cumsum(hist * levels)) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(np.argmax(between[:-1]))


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected-component labels (8-connected) and the size of each label (index 0 = outside)."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    return labels, np.bincount(labels.ravel())


def tissue_mask(thumbnail: np.ndarray, config: TissueConfig | None = None) -> np.ndarray:
    """Boolean (H, W) tissue mask of an RGB uint8 thumbnail."""
    config = config or TissueConfig()
    sat = saturation(thumbnail)
    if config.median_kernel > 1:
        # Separable median (rows, then columns): ~3x faster than the 2-D window, same effect on a tissue mask.
        sat = median_along(median_along(sat, config.median_kernel, axis=1), config.median_kernel, axis=0)
    if config.saturation_threshold is not None:
        threshold = config.saturation_threshold * 255
    else:
        threshold = max(otsu_threshold(sat), config.min_saturation * 255)
    mask = sat > threshold
    labels, sizes = _components(mask)
    small = sizes < config.min_object_fraction * mask.size
    small[0] = False
    mask[small[labels]] = False
    holes, sizes = _components(~mask)
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill = sizes < config.fill_holes_fraction * mask.size
    fill[border] = False
    fill[0] = False
    mask[fill[holes]] = True
    return mask


def mask_fraction(mask: np.ndarray, level0_dims: tuple[int, int], x: np.ndarray, y: np.ndarray,
                  extent_level0: float) -> np.ndarray:
    """Fraction of each level-0 square (x, y, side extent_level0) covered by a mask spanning the whole slide."""
    h, w = mask.shape
    sx, sy = w / level0_dims[0], h / level0_dims[1]
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    counts = np.int32 if mask.size < 2**31 else np.int64  # int32 sums are ~2x faster
    integral = np.zeros((h + 1, w + 1), counts)
    integral[1:, 1:] = mask.astype(bool).cumsum(0, dtype=counts).cumsum(1, dtype=counts)
    x0 = np.clip(np.round(x * sx).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.round(y * sy).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.maximum(np.round((x + extent_level0) * sx).astype(np.int64), x0 + 1), 0, w)
    y1 = np.clip(np.maximum(np.round((y + extent_level0) * sy).astype(np.int64), y0 + 1), 0, h)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / ((y1 - y0) * (x1 - x0))
