"""Pictures a pathologist looks at: the ROC curve of a split and tile-score heatmaps over thumbnails."""
from __future__ import annotations

from pathlib import Path

import numpy as np


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
    fig.savefig(path)
    plt.close(fig)
    return path


def heatmap(thumbnail: np.ndarray, level0_dims: tuple[int, int], x: np.ndarray, y: np.ndarray, extent: int,
            scores: np.ndarray, path: str | Path, alpha: float = 0.5) -> Path:
    """Paint tile scores (0..1, blue->red) over a slide thumbnail and write it as a PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = thumbnail.shape[:2]
    sx, sy = w / level0_dims[0], h / level0_dims[1]
    overlay = np.zeros((h, w, 3), np.float32)
    covered = np.zeros((h, w), bool)
    colours = _colormap(np.clip(np.asarray(scores, np.float32), 0, 1))
    for xi, yi, colour in zip(x, y, colours):
        x0, y0 = int(xi * sx), int(yi * sy)
        x1, y1 = max(x0 + 1, int((xi + extent) * sx)), max(y0 + 1, int((yi + extent) * sy))
        overlay[y0:y1, x0:x1] = colour
        covered[y0:y1, x0:x1] = True
    out = thumbnail.astype(np.float32)
    out[covered] = (1 - alpha) * out[covered] + alpha * overlay[covered]
    Image.fromarray(out.clip(0, 255).astype(np.uint8)).save(path)
    return path


def _colormap(values: np.ndarray) -> np.ndarray:
    """Blue (0) -> yellow (0.5) -> red (1) RGB colours in 0..255."""
    r = np.clip(2 * values, 0, 1)
    g = 1 - np.abs(2 * values - 1)
    b = np.clip(1 - 2 * values, 0, 1)
    return np.stack([r, g, b], axis=1) * 255.0
