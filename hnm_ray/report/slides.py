"""Per-slide outputs of a trained aggregator: readable heatmaps (PNG) and QuPath detections (GeoJSON), with the
tiles the HardNegativeMiner kept marked (the paper's hard negatives)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hnm_ray.errors import HnmError
from hnm_ray.inference import load_aggregator, tile_scores
from hnm_ray.report.plots import heatmap
from hnm_ray.report.qupath import tile_features, write_geojson
from hnm_ray.run_folder import RunState
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord

log = logging.getLogger("hnm_ray")
LABEL_NAMES = {0: "normal (0)", 1: "tumour (1)", None: "unknown"}


@dataclass
class ScoredSlide:
    """One slide under the aggregator: bag probability and per tile its level-0 square, score, truth and flag."""

    record: SlideRecord
    probability: float
    tile_id: np.ndarray
    x: np.ndarray
    y: np.ndarray
    extent: float  # level-0 side of a tile
    score: np.ndarray
    truth: np.ndarray  # -1 unknown
    hard_negative: np.ndarray  # bool

    @property
    def title(self) -> str:
        """Slide id, true label and predicted probability: the heatmap's title."""
        return (f"{self.record.slide_id}   |   true label: {LABEL_NAMES.get(self.record.label, 'unknown')}   |   "
                f"predicted P(tumour) = {self.probability:.3f}")


def mined_hard_negatives(run_dir: Path) -> pa.Table | None:
    """(slide_id, tile_id) of the hard negatives the run's last fine-tuning round used (the adopted selection in
    state.json); None when the run mined none."""
    state = RunState(run_dir)
    rounds = sorted(int(k.removeprefix("mining_round")) for k in state.data if k.startswith("mining_round"))
    if not rounds:
        return None
    path = run_dir / Path(state.get(f"mining_round{rounds[-1]}")["folder"]).name / "hard_negatives.parquet"
    return pq.read_table(path, columns=["slide_id", "tile_id"]) if path.is_file() else None


def score_slide(model, store: FeatureStore, record: SlideRecord, level_downsamples: tuple[float, ...],
                hard_negative_ids: np.ndarray) -> ScoredSlide:
    """A slide's tile scores (sigmoid of instance logits), level-0 geometry, truth and hard-negative flags."""
    table, probability = tile_scores(model, store, record.slide_id)
    truth = store.read_table(record.slide_id, columns=["truth"])["truth"].to_numpy()
    tile_id = table["tile_id"].to_numpy()
    extent = float(table["size"][0].as_py() * level_downsamples[table["level"][0].as_py()])
    return ScoredSlide(record, probability, tile_id, table["x"].to_numpy(), table["y"].to_numpy(), extent,
                       table["score"].to_numpy(), truth, np.isin(tile_id, hard_negative_ids))


def write_slide_outputs(model_path: str | Path, store: FeatureStore, records: list[SlideRecord], qupath_dir: Path | None,
                        heatmaps: dict[str, Path], hard_negatives: pa.Table | None = None,
                        thumbnail_size: int = 1024, plugin: str | None = None) -> list[ScoredSlide]:
    """For each record in the store: `<qupath_dir>/<slide_id>.geojson` (QuPath detections; skipped when None) and a
    heatmap PNG where `heatmaps` maps its slide id to a path. A slide that cannot be opened is logged and skipped."""
    from hnm_ray.slides.annotation import load_annotation
    from hnm_ray.slides.reader import open_slide

    model, _ = load_aggregator(model_path, plugin)
    done = store.completed()
    mined = _by_slide(hard_negatives)
    scored = []
    for record in (r for r in records if r.slide_id in done and (qupath_dir is not None or r.slide_id in heatmaps)):
        try:
            with open_slide(record.path, slide_id=record.slide_id, device="cpu") as reader:
                slide = score_slide(model, store, record, reader.info.level_downsamples,
                                    mined.get(record.slide_id, np.zeros(0, np.int32)))
                if qupath_dir is not None:
                    write_geojson(tile_features(slide.tile_id, slide.x, slide.y, slide.extent, slide.score,
                                                slide.hard_negative, slide.truth), qupath_dir / f"{record.slide_id}.geojson")
                if record.slide_id in heatmaps:
                    mask = load_annotation(record.annotation) if record.annotation else None
                    heatmap(reader.thumbnail(thumbnail_size), reader.info.level_dimensions[0], slide.x, slide.y,
                            slide.extent, slide.score, heatmaps[record.slide_id], title=slide.title, tumour_mask=mask,
                            marked=slide.hard_negative)
        except HnmError as exc:
            log.warning("no heatmap / QuPath export for slide %r: %s", record.slide_id, exc)
            continue
        scored.append(slide)
    return scored


def most_mined(records: list[SlideRecord], hard_negatives: pa.Table | None, n: int) -> list[str]:
    """Ids of the `n` negative slides with the most mined hard negatives (ties by slide id)."""
    counts = {k: len(v) for k, v in _by_slide(hard_negatives).items()}
    negatives = [r.slide_id for r in records if r.label == 0 and counts.get(r.slide_id)]
    return sorted(negatives, key=lambda s: (-counts[s], s))[:n]


def _by_slide(hard_negatives: pa.Table | None) -> dict[str, np.ndarray]:
    if hard_negatives is None or hard_negatives.num_rows == 0:
        return {}
    ids = hard_negatives["slide_id"].to_numpy(zero_copy_only=False)
    tiles = hard_negatives["tile_id"].to_numpy()
    return {slide: tiles[ids == slide] for slide in np.unique(ids)}
