"""QuPath export: a slide's tiles as a GeoJSON FeatureCollection of detections (File > Import objects in QuPath).

The form follows QuPath's own GeoJSON reader/writer (qupath/qupath, qupath-core/src/main/java/qupath/lib/io/
PathObjectTypeAdapters.java): a Feature's `properties.objectType` picks the object kind ("detection"; features
without it import as annotations), `properties.measurements` is a JSON object {name: number} (QuPath >= 0.4; a list
of {name, value} before), `properties.classification` is {"name", "color": [r, g, b]}, `properties.name` a label.
Coordinates are pixels of the full-resolution image with the origin at its top-left corner (QuPath docs, "Exporting
annotations": "Units and origin"), i.e. level-0 pixels, as our tile grid's x, y.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hnm_ray.core.storage import write_bytes

TUMOUR_COLOUR, OTHER_COLOUR = [220, 30, 30], [40, 90, 220]
HARD_NEGATIVE = {"name": "Hard negative (mined)", "color": [255, 0, 255]}


def tile_features(tile_id: np.ndarray, x: np.ndarray, y: np.ndarray, extent: float, score: np.ndarray,
                  hard_negative: np.ndarray, truth: np.ndarray | None = None, *, threshold: float) -> dict[str, Any]:
    """A FeatureCollection with one square detection per tile (level-0 polygon), classified hard negative / tumour
    (score >= the run's tile `threshold`) / non-tumour, the threshold in the class name; measurements: tile score,
    hard-negative flag (0/1), tile truth (0/1, only where known)."""
    tumour = {"name": f"Tumour (tile score >= {threshold:.3f})", "color": TUMOUR_COLOUR}
    other = {"name": f"Non-tumour (tile score < {threshold:.3f})", "color": OTHER_COLOUR}
    features = []
    for i in range(len(tile_id)):
        x0, y0 = float(x[i]), float(y[i])
        x1, y1 = x0 + float(extent), y0 + float(extent)
        measurements = {"tile score": round(float(score[i]), 6), "hard negative": int(bool(hard_negative[i]))}
        if truth is not None and truth[i] >= 0:
            measurements["tile truth"] = int(truth[i])
        kind = HARD_NEGATIVE if hard_negative[i] else tumour if score[i] >= threshold else other
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {"objectType": "detection", "name": f"tile {int(tile_id[i])}", "classification": kind,
                           "measurements": measurements},
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(collection: dict[str, Any], path: str | Path) -> Path:
    """Write a FeatureCollection (atomically: temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(json.dumps(collection), path)
    return path
