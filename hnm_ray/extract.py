"""Feature extraction: slides -> tile index -> cuCIM decode -> encoder actors -> per-slide Parquet.

A Ray Data pipeline (DESIGN §2). The tile index is computed by one Ray task per slide; tile
coordinates (never pixels) form the dataset; a decode stage reads tiles with cuCIM's batched
`read_region`; an encoder actor pool (GPU when there are GPUs) embeds them; the driver gathers
each slide's embeddings and writes one complete Parquet file per slide (temp name + rename).
Re-running skips finished slides; a slide that fails is recorded in `errors.jsonl` and skipped. The JPEG
tiles under every read get a cheap marker check (`jpeg_tile_problem`): cuCIM decodes a corrupt tile into gray
pixels without raising, so without it a damaged slide would be embedded silently.

    python -m hnm_ray.extract --manifest M --out STORE [--encoder resnet18_in] [--tile-size 224]
"""
from __future__ import annotations

import argparse
import logging
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from hnm_ray import config as cfg
from hnm_ray.cluster import cluster_gpus, init_ray, torch_device
from hnm_ray.errors import HnmError, SlideError
from hnm_ray.progress import Progress, setup_logging
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord, load_manifest

log = logging.getLogger("hnm_ray")

INDEX_COLUMNS = ("slide_id", "path", "tile_id", "x", "y", "level", "size")
COORDINATE_COLUMNS = ("path", "x", "y", "level", "size")


@dataclass
class ExtractConfig:
    """Feature extraction: tiling, encoder and Ray resources."""

    manifest: str = cfg.knob("", "slide manifest (CSV/Parquet: slide_id, path, label[, split, annotation])")
    out: str = cfg.knob("features", "feature store root folder")
    encoder: str = cfg.knob("resnet18_in", "encoder: registry name, module:callable, or TorchScript file")
    weights: str | None = cfg.knob(None, "local encoder weights file (none: seeded random init)")
    seed: int = cfg.knob(0, "seed of the encoder's random init when no weights are given")
    tag: str | None = cfg.knob(None, "store folder name for this encoder (default: derived from encoder + weights)")
    round: int = cfg.knob(0, "round number in the store layout (round=<r>)")
    tile_size: int = cfg.knob(224, "tile side in pixels fed to the encoder")
    level: int | None = cfg.knob(0, "pyramid level to tile (ignored when --mpp is set)")
    mpp: float | None = cfg.knob(None, "tile at this resolution in microns/pixel instead of a level")
    min_tissue: float = cfg.knob(0.5, "minimum tissue fraction of a kept tile")
    batch_size: int = cfg.knob(64, "tiles per decode/encode batch")
    num_encoders: int = cfg.knob(1, "encoder actors in the pool")
    gpus_per_encoder: float | None = cfg.knob(None, "GPUs per encoder actor (default: 1 when the cluster has GPUs, else 0)")
    cpus_per_encoder: float = cfg.knob(1.0, "CPUs per encoder actor (also its torch threads)")
    cpus_per_decoder: float = cfg.knob(0.5, "CPUs per decode task")
    decode_workers: int = cfg.knob(1, "cuCIM read_region threads per decode call")
    dtype: str = cfg.knob("float16", "embedding storage dtype", choices=["float16", "float32"])
    limit_slides: int | None = cfg.knob(None, "extract only the first N slides (smoke runs)")

    def validate(self) -> None:
        """Raise ConfigError on out-of-range values."""
        cfg.check_range("tile_size", self.tile_size, 16, 4096)
        cfg.check_range("min_tissue", self.min_tissue, 0.0, 1.0)
        cfg.check_range("batch_size", self.batch_size, 1)
        cfg.check_range("num_encoders", self.num_encoders, 1)
        cfg.check_range("cpus_per_encoder", self.cpus_per_encoder, 0.0, low_open=True)
        cfg.check_range("cpus_per_decoder", self.cpus_per_decoder, 0.0, low_open=True)
        cfg.check_range("decode_workers", self.decode_workers, 1)
        cfg.check_choice("dtype", self.dtype, ["float16", "float32"])
        if self.level is None and self.mpp is None:
            raise cfg.ConfigError("level", "set a pyramid level (e.g. 0) or a target mpp")
        if self.level is not None:
            cfg.check_range("level", self.level, 0)
        if self.limit_slides is not None:
            cfg.check_range("limit_slides", self.limit_slides, 1)
        if self.mpp is not None:
            cfg.check_range("mpp", self.mpp, 0.0, low_open=True)
        if self.gpus_per_encoder is not None:
            cfg.check_range("gpus_per_encoder", self.gpus_per_encoder, 0.0)

    def store_tag(self) -> str:
        """The store folder name of this encoder."""
        from hnm_ray.models.encoders import encoder_tag

        return self.tag or encoder_tag(self.encoder, self.weights)


@dataclass
class ExtractionSummary:
    """What one extraction run did."""

    store_dir: str
    slides_total: int
    slides_skipped_done: int
    slides_written: int
    slides_failed: list[str]
    tiles_written: int
    seconds: float

    @property
    def tiles_per_second(self) -> float:
        """Pipeline throughput of this run."""
        return self.tiles_written / self.seconds if self.seconds > 0 else 0.0


def tile_index(record: SlideRecord, config: ExtractConfig) -> pa.Table:
    """The tile index of one slide: grid columns + slide_id, path and tile truth from its annotation."""
    from hnm_ray.slides.annotation import load_annotation, tile_truth
    from hnm_ray.slides.grid import TileGridConfig, tile_grid
    from hnm_ray.slides.reader import open_slide

    grid_config = TileGridConfig(tile_size=config.tile_size, level=config.level, mpp=config.mpp, min_tissue=config.min_tissue)
    with open_slide(record.path, slide_id=record.slide_id, device="cpu") as reader:  # validates the slide
        grid = tile_grid(reader, grid_config)
        level0 = reader.info.level_dimensions[0]
        downsamples = reader.info.level_downsamples
    n = grid.num_rows
    truth = np.full(n, -1, dtype=np.int8)
    if record.annotation:
        mask = load_annotation(record.annotation)
        extent = (grid["size"].to_numpy().astype(np.float64) * np.asarray(downsamples)[grid["level"].to_numpy()]).astype(np.int64)
        truth = tile_truth(mask, level0, grid["x"].to_numpy(), grid["y"].to_numpy(), int(extent[0]))
    return grid.append_column("truth", pa.array(truth, pa.int8())).add_column(
        0, "path", pa.array([record.path] * n, pa.string())
    ).add_column(0, "slide_id", pa.array([record.slide_id] * n, pa.string()))


def _index_task(record: SlideRecord, config: ExtractConfig) -> tuple[str, pa.Table | None, str | None]:
    """Ray task body: a slide's tile index, or the error that stops it."""
    try:
        return record.slide_id, tile_index(record, config), None
    except HnmError as exc:
        return record.slide_id, None, str(exc)
    except Exception as exc:  # noqa: BLE001 - any decoder failure must name the slide, not kill the job
        return record.slide_id, None, f"slide {record.slide_id!r}: {type(exc).__name__}: {exc}"


JPEG_COMPRESSION = 7  # TIFF Compression tag value of (new-style) JPEG tiles
_FIX_CORRUPT_TILE = ("cuCIM decodes such a tile into gray or garbage pixels without raising; re-copy, re-scan or "
                     "re-export the slide, or drop it from the manifest")


_BETWEEN_SCANS = frozenset([0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)])  # DHT, DAC, SOS, DQT, ...
_PROGRESSIVE = frozenset([0xC2, 0xC6, 0xCA, 0xCE])


def jpeg_tile_problem(data: bytes) -> str | None:
    """Why the bytes of one TIFF JPEG tile are corrupt, or None when its marker structure is sound.

    A structural check, about 10-30 us a tile (a few % of decoding it): SOI at the start, EOI at the end,
    intact segment headers, and inside the entropy-coded data no byte pair FF xx other than FF00 (stuffing),
    FFD0-FFD7 (restarts), FF fill bytes and the segments that may separate scans. Noise written over a tile
    almost always breaks one of these; libjpeg inside cuCIM then prints "Unsupported marker type" and returns
    gray pixels instead of raising. Damage that keeps the markers valid (a flipped bit in the coded data) is
    not detected; progressive tiles get the SOI/EOI/header checks only.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return "it does not start with a JPEG start-of-image marker (FFD8)"
    end = data.rfind(b"\xff\xd9", max(2, n - 64))  # some writers pad tiles after EOI
    if end < 0:
        return "it does not end with a JPEG end-of-image marker (FFD9): the tile is cut short or overwritten"
    pos = 2
    while True:  # segment headers up to a start of scan, then that scan's entropy-coded data
        if pos + 4 > end or data[pos] != 0xFF:
            return f"its JPEG segment headers are broken at byte {pos}"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            return f"JPEG segment FF{marker:02X} at byte {pos} has an impossible length {length}"
        if marker in _PROGRESSIVE:
            return None  # progressive scans interleave further segments: only SOI/EOI/headers are checked
        pos += 2 + length
        if marker != 0xDA:
            continue
        scan = np.frombuffer(data, np.uint8, count=max(0, end - pos), offset=min(pos, end))
        ff = np.flatnonzero(scan[:-1] == 0xFF)
        after = scan[ff + 1]
        bad = (after != 0) & (after != 0xFF) & ((after < 0xD0) | (after > 0xD7))
        if not bad.any():
            return None
        i = int(np.argmax(bad))
        at, marker = pos + int(ff[i]), int(after[i])
        if marker not in _BETWEEN_SCANS:
            return f"invalid marker FF{marker:02X} inside its entropy-coded data at byte {at}"
        pos = at  # the next scan of a multi-scan JPEG: parse its segments


class TileIntegrity:
    """Checks the JPEG tiles of a TIFF slide that reads touch, each tile once (cuCIM decodes corrupt tiles silently)."""

    def __init__(self, path: str, level_dimensions: tuple[tuple[int, int], ...]) -> None:
        import tifffile

        self.path = path
        self.levels: list[dict[str, Any] | None] = []
        with tifffile.TiffFile(path) as tif:  # the pyramid levels as cuCIM and the tifffile backend see them
            pages = sorted((p for p in tif.pages if p.is_tiled and p.samplesperpixel >= 3), key=lambda p: -p.imagewidth)
            if [(int(p.imagewidth), int(p.imagelength)) for p in pages] != [tuple(d) for d in level_dimensions]:
                return  # pages do not map onto the reader's levels: nothing to check against
            for p in pages:
                self.levels.append(None if p.compression != JPEG_COMPRESSION else {
                    "tile": (int(p.tilewidth), int(p.tilelength)),
                    "grid": (-(-int(p.imagewidth) // int(p.tilewidth)), -(-int(p.imagelength) // int(p.tilelength))),
                    "offsets": np.asarray(p.dataoffsets, np.int64), "counts": np.asarray(p.databytecounts, np.int64),
                    "checked": np.zeros(len(p.dataoffsets), bool)})
        self.fd = os.open(path, os.O_RDONLY) if any(self.levels) else None

    def problem(self, locations: np.ndarray, size: int, level: int, downsample: float) -> str | None:
        """Why a TIFF tile under these reads (level-0 (x, y), `size` px at `level`) is corrupt, or None."""
        info = self.levels[level] if self.fd is not None and level < len(self.levels) else None
        if info is None or not len(locations):
            return None
        (tw, th), (across, down) = info["tile"], info["grid"]
        xy = np.floor(np.asarray(locations, np.float64) / downsample).astype(np.int64)
        first = np.stack([xy[:, 0] // tw, xy[:, 1] // th], axis=1)
        last = np.stack([(xy[:, 0] + size - 1) // tw, (xy[:, 1] + size - 1) // th], axis=1)
        span = int((last - first).max()) + 1
        cells = [np.stack([first[:, 0] + dx, first[:, 1] + dy], axis=1)[
                     (first[:, 0] + dx <= last[:, 0]) & (first[:, 1] + dy <= last[:, 1])]
                 for dy in range(span) for dx in range(span)]
        cells = np.concatenate(cells)
        cells = cells[(cells[:, 0] >= 0) & (cells[:, 0] < across) & (cells[:, 1] >= 0) & (cells[:, 1] < down)]
        indices = np.unique(cells[:, 1] * across + cells[:, 0])
        for index in indices[~info["checked"][indices]]:
            offset, count = int(info["offsets"][index]), int(info["counts"][index])
            if count:  # a 0-byte tile is a missing (background) tile, not a corrupt one
                data = os.pread(self.fd, count, offset)
                reason = jpeg_tile_problem(data) if len(data) == count else "the file ends inside it"
                if reason:
                    return (f"corrupt JPEG tile {index} of level {level} (bytes {offset}..{offset + count} of "
                            f"{self.path}): {reason}")
            info["checked"][index] = True
        return None

    def close(self) -> None:
        """Release the file."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _tile_integrity(reader: Any) -> TileIntegrity | None:
    """The JPEG tile check of an open TIFF slide (None for OpenSlide formats or a TIFF it cannot map)."""
    if reader.info.backend == "openslide":
        return None
    try:
        return TileIntegrity(reader.path, reader.info.level_dimensions)
    except Exception as exc:  # noqa: BLE001 - the check is a safety net; the reader already validated the file
        log.debug("no JPEG tile check for %s: %s", reader.path, exc)
        return None


class TileReaders:
    """A small LRU of open slide readers (a CuImage cannot be pickled: each actor opens its own)."""

    def __init__(self, device: str = "cpu", capacity: int = 4) -> None:
        self.device = device
        self.capacity = capacity
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._checks: dict[str, TileIntegrity | None] = {}

    def get(self, path: str, slide_id: str) -> Any:
        """The open reader of `path`, opening it (and closing the least recently used) when needed."""
        from hnm_ray.slides.reader import open_slide

        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        reader = open_slide(path, slide_id=slide_id, device=self.device)
        self._open[path] = reader
        self._checks[path] = _tile_integrity(reader)
        if len(self._open) > self.capacity:
            old_path, old = self._open.popitem(last=False)
            old.close()
            if (check := self._checks.pop(old_path, None)) is not None:
                check.close()
        return reader

    def check(self, path: str, locations: np.ndarray, size: int, level: int) -> None:
        """Raise SlideError when a JPEG tile under these reads of the open slide `path` is corrupt."""
        check, reader = self._checks.get(path), self._open.get(path)
        if check is None or reader is None:
            return
        if reason := check.problem(locations, size, level, reader.info.level_downsamples[level]):
            raise SlideError(reader.slide_id, reason, _FIX_CORRUPT_TILE)


def decode_batch(readers: TileReaders, batch: dict[str, np.ndarray], tile_size: int, num_workers: int) -> tuple[Any, np.ndarray]:
    """Decode a batch of tile rows (any mix of slides) -> (tiles (B,S,S,3) uint8, per-row error strings)."""
    n = len(batch["tile_id"])
    tiles = None
    errors = np.full(n, "", dtype=object)
    paths = batch["path"]
    starts = np.flatnonzero(np.r_[True, paths[1:] != paths[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], n]):
        rows = slice(start, stop)
        slide_id = str(batch["slide_id"][start])
        try:
            reader = readers.get(str(paths[start]), slide_id)
            locations = np.stack([batch["x"][rows], batch["y"][rows]], axis=1).astype(np.int64)
            readers.check(str(paths[start]), locations, int(batch["size"][start]), int(batch["level"][start]))
            part = reader.read_tiles(locations, int(batch["size"][start]), int(batch["level"][start]),
                                     batch_size=stop - start, num_workers=num_workers)
            part = _resize(part, tile_size)
        except Exception as exc:  # noqa: BLE001 - recorded per slide by the driver
            errors[rows] = str(exc) if isinstance(exc, SlideError) else f"slide {slide_id!r}: tile read failed: {exc}"
            continue
        if tiles is None:
            tiles = _zeros_like(part, n, tile_size)
        tiles[rows] = part
    if tiles is None:
        tiles = np.zeros((n, tile_size, tile_size, 3), np.uint8)
    return tiles, errors


def _zeros_like(part: Any, n: int, tile_size: int) -> Any:
    xp = np if isinstance(part, np.ndarray) else __import__("cupy")
    return xp.zeros((n, tile_size, tile_size, 3), dtype=xp.uint8)


def _resize(tiles: Any, tile_size: int) -> Any:
    """Resize (B,H,W,3) uint8 tiles to tile_size when read at another size (mpp-based tiling)."""
    if tiles.shape[1] == tile_size and tiles.shape[2] == tile_size:
        return tiles
    import torch

    t = torch.from_dlpack(tiles) if not isinstance(tiles, np.ndarray) else torch.from_numpy(np.ascontiguousarray(tiles))
    t = torch.nn.functional.interpolate(t.permute(0, 3, 1, 2).float(), size=(tile_size, tile_size), mode="bilinear",
                                        antialias=True, align_corners=False)
    out = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return out.numpy() if isinstance(tiles, np.ndarray) else __import__("cupy").from_dlpack(out)


class TileDecoder:
    """Ray Data stage: tile coordinate rows -> decoded uint8 tiles (cuCIM batched reads on CPU)."""

    def __init__(self, tile_size: int, num_workers: int = 1) -> None:
        self.tile_size = tile_size
        self.num_workers = num_workers
        self.readers = TileReaders(device="cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tiles, errors = decode_batch(self.readers, batch, self.tile_size, self.num_workers)
        passthrough = {k: v for k, v in batch.items() if k not in COORDINATE_COLUMNS}
        return {**passthrough, "tiles": tiles, "error": errors}


class TileEncoder:
    """Ray Data actor: loads the encoder once; embeds decoded tiles, or decodes on the GPU itself (fused)."""

    def __init__(self, encoder: str, weights: str | None, seed: int, use_gpu: bool, torch_threads: int,
                 tile_size: int, decode_workers: int, fused_decode: bool) -> None:
        import torch

        from hnm_ray.models.encoders import build_encoder

        torch.set_num_threads(max(1, torch_threads))
        self.device = torch_device(use_gpu)
        torch.manual_seed(seed)
        self.model = build_encoder(encoder, weights).to(self.device).eval()
        self.tile_size = tile_size
        self.decode_workers = decode_workers
        self.readers = TileReaders(device=self.device) if fused_decode else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from hnm_ray.models.encoders import to_model_input

        if self.readers is not None:
            tiles, errors = decode_batch(self.readers, batch, self.tile_size, self.decode_workers)
        else:
            tiles, errors = batch["tiles"], batch["error"]
        # DLPack hands device (cupy) tiles to torch without a host round trip; numpy tiles are wrapped.
        pixels = torch.from_numpy(_writable(tiles)) if isinstance(tiles, np.ndarray) else torch.from_dlpack(tiles)
        with torch.inference_mode():
            embedding = self.model(to_model_input(pixels.to(self.device))).float().cpu().numpy()
        return {"slide_id": batch["slide_id"], "tile_id": batch["tile_id"], "embedding": embedding, "error": errors}


def _writable(array: np.ndarray) -> np.ndarray:
    """A contiguous, writable view or copy (Ray hands batches out read-only; torch wants writable)."""
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


class SlideGatherer:
    """Driver side: collects each slide's embedded tiles and writes the slide once all have arrived."""

    def __init__(self, store: FeatureStore, index: dict[str, pa.Table], config: ExtractConfig, metadata: dict[str, Any]) -> None:
        self.store = store
        self.index = index
        self.config = config
        self.metadata = metadata
        self._parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        self._counts: dict[str, int] = defaultdict(int)
        self.failed: dict[str, str] = {}
        self.written = 0
        self.tiles_written = 0

    def add(self, batch: dict[str, np.ndarray]) -> tuple[int, int]:
        """Take one output batch; returns (slides completed, tiles taken) by this batch."""
        done = 0
        slide_ids = batch["slide_id"]
        starts = np.flatnonzero(np.r_[True, slide_ids[1:] != slide_ids[:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], len(slide_ids)]):
            slide_id = str(slide_ids[start])
            if slide_id in self.failed:
                continue
            errors = [e for e in batch["error"][start:stop] if e]
            if errors:
                self._fail(slide_id, errors[0])
                continue
            self._parts[slide_id].append((batch["tile_id"][start:stop], batch["embedding"][start:stop]))
            self._counts[slide_id] += stop - start
            if self._counts[slide_id] == self.index[slide_id].num_rows:
                self._write(slide_id)
                done += 1
        return done, len(slide_ids)

    def _fail(self, slide_id: str, cause: str) -> None:
        self.failed[slide_id] = cause
        self._parts.pop(slide_id, None)
        self.store.record_error(slide_id, "extract", cause)
        log.warning("skipping %s", cause)

    def _write(self, slide_id: str) -> None:
        parts = self._parts.pop(slide_id)
        tile_ids = np.concatenate([p[0] for p in parts])
        embeddings = np.concatenate([p[1] for p in parts])
        order = np.argsort(tile_ids, kind="stable")
        tiles = self.index[slide_id]
        if not np.array_equal(tile_ids[order], tiles["tile_id"].to_numpy()):
            raise HnmError(f"slide {slide_id!r}: extraction returned tiles that do not match its tile index")
        self.store.write_slide(slide_id, tiles.drop_columns(["slide_id", "path", "truth"]), embeddings[order].astype(self.config.dtype),
                               tiles["truth"].to_numpy(), self.metadata)
        self.written += 1
        self.tiles_written += len(order)

    def unfinished(self) -> list[str]:
        """Slides that started but never completed (should be none)."""
        return sorted(s for s in self._parts if s not in self.failed)


def build_index(records: list[SlideRecord], config: ExtractConfig, store: FeatureStore) -> dict[str, pa.Table]:
    """Tile index of every slide, one Ray task each; failed slides are recorded in the store and left out."""
    import ray

    task = ray.remote(num_cpus=config.cpus_per_decoder, max_retries=1)(_index_task)
    refs = [task.remote(r, config) for r in records]
    progress = Progress("tile index (slides)", len(refs))
    index: dict[str, pa.Table] = {}
    while refs:
        ready, refs = ray.wait(refs, num_returns=1)
        slide_id, table, error = ray.get(ready[0])
        if error is not None:
            store.record_error(slide_id, "index", error)
            log.warning("skipping %s", error)
        else:
            index[slide_id] = table
        progress.update(1)
    return index


def extract_features(config: ExtractConfig, records: list[SlideRecord] | None = None) -> ExtractionSummary:
    """Run the extraction pipeline; returns what was written, skipped and failed."""
    import ray

    from hnm_ray.models.encoders import build_encoder

    init_ray()
    if records is None:
        records = load_manifest(config.manifest, require_labels=False)
    if config.limit_slides:
        records = records[: config.limit_slides]
    store = FeatureStore(config.out, config.store_tag(), round=config.round)
    done = store.completed()
    todo = [r for r in records if r.slide_id not in done]
    log.info("extract: %d slides, %d already in %s, %d to do", len(records), len(records) - len(todo), store.directory, len(todo))
    progress = Progress("extract (tiles)", 0)
    summary = ExtractionSummary(str(store.directory), len(records), len(records) - len(todo), 0, [], 0, 0.0)
    if not todo:
        return summary
    store.ensure_writable()  # fail in a second, not after the whole cohort was decoded and encoded
    index = build_index(todo, config, store)
    failed = [r.slide_id for r in todo if r.slide_id not in index]
    if index:
        use_gpu = (config.gpus_per_encoder if config.gpus_per_encoder is not None else min(1.0, cluster_gpus())) > 0
        dim = build_encoder(config.encoder, config.weights).out_dim
        metadata = {"encoder": config.encoder, "encoder_tag": store.encoder_tag, "weights": config.weights or "",
                    "tile_size": config.tile_size, "level": config.level, "mpp": config.mpp, "dim": int(dim),
                    "dtype": config.dtype, "round": config.round, "seed": config.seed}
        _warn_if_settings_changed(store, metadata, len(records) - len(todo))
        gatherer = SlideGatherer(store, index, config, metadata)
        progress = Progress("extract (tiles)", sum(t.num_rows for t in index.values()))
        slides_done = 0
        for batch in _pipeline(index, config, use_gpu).iter_batches(batch_size=None, batch_format="numpy"):
            n_slides, n_tiles = gatherer.add(batch)
            slides_done += n_slides
            progress.update(n_tiles, slides=n_slides)
        for slide_id in gatherer.unfinished():
            gatherer._fail(slide_id, f"slide {slide_id!r}: only part of its tiles came back from the pipeline")
        failed += list(gatherer.failed)
        summary.slides_written = gatherer.written
        summary.tiles_written = gatherer.tiles_written
    summary.slides_failed = sorted(failed)
    summary.seconds = progress.elapsed
    log.info("extract: wrote %d slides (%d tiles, %.1f tiles/s), %d failed (see %s)", summary.slides_written,
             summary.tiles_written, summary.tiles_per_second, len(failed), store.errors_path)
    return summary


RESUME_KEYS = ("encoder", "weights", "seed", "tile_size", "level", "mpp", "dim", "dtype")


def _warn_if_settings_changed(store: FeatureStore, metadata: dict[str, Any], n_done: int) -> None:
    """Warn when resuming into a store whose finished slides were extracted with other settings (the tag omits them)."""
    if not n_done:
        return
    try:
        old = store.metadata()
    except HnmError:
        return
    changed = {k: (old[k], metadata[k]) for k in RESUME_KEYS if k in old and old[k] != metadata[k]}
    if changed:
        log.warning("extract: %d finished slide(s) in %s were extracted with other settings %s (old, new); they are kept "
                    "as they are. Use another --out or --tag, or delete the folder, to extract every slide anew",
                    n_done, store.directory, changed)


def _pipeline(index: dict[str, pa.Table], config: ExtractConfig, use_gpu: bool):
    """The Ray Data plan: tile rows -> [decode tasks] -> encoder actor pool."""
    import ray

    tables = [t.select(list(INDEX_COLUMNS)) for t in index.values()]
    ds = ray.data.from_arrow(tables)
    fused = use_gpu
    if not fused:
        ds = ds.map_batches(TileDecoder, fn_constructor_args=(config.tile_size, config.decode_workers),
                            batch_size=config.batch_size, num_cpus=config.cpus_per_decoder,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, config.num_encoders)))
    gpus = (config.gpus_per_encoder if config.gpus_per_encoder is not None else 1.0) if use_gpu else 0.0
    return ds.map_batches(
        TileEncoder,
        fn_constructor_args=(config.encoder, config.weights, config.seed, use_gpu, int(max(1, config.cpus_per_encoder)),
                             config.tile_size, config.decode_workers, fused),
        batch_size=config.batch_size, num_cpus=config.cpus_per_encoder, num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=config.num_encoders),
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point of `python -m hnm_ray.extract`."""
    parser = argparse.ArgumentParser(prog="python -m hnm_ray.extract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with any of the knobs below")
    cfg.add_arguments(parser, ExtractConfig)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = cfg.build(ExtractConfig, args, args.config)
        if not config.manifest:
            raise cfg.ConfigError("manifest", "required: pass --manifest PATH (CSV/Parquet)")
        summary = extract_features(config)
    except HnmError as exc:
        log.error("%s", exc)
        return 2
    print(summary)
    return 1 if summary.slides_failed and not summary.slides_written and not summary.slides_skipped_done else 0


if __name__ == "__main__":
    raise SystemExit(main())
