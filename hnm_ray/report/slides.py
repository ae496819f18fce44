"""Per-slide outputs of a trained aggregator: readable heatmaps (PNG) and QuPath detections (GeoJSON), with the
tiles the HardNegativeMiner kept marked (the paper's hard negatives)."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hnm_ray.core.errors import HnmError, SlideError
from hnm_ray.models.inference import load_aggregator, tile_scores
from hnm_ray.core.registry import one_line
from hnm_ray.report.plots import ScoreScale, blank_thumbnail, heatmap
from hnm_ray.report.qupath import tile_features, write_geojson
from hnm_ray.run.run_folder import RunState
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord

if TYPE_CHECKING:
    from hnm_ray.slides.reader import SlideReader

log = logging.getLogger("hnm_ray")
LABEL_NAMES = {0: "normal (0)", 1: "tumour (1)", None: "unknown"}


@dataclass(frozen=True)
class Thresholds:
    """A run's two thresholds: `slide` for slide probabilities (the validation Youden threshold: the slide's call),
    `tile` for tile scores (the validation Youden threshold of each slide's top tile score: heatmap colours and QuPath
    classes start there)."""

    slide: float
    tile: float


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

    def title(self, threshold: float) -> str:
        """The heatmap's title: slide id, true label, the probability against the run's slide `threshold`, the call
        and whether it is right (hit, miss, correct, false alarm)."""
        called = self.probability >= threshold
        verdict = {(1, True): "hit", (1, False): "MISSED", (0, False): "correct", (0, True): "FALSE ALARM"}.get(
            (self.record.label, called), "no label")
        return (f"{self.record.slide_id}   |   true label: {LABEL_NAMES.get(self.record.label, 'unknown')}\n"
                f"P(tumour) = {self.probability:.3f} {'>=' if called else '<'} threshold {threshold:.3f}: called "
                f"{'tumour' if called else 'normal'}, {verdict}")


def mined_hard_negatives(run_dir: Path) -> pa.Table | None:
    """(slide_id, tile_id) of the hard negatives the run's last fine-tuning round used (the adopted selection in
    state.json); None when the run mined none."""
    state = RunState(run_dir)
    rounds = sorted(int(k.removeprefix("mining_round")) for k in state.data if k.startswith("mining_round"))
    if not rounds:
        return None
    path = run_dir / Path(state.get(f"mining_round{rounds[-1]}")["folder"]).name / "hard_negatives.parquet"
    return pq.read_table(path, columns=["slide_id", "tile_id"]) if path.is_file() else None


def on_same_slides(hard_negatives: pa.Table | None, records: list[SlideRecord],
                   trained: list[SlideRecord]) -> pa.Table | None:
    """The hard negatives of the training slides that `records` hold again: the same file (resolved path) under the
    same slide id. Never by slide id alone: ids like slide_001 repeat across cohorts, and a copy elsewhere is not
    known to be the slide the run mined."""
    if hard_negatives is None:
        return None
    paths = {r.slide_id: os.path.realpath(r.path) for r in trained}
    same = [r.slide_id for r in records if paths.get(r.slide_id) == os.path.realpath(r.path)]
    return hard_negatives.filter(pc.is_in(hard_negatives["slide_id"], value_set=pa.array(same, pa.string())))


def score_slide(model, store: FeatureStore, record: SlideRecord, level_downsamples: tuple[float, ...] | None,
                hard_negative_ids: np.ndarray) -> ScoredSlide:
    """A slide's tile scores (sigmoid of instance logits), level-0 geometry, truth and hard-negative flags.
    `level_downsamples`: the slide's (None: no slide image, tiles must be level-0 ones, e.g. imported features)."""
    table, probability = tile_scores(model, store, record.slide_id)
    truth = store.read_table(record.slide_id, columns=["truth"])["truth"].to_numpy()
    tile_id = table["tile_id"].to_numpy()
    level = table["level"][0].as_py() if table.num_rows else 0
    if level_downsamples is None and level != 0:
        raise SlideError(record.slide_id, f"its tiles are level-{level} tiles and the slide image cannot be opened, so "
                                          "their level-0 footprint is unknown", f"make {record.path} the slide file")
    downsample = 1.0 if level_downsamples is None else level_downsamples[level]
    extent = float(table["size"][0].as_py() * downsample) if table.num_rows else 0.0
    return ScoredSlide(record, probability, tile_id, table["x"].to_numpy(), table["y"].to_numpy(), extent,
                       table["score"].to_numpy(), truth, np.isin(tile_id, hard_negative_ids))


def write_slide_outputs(model_path: str | Path, store: FeatureStore, records: list[SlideRecord], qupath_dir: Path | None,
                        heatmaps: dict[str, Path], thresholds: Thresholds, hard_negatives: pa.Table | None = None,
                        thumbnail_size: int = 1024, plugin: str | None = None,
                        max_pixels: int | None = None) -> list[ScoredSlide]:
    """For each record in the store: `<qupath_dir>/<slide_id>.geojson` (QuPath detections classified at the tile
    threshold; skipped when None) and a heatmap PNG where `heatmaps` maps its slide id to a path, every heatmap on one
    scale (tile threshold to the highest tile score of these slides). A slide whose image cannot be opened (features
    imported without their slides) gets both from the store alone when its tiles are level-0 ones, the heatmap on a
    canvas showing its tiles in grey (one warning lists these slides); else it is logged and skipped. `plugin`: see
    `inference.load_aggregator`; `max_pixels`: the run's tiling.tissue.max_decoded_pixels, the most a thumbnail may
    decode (as in tissue detection)."""
    model, _ = load_aggregator(model_path, plugin)
    done = store.completed()
    mined = _by_slide(hard_negatives)
    scored, no_image = [], {}
    for record in (r for r in records if r.slide_id in done and (qupath_dir is not None or r.slide_id in heatmaps)):
        try:
            with _opened(record, no_image) as reader:
                slide = score_slide(model, store, record, reader.info.level_downsamples if reader else None,
                                    mined.get(record.slide_id, np.zeros(0, np.int32)))
        except HnmError as exc:
            log.warning("no heatmap / QuPath export for slide %r: %s", record.slide_id, exc)
            no_image.pop(record.slide_id, None)  # skipped: not one drawn from the store either
            continue
        if qupath_dir is not None:
            features = tile_features(slide.tile_id, slide.x, slide.y, slide.extent, slide.score, slide.hard_negative,
                                     slide.truth, threshold=thresholds.tile)
            write_geojson(features, qupath_dir / f"{record.slide_id}.geojson")
        scored.append(slide)
    if no_image:
        named = ", ".join(list(no_image)[:5]) + (f" and {len(no_image) - 5} more" if len(no_image) > 5 else "")
        log.warning("%d slide(s) without a slide image (%s): QuPath files and heatmaps from the store's tile "
                    "coordinates, heatmaps over the tiles' footprint in grey (%s: %s)", len(no_image), named,
                    *next(iter(no_image.items())))
    scale = ScoreScale(thresholds.tile, max((float(s.score.max()) for s in scored if s.score.size), default=1.0))
    for slide in (s for s in scored if s.record.slide_id in heatmaps):
        record = slide.record
        try:
            _draw(slide, heatmaps[record.slide_id], scale, thresholds, thumbnail_size, max_pixels,
                  record.slide_id in no_image)
        except HnmError as exc:
            log.warning("no heatmap for slide %r: %s", record.slide_id, exc)
    return scored


@contextmanager
def _opened(record: SlideRecord, no_image: dict[str, str]) -> Iterator[SlideReader | None]:
    """The slide's reader, or None (its cause noted in `no_image`) when its image cannot be opened."""
    from hnm_ray.slides.reader import open_slide

    try:
        reader = open_slide(record.path, slide_id=record.slide_id, device="cpu")
    except HnmError as exc:
        no_image[record.slide_id] = one_line(exc)
        yield None
        return
    with reader:
        yield reader


def _draw(slide: ScoredSlide, path: Path, scale: ScoreScale, thresholds: Thresholds, thumbnail_size: int,
          max_pixels: int | None, no_image: bool) -> None:
    """One heatmap: over the slide's thumbnail, or (`no_image`) over a white canvas with its tiles in grey."""
    from hnm_ray.slides.annotation import load_annotation
    from hnm_ray.slides.reader import open_slide

    record = slide.record
    mask = load_annotation(record.annotation) if record.annotation else None
    title = slide.title(thresholds.slide)
    if no_image:
        dims = (int(slide.x.max() + slide.extent), int(slide.y.max() + slide.extent)) if slide.x.size else (1, 1)
        heatmap(blank_thumbnail(dims, slide.x, slide.y, slide.extent, thumbnail_size), dims, slide.x, slide.y,
                slide.extent, slide.score, path, scale, title=title + "\n(no slide image: its tiles in grey)",
                tumour_mask=mask, marked=slide.hard_negative)
        return
    with open_slide(record.path, slide_id=record.slide_id, device="cpu") as reader:
        heatmap(reader.thumbnail(thumbnail_size, max_pixels), reader.info.level_dimensions[0], slide.x, slide.y,
                slide.extent, slide.score, path, scale, title=title, tumour_mask=mask, marked=slide.hard_negative)


def tumour_and_normal(records: list[SlideRecord], slide_ids: list[str], n: int) -> list[str]:
    """Up to `n` of `slide_ids`, tumour and normal slides taken in turn (manifest order within each), so a run's
    heatmaps show both kinds of slide."""
    chosen = set(slide_ids)
    tumour = [r.slide_id for r in records if r.slide_id in chosen and r.label == 1]
    others = [r.slide_id for r in records if r.slide_id in chosen and r.label != 1]
    return [s for pair in zip_longest(tumour, others) for s in pair if s is not None][:n]


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
