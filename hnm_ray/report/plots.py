"""Pictures: the ROC curve of a split, and tile-score heatmaps over slide thumbnails that a pathologist can read."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hnm_ray.core.storage import write_bytes


def save_png(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """A matplotlib figure as a PNG at `path`, atomically and never through a symlink (`storage.write_bytes`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **kwargs)
    write_bytes(buffer.getvalue(), Path(path))


def plot_roc(labels: np.ndarray, probs: np.ndarray, path: str | Path, title: str = "ROC",
             threshold: float | None = None) -> Path:
    """Write the ROC curve of slide probabilities as a PNG: its AUC with the 95 % bootstrap interval, the number of
    slides (tumour / normal) in the title, and the operating point at `threshold` (the run's validation threshold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hnm_ray.models.metrics import bootstrap_auc_interval, roc_auc, roc_points

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if len(set(labels.tolist())) == 2:
        fpr, tpr, _ = roc_points(labels, probs)
        low, high = bootstrap_auc_interval(labels, probs)
        ax.plot(fpr, tpr, lw=2, label=f"AUC = {roc_auc(labels, probs):.3f} (95 % CI {low:.2f}-{high:.2f})")
        if threshold is not None:
            called = probs >= threshold
            ax.plot(np.mean(called[labels == 0]), np.mean(called[labels == 1]), "o", color="black",
                    label=f"at threshold {threshold:.3f}")
    else:
        ax.text(0.5, 0.5, "one class only: no ROC", ha="center")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    counts = f"{labels.size} slides: {int(np.sum(labels == 1))} tumour, {int(np.sum(labels == 0))} normal"
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(f"{title}\n{counts}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


# The upper part of viridis (teal -> green -> yellow) stays apart from pink eosin, purple nuclei and the magenta
# hard-negative boxes, also blended; tiles are drawn at one opacity (the tissue shows through), so the colour bar,
# drawn over H&E pink at that opacity, shows the colours as they look on the tissue.
SCORE_CMAP, SCORE_CMAP_FROM = "viridis", 0.35
OVERLAY_ALPHA = 0.6
H_AND_E_PINK = (0.93, 0.66, 0.80)
OUTLINE_COLOUR = "#00e000"
HARD_NEGATIVE_COLOUR = "#ff00ff"
TISSUE_GREY = 215  # the tiles' footprint on a heatmap without a slide image


@dataclass(frozen=True)
class ScoreScale:
    """How tile scores become colours: transparent below `threshold` (the run's tile threshold), colours from
    `threshold` to `top` (the highest tile score of the run), so every heatmap of a run reads on one scale."""

    threshold: float
    top: float

    def norm(self):
        """The matplotlib Normalize from threshold to top (a hair above the threshold when no tile reaches it)."""
        from matplotlib.colors import Normalize

        return Normalize(self.threshold, max(self.top, self.threshold + 1e-3))

    def label(self) -> str:
        """What the colour bar says."""
        return (f"tile score, from the run's tile threshold {self.threshold:.3f}\nto its highest tile score "
                f"{max(self.top, self.threshold):.3f}; lower tiles transparent")


def score_overlay(shape: tuple[int, int], level0_dims: tuple[int, int], x: np.ndarray, y: np.ndarray, extent: float,
                  scores: np.ndarray, scale: ScoreScale, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGBA (h, w, 4) floats in 0..1 of tile scores painted at thumbnail size: tiles scoring at or above
    `scale.threshold` in the colour map's colour (scaled from the threshold to `scale.top`) at opacity `alpha`;
    tiles below it and untiled areas transparent, so the tissue stays visible. Each tile covers at least one pixel;
    where tiles overlap the later one shows. Rasterised in numpy, with no loop over tiles: O(tiles + painted
    pixels), so a 40,000-tile bag costs milliseconds."""
    h, w = shape
    values = np.asarray(scores, np.float64)
    colours = score_colours()(scale.norm()(values).filled(0.0))
    colours[:, 3] = np.where(values >= scale.threshold, alpha, 0.0)
    owner = tile_owners(shape, level0_dims, x, y, extent)
    overlay = np.zeros((h, w, 4), np.float64)
    painted = owner >= 0
    overlay[painted] = colours[owner[painted]]
    return overlay


def tile_owners(shape: tuple[int, int], level0_dims: tuple[int, int], x: np.ndarray, y: np.ndarray,
                extent: float) -> np.ndarray:
    """(h, w) int: per thumbnail pixel the index of the last tile (level-0 squares at `x`, `y` of side `extent`)
    covering it, -1 where none does; a tile covers pixels [floor(x sx), max(that + 1, floor((x + extent) sx))) in
    each axis (sx = thumbnail / level-0 size)."""
    h, w = shape
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x0, x1 = _pixel_span(x, extent, w / level0_dims[0], w)
    y0, y1 = _pixel_span(y, extent, h / level0_dims[1], h)
    widths, heights = x1 - x0, y1 - y0
    area = widths * heights
    tile = np.repeat(np.arange(len(x)), area)
    offset = np.arange(int(area.sum())) - np.repeat(np.cumsum(area) - area, area)
    owner = np.full((h, w), -1, np.int64)
    np.maximum.at(owner, (y0[tile] + offset // widths[tile], x0[tile] + offset % widths[tile]), tile)
    return owner


def _pixel_span(start: np.ndarray, extent: float, scale: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """First and past-the-end pixel of each tile along one axis, clipped to [0, size] (empty when outside)."""
    first = np.floor(start * scale).astype(np.int64)
    last = np.maximum(first + 1, np.floor((start + extent) * scale).astype(np.int64))
    first = np.clip(first, 0, size)
    return first, np.clip(last, first, size)


def blank_thumbnail(level0_dims: tuple[int, int], x: np.ndarray, y: np.ndarray, extent: float,
                    size: int = 1024) -> np.ndarray:
    """The background of a heatmap where no slide image is at hand (features imported without their slides): an RGB
    canvas (uint8) of the slide's aspect ratio, `size` pixels on its long side, white, with the tiles' footprint
    (where the tissue is) in light grey."""
    width, height = level0_dims
    scale = size / max(width, height, 1)
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    canvas = np.full((*shape, 3), 255, np.uint8)
    canvas[tile_owners(shape, level0_dims, x, y, extent) >= 0] = TISSUE_GREY
    return canvas


def score_colours():
    """The tile-score colour map: SCORE_CMAP from SCORE_CMAP_FROM to its end."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    return ListedColormap(matplotlib.colormaps[SCORE_CMAP](np.linspace(SCORE_CMAP_FROM, 1, 256)))


def _colours_on_tissue(alpha: float = OVERLAY_ALPHA):
    """The colour map as it looks drawn at `alpha` over H&E pink (for the colour bar)."""
    from matplotlib.colors import ListedColormap

    colours = score_colours()(np.linspace(0, 1, 256))[:, :3]
    return ListedColormap(alpha * colours + (1 - alpha) * np.asarray(H_AND_E_PINK))


def heatmap(thumbnail: np.ndarray, level0_dims: tuple[int, int], x: np.ndarray, y: np.ndarray, extent: float,
            scores: np.ndarray, path: str | Path, scale: ScoreScale, title: str = "",
            tumour_mask: np.ndarray | None = None, marked: np.ndarray | None = None) -> Path:
    """A heatmap a pathologist can read, as a PNG: the slide thumbnail, tile scores at or above the run's tile
    threshold in colour on the run's scale (`scale`, stated on the colour bar; lower scores transparent), the tumour
    outline of `tumour_mask` (any scale, spanning the slide), tiles where `marked` is true (the mined hard negatives)
    outlined, and `title`. Axes in level-0 pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = level0_dims
    h, w = thumbnail.shape[:2]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 7.0 * h / w) + 1.0), dpi=120)
    overlay = score_overlay((h, w), level0_dims, x, y, extent, scores, scale).astype(np.float32)
    thumbnail = np.asarray(thumbnail)[..., :3]
    background = thumbnail.astype(np.float32) / (255 if thumbnail.dtype == np.uint8 else 1)
    opacity = overlay[..., 3:]
    # One uint8 image, the overlay composited over the thumbnail: matplotlib resamples each image at every draw
    # (twice a save), and uint8 fastest.
    composite = (background * (1 - opacity) + overlay[..., :3] * opacity) * 255
    ax.imshow(np.clip(np.rint(composite), 0, 255).astype(np.uint8), extent=(0, width, height, 0),
              interpolation="bilinear")
    above = int(np.sum(np.asarray(scores) >= scale.threshold))
    legend = [Patch(facecolor=_colours_on_tissue()(0.75), label=f"tile score >= {scale.threshold:.3f} "
                                                                  f"({above} of {len(scores)} tiles)")]
    if tumour_mask is not None and tumour_mask.any():
        mh, mw = tumour_mask.shape
        ax.contour((np.arange(mw) + 0.5) * width / mw, (np.arange(mh) + 0.5) * height / mh,
                   tumour_mask.astype(np.float32), levels=[0.5], colors=OUTLINE_COLOUR, linewidths=1.5)
        legend.append(Line2D([], [], color=OUTLINE_COLOUR, lw=1.5, label="tumour annotation"))
    if marked is not None and np.any(marked):
        boxes = [Rectangle((xi, yi), extent, extent) for xi, yi in zip(np.asarray(x)[marked], np.asarray(y)[marked])]
        ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor=HARD_NEGATIVE_COLOUR, linewidth=1.2))
        legend.append(Patch(facecolor="none", edgecolor=HARD_NEGATIVE_COLOUR,
                            label=f"mined hard negative ({int(np.sum(marked))} tiles)"))
    ax.set(xlim=(0, width), ylim=(height, 0), xlabel="x (level-0 px)", ylabel="y (level-0 px)")
    ax.tick_params(labelsize=7)
    ax.legend(handles=legend, loc="upper right", fontsize=8, framealpha=0.85)
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(scale.norm(), _colours_on_tissue()), ax=ax, fraction=0.04,
                       pad=0.02)
    bar.set_label(scale.label(), fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path, bbox_inches="tight")  # never clip the colour bar label
    plt.close(fig)
    return path
