"""Pictures: the ROC curve of a split, and tile-score heatmaps over slide thumbnails that a pathologist can read."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from hnm_ray.storage import write_bytes


def save_png(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """A matplotlib figure as a PNG at `path`, atomically and never through a symlink (`storage.write_bytes`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **kwargs)
    write_bytes(buffer.getvalue(), Path(path))


def plot_roc(labels: np.ndarray, probs: np.ndarray, path: str | Path, title: str = "ROC") -> Path:
    """Write the ROC curve (with its AUC) of slide probabilities as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if len(set(np.asarray(labels).tolist())) == 2:
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, lw=2, label=f"AUC = {roc_auc_score(labels, probs):.3f}")
    else:
        ax.text(0.5, 0.5, "one class only: no ROC", ha="center")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


SCORE_CMAP = "turbo"
OUTLINE_COLOUR = "#00e000"
HARD_NEGATIVE_COLOUR = "#ff00ff"


def score_overlay(shape: tuple[int, int], level0_dims: tuple[int, int], x: np.ndarray, y: np.ndarray, extent: float,
                  scores: np.ndarray, floor: float = 0.2, max_alpha: float = 0.7) -> np.ndarray:
    """RGBA (h, w, 4) floats in 0..1 of tile scores painted at thumbnail size: the colour map's colour, opacity
    rising from 0 at `floor` to `max_alpha` at 1, so low scores and untiled areas leave the tissue visible."""
    import matplotlib

    h, w = shape
    sx, sy = w / level0_dims[0], h / level0_dims[1]
    values = np.clip(np.asarray(scores, np.float64), 0, 1)
    colours = matplotlib.colormaps[SCORE_CMAP](values)
    colours[:, 3] = max_alpha * np.clip((values - floor) / (1 - floor), 0, 1)
    overlay = np.zeros((h, w, 4), np.float64)
    for xi, yi, colour in zip(x, y, colours):
        x0, y0 = int(xi * sx), int(yi * sy)
        overlay[y0:max(y0 + 1, int((yi + extent) * sy)), x0:max(x0 + 1, int((xi + extent) * sx))] = colour
    return overlay


def heatmap(thumbnail: np.ndarray, level0_dims: tuple[int, int], x: np.ndarray, y: np.ndarray, extent: float,
            scores: np.ndarray, path: str | Path, title: str = "", tumour_mask: np.ndarray | None = None,
            marked: np.ndarray | None = None, floor: float = 0.2) -> Path:
    """A heatmap a pathologist can read, as a PNG: the slide thumbnail, tile scores (0..1) as a colour map with a
    colour bar (scores below `floor` transparent), the tumour outline of `tumour_mask` (any scale, spanning the
    slide), tiles where `marked` is true (the mined hard negatives) outlined, and `title`. Axes in level-0 pixels."""
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
    bounds = (0, width, height, 0)
    ax.imshow(thumbnail, extent=bounds, interpolation="bilinear")
    ax.imshow(score_overlay((h, w), level0_dims, x, y, extent, scores, floor), extent=bounds, interpolation="nearest")
    legend = []
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
    if legend:
        ax.legend(handles=legend, loc="upper right", fontsize=8, framealpha=0.85)
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), SCORE_CMAP), ax=ax,
                       fraction=0.04, pad=0.02)
    bar.set_label(f"tile score (tumour probability; < {floor:g} transparent)", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path, bbox_inches="tight")  # never clip the colour bar label
    plt.close(fig)
    return path
