"""Self-supervised warm start of the tile encoder: SimCLR (NT-Xent) on random training tiles of the cohort,
cached per cohort + encoder + tiling + recipe so reruns, rounds and sweep trials pre-train once."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from hnm_ray.core import storage
from hnm_ray.config import TrainConfig
from hnm_ray.extraction.index import TileIndex, slide_indexes
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training.finetune import fit_finetune
from hnm_ray.training.finetune_rows import TILE_ROW_SCHEMA

log = logging.getLogger("hnm_ray")

# Encoder knobs newer than the warm-start cache key (they enter it only when set).
PREPROCESSING = ("mean", "std", "input_size", "hub_cache", "hub_revision")


def warm_start_key(config: TrainConfig, records: list[SlideRecord]) -> str:
    """A digest of what the warm-start weights depend on: the training slides (id, path, size), the encoder, the
    tiling, the pre-training and augmentation knobs, the augmentations' strengths (a new default must not reuse
    weights cached with the old one) and the seed."""
    from hnm_ray.training.augment import AugmentConfig  # torch, only when a warm start is keyed

    slides = sorted((r.slide_id, str(r.path), os.path.getsize(r.path) if os.path.exists(r.path) else -1)
                    for r in records if r.split == "train")
    ft, pretrain = config.finetune, dataclasses.asdict(config.pretrain)
    optimiser = [pretrain.pop("lr"), pretrain.pop("momentum")]  # where finetune's stood: default keys are unchanged
    # The preprocessing knobs foundation models brought enter the key only when set: a default warm start keeps its key.
    encoder = {k: v for k, v in dataclasses.asdict(config.encoder).items() if not (k in PREPROCESSING and v is None)}
    parts = {"slides": slides, "encoder": encoder, "tiling": dataclasses.asdict(config.tiling),
             "pretrain": pretrain, "seed": config.run.seed,
             "finetune": [*optimiser, ft.weight_decay, ft.batch_size, ft.temperature, ft.proj_dim, ft.augment],
             "augment": {k: v for k, v in dataclasses.asdict(AugmentConfig()).items() if k != "orientations"}}
    if ft.orientations != "dihedral":  # newer than the key: the dihedral warm starts cached before keep theirs
        parts["orientations"] = ft.orientations
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def warm_start(config: TrainConfig, records: list[SlideRecord], run_dir: Path, cache: Path, index: TileIndex) -> str:
    """The SimCLR warm-start weights of this cohort and encoder: from the cache when present, else pre-trained
    now and cached (atomically) under <cache>/warm_start/."""
    cached = cache / "warm_start" / f"{config.encoder.name.replace(':', '-').replace('/', '_')}-"\
                                    f"{warm_start_key(config, records)}.safetensors"
    if cached.is_file():
        log.info("warm start: reusing %s (same cohort, encoder, tiling and pre-training knobs)", cached)
        return str(cached)
    log.info("warm start: SimCLR pre-training of %s for %d epochs on %d tiles (cached as %s)", config.encoder.name,
             config.pretrain.epochs, config.pretrain.tiles, cached)
    weights, head = pretrain_simclr(config, records, run_dir, index)
    for source, target in ((head, warm_start_head(cached)), (weights, cached)):  # the weights last: they mark it done
        storage.write_bytes(Path(source).read_bytes(), target)
    return str(cached)


def warm_start_head(weights: str | Path) -> Path:
    """Where the projection head of warm-start weights is cached: beside them (absent for caches of older versions)."""
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".head.pt")


def pretrain_simclr(config: TrainConfig, records: list[SlideRecord], run_dir: Path,
                    index: TileIndex) -> tuple[str, str]:
    """SimCLR on `pretrain.tiles` random training tiles for `pretrain.epochs`; returns the encoder weights file and
    the projection head's."""
    train = [r for r in records if r.split == "train"]
    errors = FeatureStore(Path(run_dir) / "features", "pretrain", round=0)  # where slides that fail tiling are noted
    tables = slide_indexes(train, index, errors, config.extract.cpus_per_decoder)
    rows = sample_tile_rows(tables, config.pretrain.tiles, config.run.seed)
    # SimCLR keeps its measured optimiser (SGD, pretrain.lr / momentum) whatever fine-tuning uses.
    simclr = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, lr=config.pretrain.lr,
                                                                      momentum=config.pretrain.momentum, optimizer="sgd"))
    out = fit_finetune(simclr, rows, config.encoder.weights, run_dir, name="pretrain_simclr", first_epoch=0,
                       last_epoch=config.pretrain.epochs, total_epochs=config.pretrain.epochs, supervised=False)
    return out.encoder_weights, out.head_weights


def sample_tile_rows(index: dict[str, pa.Table], n: int, seed: int) -> pa.Table:
    """Fine-tuning rows (label 0, unused by SimCLR) of `n` tiles drawn without replacement from a tile index."""
    table = pa.concat_tables([t.select(list(TILE_ROW_SCHEMA.names[:7])) for _, t in sorted(index.items())])
    rng = np.random.default_rng(seed)
    chosen = table.take(np.sort(rng.choice(table.num_rows, min(n, table.num_rows), replace=False)))
    zeros = np.zeros(chosen.num_rows)
    return (chosen.append_column("label", pa.array(zeros.astype(np.int8)))
            .append_column("pos_rank", pa.array(zeros.astype(np.float32)))
            .append_column("kind", pa.array(zeros.astype(np.int8)))
            .append_column("score", pa.array(zeros.astype(np.float32)))
            .append_column("supcon_class", pa.array(zeros.astype(np.int16))).cast(TILE_ROW_SCHEMA))
