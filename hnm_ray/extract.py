"""Feature extraction: slides -> tile index -> cuCIM decode -> encoder actors -> per-slide Parquet.

A Ray Data pipeline. One read task per slide reads or computes (and stores) its tile index, streaming tile
coordinates (never pixels) while earlier slides are decoded and encoded; an encoder actor pool (GPU when there are
GPUs) reads each batch's tiles with cuCIM's batched `read_region` (the next batch while encoding one) and
embeds them; the driver gathers each slide's embeddings and writes one complete Parquet file per slide (temp name +
rename).
Re-running skips finished slides; a slide that fails is recorded in `errors.jsonl` and skipped. The JPEG
tiles under every read get a cheap marker check (`jpeg_tile_problem`): cuCIM decodes a corrupt tile into gray
pixels without raising, so without it a damaged slide would be embedded silently.

    python -m hnm_ray.extract --manifest M --out STORE [--encoder.name resnet18_in] [--tiling.tile_size 224]
    python -m hnm_ray.extract --config run.yaml --out STORE      # the same YAML as hnm_ray.train
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hnm_ray import config as cfg
from hnm_ray.config import EncoderConfig, TrainConfig
from hnm_ray.run.cli import entry_point
from hnm_ray.run.cli import parser as cli_parser
from hnm_ray.run.cluster import cluster_gpus, init_ray, live_nodes, torch_device
from hnm_ray.extraction.decode import TileReaders, decode_batch
from hnm_ray.extraction.encoder_pool import plan_encoder_pool
from hnm_ray.core.errors import ConfigError, HnmError
from hnm_ray.extraction.index import INDEX_FAILED, TileIndex
from hnm_ray.run.progress import Progress
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord, load_manifest

log = logging.getLogger("hnm_ray")

CALLS_IN_FLIGHT = 2  # batches an encoder actor holds at once: one decoding while one encodes


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


class TileEncoder:
    """Ray Data actor: loads the encoder once; decodes each batch's tiles itself (cuCIM, on its device) and embeds
    them (`embed`)."""

    def __init__(self, encoder: EncoderConfig, seed: int, use_gpu: bool, torch_threads: int,
                 tile_size: int, decode_workers: int) -> None:
        import torch

        from hnm_ray.models.encoders import encoder_from_config

        torch.set_num_threads(max(1, torch_threads))
        self.device = torch_device(use_gpu, "extract.gpus_per_encoder")
        torch.manual_seed(seed)
        self.model = encoder_from_config(encoder).to(self.device).eval()
        self.precision = encoder.precision
        self.tile_size = tile_size
        self.decode_workers = decode_workers
        self.readers = TileReaders(device=self.device)
        # CALLS_IN_FLIGHT calls may run at once (`_pipeline`): one decodes the next batch while the other encodes,
        # each stage one at a time (the readers' LRU and the torch threads or GPU are not shared by two calls).
        self._decoding, self._encoding = threading.Lock(), threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._decoding:
            tiles, errors = decode_batch(self.readers, batch, self.tile_size, self.decode_workers)
        with self._encoding:
            embedding = self.embed(tiles)
        return {"slide_id": batch["slide_id"], "tile_id": batch["tile_id"], "n_tiles": batch["n_tiles"],
                "embedding": embedding, "error": errors}

    def embed(self, tiles: Any) -> np.ndarray:
        """Embeddings (B, dim) float32 of decoded uint8 tiles (B, S, S, 3), numpy or on the device (cupy)."""
        import torch

        from hnm_ray.models.encoders import autocast, to_model_input

        # DLPack hands device (cupy) tiles to torch without a host round trip; numpy tiles are wrapped.
        pixels = torch.from_numpy(_writable(tiles)) if isinstance(tiles, np.ndarray) else torch.from_dlpack(tiles)
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.model(to_model_input(pixels.to(self.device), self.model.input_space)).float().cpu().numpy()


def _writable(array: np.ndarray) -> np.ndarray:
    """A contiguous, writable view or copy (Ray hands batches out read-only; torch wants writable)."""
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


class SlideGatherer:
    """Driver side: collects each slide's embedded tiles and writes the slide once all have arrived (the rows say
    how many: `n_tiles`); the slide's tile grid and truth come from its stored index."""

    def __init__(self, store: FeatureStore, index: TileIndex, dtype: str, metadata: dict[str, Any]) -> None:
        self.store = store
        self.index = index
        self.dtype = dtype
        self.metadata = metadata
        self._parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        self._counts: dict[str, int] = defaultdict(int)
        self._expected: dict[str, int] = {}
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
                self._fail(slide_id, errors[0], "index" if batch["tile_id"][start] == INDEX_FAILED else "extract")
                continue
            self._expected[slide_id] = int(batch["n_tiles"][start])
            self._parts[slide_id].append((batch["tile_id"][start:stop], batch["embedding"][start:stop]))
            self._counts[slide_id] += stop - start
            if self._counts[slide_id] == self._expected[slide_id]:
                self._write(slide_id)
                done += 1
        return done, len(slide_ids)

    def _fail(self, slide_id: str, cause: str, stage: str = "extract") -> None:
        self.failed[slide_id] = cause
        self._parts.pop(slide_id, None)
        self.store.record_error(slide_id, stage, cause)
        log.warning("skipping %s", cause)

    def _write(self, slide_id: str) -> None:
        parts = self._parts.pop(slide_id)
        tile_ids = np.concatenate([p[0] for p in parts])
        embeddings = np.concatenate([p[1] for p in parts])
        order = np.argsort(tile_ids, kind="stable")
        tiles = self.index.read(slide_id)
        if not np.array_equal(tile_ids[order], tiles["tile_id"].to_numpy()):
            raise HnmError(f"slide {slide_id!r}: extraction returned tiles that do not match its tile index")
        self.store.write_slide(slide_id, tiles.drop_columns(["slide_id", "path", "truth"]), embeddings[order].astype(self.dtype),
                               tiles["truth"].to_numpy(), self.metadata)
        self.written += 1
        self.tiles_written += len(order)

    def unfinished(self) -> list[str]:
        """Slides that started but never completed (should be none)."""
        return sorted(s for s in self._parts if s not in self.failed)


def extract_features(records: list[SlideRecord], store: FeatureStore, config: TrainConfig,
                     index_root: str | Path | None = None) -> ExtractionSummary:
    """Features of `records` into `store` with the encoder, tiling and resources of `config`; resumes, and records
    and skips failed slides. The tile index is read from (or written to) `index_root` (default: the store root),
    so later rounds reuse round 0's tissue detection. Returns what was written, skipped and failed."""
    from hnm_ray.models.encoders import encoder_out_dim, with_cache

    init_ray()
    config = dataclasses.replace(config, encoder=with_cache(config.encoder))  # the actors read the same model files
    encoder, extract = config.encoder, config.extract
    done = store.completed()
    todo = [r for r in records if r.slide_id not in done]
    log.info("extract: %d slides, %d already in %s, %d to do", len(records), len(records) - len(todo), store.directory, len(todo))
    progress = Progress("extract (tiles)", 0)
    summary = ExtractionSummary(str(store.directory), len(records), len(records) - len(todo), 0, [], 0, 0.0)
    if not todo:
        return summary
    store.ensure_writable()  # fail in a second, not after the whole cohort was decoded and encoded
    use_gpu = (extract.gpus_per_encoder if extract.gpus_per_encoder is not None else min(1.0, cluster_gpus())) > 0
    metadata = store_metadata(config, store, encoder_out_dim(encoder))
    _warn_if_settings_changed(store, metadata, len(records) - len(todo))
    index = TileIndex(index_root or store.root, config.tiling)
    gatherer = SlideGatherer(store, index, extract.dtype, metadata)
    progress = Progress("extract (slides)", len(todo))
    for batch in _pipeline(todo, index, config, use_gpu).iter_batches(batch_size=None, batch_format="numpy"):
        n_slides, n_tiles = gatherer.add(batch)
        progress.update(n_slides, tiles=n_tiles)
    for slide_id in gatherer.unfinished():
        gatherer._fail(slide_id, f"slide {slide_id!r}: only part of its tiles came back from the pipeline")
    missing = {r.slide_id for r in todo} - set(gatherer.failed) - store.completed()
    for slide_id in sorted(missing):  # never expected: every slide yields rows or an error row
        gatherer._fail(slide_id, f"slide {slide_id!r}: no rows came back from the pipeline")
    failed = list(gatherer.failed)
    summary.slides_written = gatherer.written
    summary.tiles_written = gatherer.tiles_written
    summary.slides_failed = sorted(failed)
    summary.seconds = progress.elapsed
    log.info("extract: wrote %d slides (%d tiles, %.1f tiles/s)%s", summary.slides_written, summary.tiles_written,
             summary.tiles_per_second, f", {len(failed)} failed (see {store.errors_path})" if failed else "")
    return summary


def store_metadata(config: TrainConfig, store: FeatureStore, dim: int) -> dict[str, Any]:
    """What the slide files of `store` record of the extraction that wrote them: the encoder, its weights and
    preprocessing (input space, mean, std, input size), the tiling, the feature size and dtype."""
    from hnm_ray.models.encoders import input_space_of

    encoder, tiling = config.encoder, config.tiling
    return {"encoder": encoder.name, "encoder_tag": store.encoder_tag, "weights": encoder.weights or "",
            "norm": encoder.norm, **input_space_of(encoder).describe(), "tile_size": tiling.tile_size,
            "level": tiling.level, "mpp": tiling.mpp, "dim": int(dim), "dtype": config.extract.dtype,
            "round": store.round, "seed": config.run.seed}


RESUME_KEYS = ("encoder", "weights", "norm", "input_space", "mean", "std", "input_size", "seed", "tile_size", "level",
               "mpp", "dim", "dtype")


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


def _pipeline(records: list[SlideRecord], index: TileIndex, config: TrainConfig, use_gpu: bool):
    """The Ray Data plan: per-slide index read tasks -> encoder actor pool, each actor decoding its own tiles.

    An actor runs CALLS_IN_FLIGHT calls at once so that one decodes the next batch (cuCIM, on the actor's device)
    while the other encodes (`TileEncoder`'s stage locks): on a GPU the host side of the decode (file reads, JPEG
    parsing, the batch's Python) then overlaps the encoder's kernels instead of leaving the GPU idle. The pool's size and
    each actor's resources: `encoder_pool.plan_encoder_pool`. A separate decode actor pool cost a second process
    start (~1-2 s of importing on the critical path) and a hop through the object store for every batch of pixels.
    """
    from hnm_ray.extraction.index_stream import tile_stream

    extract = config.extract
    pool = plan_encoder_pool(extract, use_gpu, live_nodes())
    log.info("extract: %s", pool.describe())
    return tile_stream(records, index).map_batches(
        TileEncoder,
        fn_constructor_args=(config.encoder, config.run.seed, use_gpu, pool.threads,
                             config.tiling.tile_size, extract.decode_workers),
        batch_size=extract.batch_size, num_cpus=pool.cpus, num_gpus=pool.gpus, compute=pool.strategy(CALLS_IN_FLIGHT),
    )


@entry_point
def main(argv: list[str] | None = None) -> int:
    """CLI entry point of `python -m hnm_ray.extract`."""
    from hnm_ray.models.encoders import config_tag, encoder_out_dim

    parser = cli_parser("python -m hnm_ray.extract", __doc__)
    parser.add_argument("--out", default="features", help="feature store root: a folder or s3:// / gs:// URI (default: features)")
    parser.add_argument("--tag", help="store folder of this encoder (default: derived from encoder + weights)")
    parser.add_argument("--round", type=int, default=0, help="round number in the store layout (default: 0)")
    parser.add_argument("--limit-slides", type=int, help="extract only the first N slides (smoke runs)")
    cfg.add_source_arguments(parser)
    cfg.add_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    config = cfg.load_config(TrainConfig, args)
    if not config.run.manifest:
        raise ConfigError("run.manifest", "required: pass --manifest PATH (CSV/Parquet)")
    records = load_manifest(config.run.manifest, require_labels=False)[: args.limit_slides]
    encoder_out_dim(config.encoder)  # a bad encoder name, plug-in, model or weights file fails before Ray starts
    store = FeatureStore(args.out, args.tag or config_tag(config.encoder), round=args.round)
    summary = extract_features(records, store, config)
    print(summary)
    return 1 if summary.slides_failed and not summary.slides_written and not summary.slides_skipped_done else 0


if __name__ == "__main__":
    raise SystemExit(main())
