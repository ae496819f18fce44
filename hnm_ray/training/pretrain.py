"""Self-supervised warm start of the tile encoder: SimCLR (NT-Xent) on random training tiles of the cohort."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from hnm_ray.config import TrainConfig
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training.finetune import TILE_ROW_SCHEMA, fit_finetune


def pretrain_simclr(config: TrainConfig, records: list[SlideRecord], run_dir, index_store: FeatureStore) -> str:
    """SimCLR on `pretrain.tiles` random training tiles for `pretrain.epochs`; returns the encoder weights file."""
    from hnm_ray.extract import build_index

    train = [r for r in records if r.split == "train"]
    index = build_index(train, config.tiling, index_store, config.extract.cpus_per_decoder)
    rows = sample_tile_rows(index, config.pretrain.tiles, config.run.seed)
    out = fit_finetune(config, rows, config.encoder.weights, run_dir, name="pretrain_simclr", first_epoch=0,
                       last_epoch=config.pretrain.epochs, total_epochs=config.pretrain.epochs, supervised=False)
    return out.encoder_weights


def sample_tile_rows(index: dict[str, pa.Table], n: int, seed: int) -> pa.Table:
    """Fine-tuning rows (label 0, unused by SimCLR) of `n` tiles drawn without replacement from a tile index."""
    table = pa.concat_tables([t.select(list(TILE_ROW_SCHEMA.names[:7])) for _, t in sorted(index.items())])
    rng = np.random.default_rng(seed)
    chosen = table.take(np.sort(rng.choice(table.num_rows, min(n, table.num_rows), replace=False)))
    zeros = np.zeros(chosen.num_rows)
    return (chosen.append_column("label", pa.array(zeros.astype(np.int8)))
            .append_column("pos_rank", pa.array(zeros.astype(np.float32))).cast(TILE_ROW_SCHEMA))
