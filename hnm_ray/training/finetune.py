"""Encoder fine-tuning on Ray Train (DESIGN §1 step 7): SupCon on hard negatives + self-paced positives.

The driver builds a table of the round's tiles (the miner's hard negatives, label 0, and the
positive-slide tiles above the threshold, label 1, each with its rank among positives), shuffles it,
and hands Ray Data the coordinates: decode actors read only those tiles from the slides with cuCIM
and stream them into the Train workers (`get_dataset_shard`). Each worker makes two augmented views
per tile and trains encoder + projection head with SupCon: negatives as anchors on every batch
(step A), positives as anchors too after the warm-up (step B); positives enter by the self-paced
ratio r_t. An epoch iterates over the hard negatives, so its cost scales with neg_ratio. With no
labels the same machinery is SimCLR (NT-Xent), the self-supervised warm start.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hnm_ray import config as cfg
from hnm_ray.errors import HnmError
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord

log = logging.getLogger("hnm_ray")

CHECKPOINT_FILE = "finetune.pt"
TILE_ROW_SCHEMA = pa.schema([("slide_id", pa.string()), ("path", pa.string()), ("tile_id", pa.int32()),
                             ("x", pa.int32()), ("y", pa.int32()), ("level", pa.int8()), ("size", pa.int16()),
                             ("label", pa.int8()), ("pos_rank", pa.float32())])


@dataclass
class FinetuneConfig:
    """Encoder fine-tuning with SupCon on hard negatives and self-paced positives."""

    ft_lr: float = cfg.knob(0.01, "encoder SGD learning rate (cosine schedule over all epochs)")
    ft_momentum: float = cfg.knob(0.9, "encoder SGD momentum")
    ft_weight_decay: float = cfg.knob(1e-4, "encoder SGD weight decay")
    ft_batch_size: int = cfg.knob(64, "tiles per fine-tuning batch per worker (two views each)")
    temperature: float = cfg.knob(0.07, "SupCon temperature")
    proj_dim: int = cfg.knob(256, "projection head output size")
    warmup_epochs: int = cfg.knob(1, "epochs before positives act as anchors (step B) and r_t starts growing")
    ro: float = cfg.knob(0.2, "self-paced positive ratio at the end of warm-up")
    rT: float = cfg.knob(0.8, "self-paced positive ratio at the last epoch")
    threshold: float = cfg.knob(0.3, "pseudo-label probability above which a positive-slide tile may be a positive")
    pos_per_neg: float = cfg.knob(1.0, "positives streamed per hard negative in an epoch (the epoch iterates over "
                                       "the hard negatives, so its cost scales with neg_ratio)")
    ft_workers: int = cfg.knob(1, "Ray Train workers for fine-tuning (0: in the driver process)")
    ft_cpus_per_worker: float = cfg.knob(1.0, "CPUs per fine-tuning worker (also its torch threads)")
    ft_use_gpu: bool = cfg.knob(False, "fine-tune on GPUs")
    decoders: int = cfg.knob(1, "Ray Data decode actors feeding the fine-tuning workers")

    def validate(self) -> None:
        """Raise ConfigError on out-of-range values."""
        cfg.check_range("ft_lr", self.ft_lr, 0.0, low_open=True)
        cfg.check_range("ft_batch_size", self.ft_batch_size, 2)
        cfg.check_range("temperature", self.temperature, 0.0, low_open=True)
        cfg.check_range("ro", self.ro, 0.0, 1.0)
        cfg.check_range("rT", self.rT, self.ro, 1.0)
        cfg.check_range("threshold", self.threshold, 0.0, 1.0)
        cfg.check_range("pos_per_neg", self.pos_per_neg, 0.0, low_open=True)
        cfg.check_range("warmup_epochs", self.warmup_epochs, 0)
        cfg.check_range("ft_workers", self.ft_workers, 0)
        cfg.check_range("decoders", self.decoders, 1)


def sample_positives(positives: pa.Table, n: int, max_rank: float, seed: int) -> pa.Table:
    """`n` positives for one round's epochs, drawn from those with pos_rank <= max_rank (the round's largest r_t);
    with replacement only when fewer exist. Workers drop those above each epoch's own r_t."""
    pool = positives.filter(pa.compute.less_equal(positives["pos_rank"], max_rank))
    if pool.num_rows == 0 or n <= 0:
        return pool.slice(0, 0)
    rng = np.random.default_rng(seed)
    return pool.take(np.sort(rng.choice(pool.num_rows, n, replace=pool.num_rows < n)))


def tile_rows(store: FeatureStore, records: list[SlideRecord], selections: list[tuple[pa.Table, int]],
              seed: int) -> pa.Table:
    """Coordinates of selected tiles (tables of slide_id, tile_id[, pos_rank]) with their labels, shuffled."""
    paths = {r.slide_id: r.path for r in records}
    parts = []
    for table, label in selections:
        for slide_id in sorted(set(table["slide_id"].to_pylist())):
            chosen = table.filter(pa.compute.equal(table["slide_id"], slide_id))
            coords = store.read_table(slide_id, columns=["tile_id", "x", "y", "level", "size"])
            joined = chosen.join(coords, keys="tile_id", join_type="inner")
            n = joined.num_rows
            ranks = joined["pos_rank"] if "pos_rank" in joined.column_names else pa.array(np.zeros(n, np.float32))
            parts.append(pa.table({"slide_id": pa.array([slide_id] * n), "path": pa.array([paths[slide_id]] * n),
                                   "tile_id": joined["tile_id"], "x": joined["x"], "y": joined["y"],
                                   "level": joined["level"], "size": joined["size"],
                                   "label": pa.array(np.full(n, label, np.int8)), "pos_rank": ranks},
                                  schema=TILE_ROW_SCHEMA))
    rows = pa.concat_tables(parts) if parts else TILE_ROW_SCHEMA.empty_table()
    return rows.take(np.random.default_rng(seed).permutation(rows.num_rows))


def projection_head(in_dim: int, out_dim: int):
    """The SupCon projection head of ItS2CLR: in -> in -> out with a ReLU."""
    import torch.nn as nn

    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


def contrastive_model(encoder, head):
    """Encoder + projection head as one module (one forward, so DDP can wrap it)."""
    import torch.nn as nn

    class EncoderWithHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.head = encoder, head

        def forward(self, x):
            return self.head(self.encoder(x))

    return EncoderWithHead()


def _batch_loss(batch: dict[str, np.ndarray], model, fc: dict[str, Any], epoch: int, ratio: float,
                gen, device: str, supervised: bool):
    """SupCon (or NT-Xent when unsupervised) loss of one streamed batch."""
    import torch

    from hnm_ray.augment import AugmentConfig, two_views
    from hnm_ray.losses import supcon_loss
    from hnm_ray.models.encoders import to_model_input

    ok = np.asarray([not e for e in batch["error"]])
    labels = batch["label"].astype(np.int64)
    keep = ok & ((labels == 0) | (batch["pos_rank"] <= ratio)) if supervised else ok
    if keep.sum() < 2:
        keep = ok if ok.sum() >= 2 else np.ones_like(ok)
    tiles = torch.from_numpy(np.ascontiguousarray(batch["tiles"][keep]))
    v1, v2 = two_views(tiles, AugmentConfig(), gen)
    z1 = model(to_model_input(v1.to(device)))
    z2 = model(to_model_input(v2.to(device)))
    if not supervised:
        return supcon_loss(z1, z2, None, fc["temperature"])
    y = torch.from_numpy(labels[keep]).to(device)
    loss = supcon_loss(z1, z2, y, fc["temperature"], anchor_mask=y == 0)
    if epoch >= fc["warmup_epochs"] and bool((y == 1).any()):
        loss = loss + supcon_loss(z1, z2, y, fc["temperature"], anchor_mask=y == 1)
    return loss


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Ray Train body: stream decoded tiles, two views each, SupCon step; checkpoint every epoch."""
    import ray.train
    import ray.train.torch
    import torch

    from hnm_ray.mining import positive_ratio
    from hnm_ray.models.encoders import build_encoder
    from hnm_ray.training.checkpointing import latest_checkpoint, load_state, report

    fc = loop["ft"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = str(ray.train.torch.get_device()) if fc["ft_use_gpu"] else "cpu"
    torch.set_num_threads(max(1, int(fc["ft_cpus_per_worker"])))
    torch.manual_seed(loop["seed"])
    encoder = build_encoder(loop["encoder"], loop["weights"])
    head = projection_head(encoder.out_dim, fc["proj_dim"])
    if loop.get("head_weights"):
        head.load_state_dict(torch.load(loop["head_weights"], map_location="cpu"))
    model = contrastive_model(encoder, head)
    optimizer = torch.optim.SGD(model.parameters(), lr=fc["ft_lr"], momentum=fc["ft_momentum"],
                                weight_decay=fc["ft_weight_decay"])
    total, start = loop["total_epochs"], loop["first_epoch"]
    # Cosine over all rounds' epochs; this fit starts at `first_epoch` of that schedule.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * min(e + loop["first_epoch"], total) / total)))
    checkpoint = latest_checkpoint(loop["driver_checkpoints"], CHECKPOINT_FILE)
    if checkpoint:
        state = load_state(checkpoint, CHECKPOINT_FILE)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["epoch"] + 1
    ddp = ray.train.torch.prepare_model(model) if context.get_world_size() > 1 else model.to(device)
    plain = getattr(ddp, "module", ddp)
    shard = ray.train.get_dataset_shard("tiles")
    supervised = loop["supervised"]
    for epoch in range(start, loop["last_epoch"]):
        ddp.train()
        epoch_started = time.perf_counter()
        gen = torch.Generator().manual_seed(loop["seed"] * 100003 + epoch * 101 + rank)
        ratio = positive_ratio(epoch, fc["warmup_epochs"], total, fc["ro"], fc["rT"]) if supervised else 1.0
        losses, tiles_seen = [], 0
        for batch in shard.iter_batches(batch_size=fc["ft_batch_size"], batch_format="numpy",
                                        local_shuffle_buffer_size=4 * fc["ft_batch_size"]):
            loss = _batch_loss(batch, ddp, fc, epoch, ratio, gen, device, supervised)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            tiles_seen += len(batch["tile_id"])
        scheduler.step()
        metrics = {"epoch": epoch, "ft_loss": float(np.mean(losses)) if losses else float("nan"),
                   "tiles": tiles_seen, "positive_ratio": ratio, "lr": scheduler.get_last_lr()[0],
                   "epoch_seconds": time.perf_counter() - epoch_started}
        state = {"model": plain.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch} if rank == 0 else None
        report(metrics, state, CHECKPOINT_FILE, loop["driver_checkpoints"])


@dataclass
class FinetuneResult:
    """Where the fine-tuned encoder and head weights were written, and the per-epoch metrics."""

    encoder_weights: str
    head_weights: str
    history: list[dict[str, Any]]


def fit_finetune(config: FinetuneConfig, rows: pa.Table, encoder: str, weights: str | None, run_dir: str | Path,
                 name: str, first_epoch: int, last_epoch: int, total_epochs: int, tile_size: int, seed: int = 0,
                 head_weights: str | None = None, supervised: bool = True) -> FinetuneResult:
    """Fine-tune the encoder on `rows` (see `tile_rows`) for epochs [first_epoch, last_epoch) with Ray Train."""
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hnm_ray.decode import TileDecoder
    from hnm_ray.training.checkpointing import driver_checkpoint_dir, load_state, newest_driver_checkpoint

    if rows.num_rows < 2:
        raise HnmError(f"fine-tuning {name!r} needs at least 2 tiles; the selection has {rows.num_rows}. "
                       "Raise neg_ratio or lower threshold.")
    run_dir = Path(run_dir).resolve()
    tiles = ray.data.from_arrow(rows).map_batches(
        TileDecoder, fn_constructor_args=(tile_size, 1), batch_size=config.ft_batch_size, num_cpus=0.5,
        compute=ray.data.ActorPoolStrategy(size=config.decoders))
    loop = {"ft": asdict(config), "encoder": encoder, "weights": weights, "head_weights": head_weights, "seed": seed,
            "first_epoch": first_epoch, "last_epoch": last_epoch, "total_epochs": total_epochs, "supervised": supervised,
            "driver_checkpoints": driver_checkpoint_dir(config.ft_workers, run_dir / "ray_train", name)}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop, datasets={"tiles": tiles},
        scaling_config=ScalingConfig(num_workers=config.ft_workers, use_gpu=config.ft_use_gpu,
                                     resources_per_worker={"CPU": config.ft_cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(run_dir / "ray_train"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=2)),
    )
    result = trainer.fit()
    if result.error:
        raise HnmError(f"fine-tuning {name!r} failed: {result.error}")
    checkpoint = result.checkpoint or newest_driver_checkpoint(loop["driver_checkpoints"], CHECKPOINT_FILE)
    state = load_state(checkpoint, CHECKPOINT_FILE)["model"]
    encoder_path, head_path = run_dir / f"{name}_encoder.pt", run_dir / f"{name}_head.pt"
    torch.save({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}, encoder_path)
    torch.save({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}, head_path)
    return FinetuneResult(str(encoder_path), str(head_path), [result.metrics])
