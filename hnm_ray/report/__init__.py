"""What people open after a run: report.html, readable heatmaps, the ROC curve and QuPath GeoJSON.

    plots.py    ROC curve and tile-score heatmaps (matplotlib)
    slides.py   per-slide scores -> heatmap PNGs and QuPath files, with the mined hard negatives marked
    qupath.py   a slide's tiles as QuPath detections (GeoJSON)
    html.py     report.html of a run folder or a predict output
    outputs.py  what a training run leaves, after each round and at the end: checkpoint/, metrics.json, the above
"""
from hnm_ray.report.plots import ScoreScale, heatmap, plot_roc, score_overlay

__all__ = ["ScoreScale", "heatmap", "plot_roc", "score_overlay"]
