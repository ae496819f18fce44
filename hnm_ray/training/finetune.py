"""Encoder fine-tuning on Ray Train: SupCon on hard negatives + self-paced positives.

The driver builds a table of the round's tiles (`finetune_rows`: the miner's hard negatives, label 0, and the
positive-slide tiles above the threshold, label 1, each with its rank among positives) in a seeded
order and hands the coordinates to the Train workers; each worker decodes its share of the tiles
with cuCIM one batch ahead of training (`tile_batches`). Each worker makes two augmented views
per tile and trains encoder + projection head (`contrastive`) with SupCon: negatives as anchors on every batch
(step A), positives as anchors too after the warm-up (step B); positives enter by the self-paced
ratio r_t. An epoch iterates over the hard negatives, so its cost scales with neg_ratio. The official
loop (`finetune.loop official`) composes each SGD step as the official loaders do (`official_steps`: step A and
step B as two streams, the official per-step batch split over the workers). With no labels the same machinery is
SimCLR (NT-Xent), the self-supervised warm start.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from hnm_ray.config import EncoderConfig, TrainConfig
from hnm_ray.core.errors import HnmError
from hnm_ray.run.progress import Progress, setup_logging
from hnm_ray.training.contrastive import build_contrastive
from hnm_ray.training.official_steps import HARD_NEGATIVE

if TYPE_CHECKING:
    from hnm_ray.models.encoders import InputSpace

log = logging.getLogger("hnm_ray")

CHECKPOINT_FILE = "finetune.pt"


def _views(tiles: np.ndarray, model, fc: dict[str, Any], gen, device: str, input_space: InputSpace):
    """Projections of two augmented views of uint8 tiles (B, H, W, 3)."""
    import torch

    from hnm_ray.training.augment import AugmentConfig, two_views
    from hnm_ray.models.encoders import to_model_input

    # Augmented on the training device (uint8 crosses to it, a quarter of the float bytes): on a GPU worker the CPU
    # would otherwise spend ~0.3 s a batch of 64 on the two views, longer than the GPU's step.
    v1, v2 = two_views(torch.from_numpy(np.ascontiguousarray(tiles)).to(device),
                       AugmentConfig(orientations=fc["orientations"]), gen, fc["augment"])
    return model(to_model_input(v1, input_space)), model(to_model_input(v2, input_space))


def _usable(batch: dict[str, np.ndarray], ratio: float, supervised: bool) -> np.ndarray:
    """Rows decoded without error and, for positives and uncertain negatives, within this epoch's r_t."""
    ok = _decoded(batch)
    keep = ok & ((batch["kind"] == HARD_NEGATIVE) | (batch["pos_rank"] <= ratio)) if supervised else ok
    return keep if keep.sum() >= 2 else ok


def _decoded(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Mask of the rows decoded without error."""
    return np.asarray([not e for e in batch["error"]], bool)


def our_loss(batch: dict[str, np.ndarray], model, fc: dict[str, Any], epoch: int, ratio: float, gen, device: str,
             supervised: bool, input_space: InputSpace):
    """Our loop, one SGD step per batch: SupCon with negatives as anchors (+ positives as anchors after warm-up);
    NT-Xent (SimCLR) when not supervised."""
    from hnm_ray.training.losses import supcon_loss

    keep = _usable(batch, ratio, supervised)
    z1, z2 = _views(batch["tiles"][keep], model, fc, gen, device, input_space)
    if not supervised:
        return supcon_loss(z1, z2, None, fc["temperature"])
    return our_objective(z1, z2, batch["label"][keep], fc, epoch, batch["supcon_class"][keep])


def our_objective(z1, z2, labels: np.ndarray, fc: dict[str, Any], epoch: int, classes: np.ndarray | None = None):
    """Our loop's objective on two views' projections (finetune.objective): SupCon with negatives as anchors (+
    positives as anchors after warm-up), a view's positives the views of its SupCon class (`classes`, default: the
    labels); "bce" the labels' binary cross-entropy on the projection (`prototype_bce`); "supcon_bce" their sum."""
    import torch

    from hnm_ray.training.losses import prototype_bce, supcon_loss

    y = torch.from_numpy(labels.astype(np.int64)).to(z1.device)
    objective = fc["objective"]
    bce = prototype_bce(z1, z2, y, fc["temperature"]) if objective != "supcon" else None
    if objective == "bce":
        return bce
    same = y if classes is None else torch.from_numpy(classes.astype(np.int64)).to(z1.device)
    loss = supcon_loss(z1, z2, same, fc["temperature"], anchor_mask=y == 0)
    if epoch >= fc["warmup_epochs"] and bool((y == 1).any()):
        loss = loss + supcon_loss(z1, z2, same, fc["temperature"], anchor_mask=y == 1)
    return loss if bce is None else loss + bce


def optimizer_for(params, fc: dict[str, Any]):
    """The fine-tuning optimiser (finetune.optimizer): SGD with momentum (the official), or Adam; at fc["lr"]."""
    import torch

    if fc["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=fc["lr"], weight_decay=fc["weight_decay"])
    return torch.optim.SGD(params, lr=fc["lr"], momentum=fc["momentum"], weight_decay=fc["weight_decay"])


def official_step_loss(batch: dict[str, np.ndarray], step_b: bool, model, fc: dict[str, Any], gen, device: str,
                       input_space: InputSpace, world: int):
    """One step of the official loop (`official_steps.Step`) on its decoded tiles: step A's SupCon (negatives anchor,
    uncertain negatives out of the contrast set) or step B's (positives anchor), averaged over all 2N views.

    A step with fewer than 2 tiles decoded without error is skipped (None) in one process. With several workers
    (DDP) every rank must take the same decision, or they disagree on the number of gradient all-reduces and NCCL
    hangs: a rank's decode errors are its own, so there the step is never skipped; such a rank contributes a zero
    loss through a forward and backward of all its tiles (zero gradients, the same all-reduces)."""
    rows = np.flatnonzero(_decoded(batch))
    if len(rows) < 2:
        if world == 1:
            return None
        z1, z2 = _views(batch["tiles"], model, fc, gen, device, input_space)
        return 0.0 * (z1.sum() + z2.sum())
    z1, z2 = _views(batch["tiles"][rows], model, fc, gen, device, input_space)
    return official_objective(z1, z2, batch["label"][rows], batch["kind"][rows], step_b, fc)


def official_objective(z1, z2, labels: np.ndarray, kinds: np.ndarray, step_b: bool, fc: dict[str, Any]):
    """The official step's SupCon on two views' projections: step B (positives anchor) or step A (negatives anchor,
    uncertain negatives out of the contrast set)."""
    import torch

    from hnm_ray.training.losses import supcon_step_a, supcon_step_b

    y = torch.from_numpy(labels.astype(np.int64)).to(z1.device)
    if step_b:
        return supcon_step_b(z1, z2, y, fc["temperature"])
    bag = torch.from_numpy((kinds != HARD_NEGATIVE).astype(np.int64)).to(z1.device)
    return supcon_step_a(z1, z2, y, bag, fc["temperature"])


def epoch_batches(loop: dict[str, Any], rows: dict[str, np.ndarray], epoch: int, rank: int,
                  world: int) -> tuple[list[np.ndarray], list[bool | None], float]:
    """This rank's batches of an epoch (row indices into `rows`), whether each is an official step B (None: our
    loop), and the epoch's r_t. Ours: the rank's share in a seeded order, `batch_size` a batch; the official loop:
    its part of every official step (`official_steps.epoch_steps`): N workers train on the official per-step batch."""
    from hnm_ray.mining.selection import positive_ratio
    from hnm_ray.training.official_steps import epoch_steps, official_ratio, step_sizes
    from hnm_ray.training.tile_batches import epoch_order, fixed_batches

    fc, total = loop["ft"], loop["total_epochs"]
    if loop["supervised"] and fc["loop"] == "official":
        ratio = official_ratio(epoch, fc["warmup_epochs"], total, loop["ro"], loop["rT"])
        sizes = step_sizes(fc["batch_size"], fc["step_a_positive_fraction"], fc["step_b_positive_fraction"])
        steps = epoch_steps(rows["kind"], rows["score"], sizes, epoch, fc["warmup_epochs"], ratio, loop["seed"])
        return [step.rows(rank, world) for step in steps], [step.b for step in steps], ratio
    ratio = max(positive_ratio(epoch, fc["warmup_epochs"], total, loop["ro"], loop["rT"]),
                loop["positive_floor"]) if loop["supervised"] else 1.0
    batches = fixed_batches(epoch_order(len(rows["tile_id"]), loop["seed"], epoch), fc["batch_size"])
    return batches, [None] * len(batches), ratio


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Ray Train body: stream decoded tiles, two views each, SupCon step; checkpoint every epoch."""
    import torch

    from hnm_ray.models.encoders import input_space_of
    from hnm_ray.training.checkpointing import latest_checkpoint, load_state, report
    from hnm_ray.training.runner import loop_device, place_and_restore, rank_and_world
    from hnm_ray.training.schedules import scheduler as lr_scheduler
    from hnm_ray.training.tile_batches import decoded_batches, share_readers, worker_share

    fc = loop["ft"]
    rank, world = rank_and_world(loop)
    device = loop_device(loop, fc["use_gpu"], "finetune.use_gpu")
    torch.set_num_threads(max(1, int(fc["cpus_per_worker"])))
    torch.manual_seed(loop["seed"])
    input_space = input_space_of(EncoderConfig(**loop["encoder"]))
    model = build_contrastive(EncoderConfig(**loop["encoder"]), loop["weights"], loop.get("head_weights"),
                              fc["proj_dim"])
    total, start = loop["total_epochs"], loop["first_epoch"]
    checkpoint = latest_checkpoint(loop["driver_checkpoints"], CHECKPOINT_FILE)
    state = load_state(checkpoint, CHECKPOINT_FILE) if checkpoint else None
    ddp, optimizer, scheduler = place_and_restore(
        model, world, device,
        lambda params: optimizer_for(params, fc),
        # One schedule over all rounds' epochs; this fit starts at `first_epoch` of it.
        lambda optimizer: lr_scheduler(optimizer, fc["schedule"], total, loop["first_epoch"]), state)
    if state is not None:
        start = state["epoch"] + 1
    plain = getattr(ddp, "module", ddp)
    official = loop["supervised"] and fc["loop"] == "official"
    # The official loop: every rank holds every row and trains on its part of each step; ours: a share of the rows.
    share = worker_share(loop["rows"], 0, 1) if official else worker_share(loop["rows"], rank, world)
    supervised = loop["supervised"]
    if rank == 0:
        setup_logging()  # a Ray Train worker's lines reach the driver's console through Ray's log forwarding
    progress = Progress(f"{loop['name']} (tiles, epochs {start}-{loop['last_epoch'] - 1})",
                        len(share["tile_id"]) * max(0, loop["last_epoch"] - start), every_s=10.0)
    # Up to finetune.open_slides readers stay open through the epochs, closed (their files too) when the loop ends.
    with share_readers(share, fc["open_slides"]) as readers:
        for epoch in range(start, loop["last_epoch"]):
            ddp.train()
            epoch_started = time.perf_counter()
            gen = torch.Generator().manual_seed(loop["seed"] * 100003 + epoch * 101 + rank)
            losses, tiles_seen = [], 0
            # The batches and the augmentations depend only on (seed, epoch, rank): the same on a rerun or a resume.
            batches, step_b, ratio = epoch_batches(loop, share, epoch, rank, world)
            decoded = decoded_batches(share, batches, loop["tile_size"], readers, fc["decode_threads"])
            for batch, is_b in zip(decoded, step_b):  # the official loop: step A, then (after warm-up) step B
                if is_b is None:
                    loss = our_loss(batch, ddp, fc, epoch, ratio, gen, device, supervised, input_space)
                else:
                    loss = official_step_loss(batch, is_b, ddp, fc, gen, device, input_space, world)
                tiles_seen += len(batch["tile_id"])
                if rank == 0:
                    progress.update(len(batch["tile_id"]))
                if loss is None:
                    continue
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            scheduler.step()
            metrics = {"epoch": epoch, "ft_loss": float(np.mean(losses)) if losses else float("nan"),
                       "tiles": tiles_seen, "positive_ratio": ratio, "lr": scheduler.get_last_lr()[0],
                       "epoch_seconds": time.perf_counter() - epoch_started}
            state = {"model": plain.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "metrics": metrics} if rank == 0 else None
            report(metrics, state, CHECKPOINT_FILE, loop["driver_checkpoints"])


def finetune_workers(asked: int | None, use_gpu: bool, concurrent: int = 1) -> int:
    """Fine-tuning workers: `asked`; else on GPUs one per GPU of the cluster (shared by `concurrent` sweep trials;
    at least 1, for GPU nodes an autoscaler has yet to start); else 0 (this process) on a one-node cluster, where a
    worker group adds only its start-up (~10 s a stage on 2 CPUs, benchmarks/results/job.json), else 1."""
    from hnm_ray.run.cluster import cluster_gpus, single_node

    if asked is not None:
        return asked
    if use_gpu:
        return max(1, int(cluster_gpus() + 1e-9) // max(1, concurrent))
    return 0 if single_node() else 1


def worker_cpus(asked: float | None, workers: int, reserved: float = 0.0, use_gpu: bool = False) -> float:
    """CPUs (and torch threads) per fine-tuning worker: `asked`; else for GPU workers the CPUs per GPU of the
    smallest node that holds GPUs (a worker asking for more than a GPU node has never schedules; 1 while no GPU
    node is up yet); else the cluster's CPUs (less `reserved`) split over the workers, at most one node's and at
    least 1. Fixed by the cluster's size (not by what is free now), so a rerun or a resume on the same cluster
    computes with the same number of threads."""
    from hnm_ray.run.cluster import live_nodes

    if asked is not None:
        return asked
    nodes = live_nodes()
    if use_gpu:
        per_gpu = [n.get("CPU", 0.0) / n["GPU"] for n in nodes if n.get("GPU", 0.0) > 0]
        if not per_gpu:
            log.warning("fine-tuning on GPUs: no GPU node is up yet, so each worker asks for 1 CPU; set "
                        "finetune.cpus_per_worker to the CPUs per GPU of your GPU nodes")
        share = min(per_gpu, default=1.0)
    else:
        cpus = [n.get("CPU", 0.0) for n in nodes]
        share = min(max(cpus, default=1.0), (sum(cpus) - reserved) / max(1, workers))
    return float(max(1, math.floor(share + 1e-9)))


def check_official_rows(rows: pa.Table, ft, world: int, name: str) -> None:
    """The official loop's per-step batch splits into parts of >= 2 tiles on every worker, and every worker gets
    hard negatives: ConfigError / HnmError naming the knobs otherwise (before any worker starts)."""
    from hnm_ray.training.official_steps import check_split, step_sizes

    check_split(step_sizes(ft.batch_size, ft.step_a_positive_fraction, ft.step_b_positive_fraction), world)
    n_hard = int(np.sum(rows["kind"].to_numpy() == HARD_NEGATIVE))
    if n_hard < 2 * world:
        raise HnmError(f"fine-tuning {name!r} (official loop) has {n_hard} hard negatives for {world} worker(s); it "
                       "needs 2 a worker. Raise --mining.neg_ratio or lower --finetune.workers.")


@dataclass
class FinetuneResult:
    """Where the fine-tuned encoder (or the frozen one's and the adapter's) and head weights were written, and the
    per-epoch metrics."""

    encoder_weights: str | None
    head_weights: str
    history: list[dict[str, Any]]
    adapter_weights: str | None = None  # adapter scope: the adapter trained on the frozen encoder's features


def schedule(config: TrainConfig, ft, total_epochs: int, supervised: bool,
             positive_floor: float = 0.0) -> dict[str, Any]:
    """The loop-config keys `epoch_batches` reads: the finetune section, r_t's ro/rT and its floor (our loop: the
    round's `positive_rank_floor`), seed, schedule length."""
    return {"ft": asdict(ft), "ro": config.mining.ro, "rT": config.mining.rT, "positive_floor": positive_floor,
            "seed": config.run.seed, "total_epochs": total_epochs, "supervised": supervised}


def fit_finetune(config: TrainConfig, rows: pa.Table, weights: str | None, run_dir: str | Path, name: str,
                 first_epoch: int, last_epoch: int, total_epochs: int, head_weights: str | None = None,
                 supervised: bool = True, positive_floor: float = 0.0) -> FinetuneResult:
    """Fine-tune the encoder on `rows` (see `tile_rows`) for epochs [first_epoch, last_epoch) of a `total_epochs`
    schedule (SupCon; SimCLR when not `supervised`), starting from `weights`: in this process, or with
    `finetune.workers` Ray Train workers."""
    import torch

    from hnm_ray.models.weights import save_weights
    from hnm_ray.training.checkpointing import driver_checkpoint_dir, load_state
    from hnm_ray.training.runner import run_loop

    ft = config.finetune
    if rows.num_rows < 2:
        raise HnmError(f"fine-tuning {name!r} needs at least 2 tiles; the selection has {rows.num_rows}. "
                       "Raise --mining.neg_ratio or lower --mining.threshold.")
    workers = finetune_workers(ft.workers, ft.use_gpu)
    if supervised and ft.loop == "official":
        check_official_rows(rows, ft, max(1, workers), name)
    ft = dataclasses.replace(ft, workers=workers, lr=ft.step_lr(),
                             cpus_per_worker=worker_cpus(ft.cpus_per_worker, workers, use_gpu=ft.use_gpu))
    run_dir = Path(run_dir).resolve()
    # The coordinates travel with the loop config (a few MB for 10^5 tiles); each worker decodes its own share.
    loop = {**schedule(config, ft, total_epochs, supervised, positive_floor), "encoder": asdict(config.encoder),
            "weights": weights, "head_weights": head_weights, "first_epoch": first_epoch, "last_epoch": last_epoch,
            "rows": rows, "tile_size": config.tiling.tile_size, "name": name,
            "driver_checkpoints": driver_checkpoint_dir(ft.workers, run_dir / "ray_train", name)}
    done = run_loop(train_loop_per_worker, loop, workers=ft.workers, use_gpu=ft.use_gpu,
                    cpus_per_worker=ft.cpus_per_worker, max_failures=ft.max_failures, run_dir=run_dir, name=name,
                    checkpoint_file=CHECKPOINT_FILE, what=f"fine-tuning {name!r}")
    if done.checkpoint is None:
        raise HnmError(f"fine-tuning {name!r} in {run_dir / 'ray_train'} saved no checkpoint (no epoch to train: "
                       f"epochs {first_epoch}..{last_epoch})")
    saved = load_state(done.checkpoint, CHECKPOINT_FILE)
    state = saved["model"]
    encoder_path, head_path = run_dir / f"{name}_encoder.safetensors", run_dir / f"{name}_head.pt"
    save_weights({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}, encoder_path)
    torch.save({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}, head_path)
    return FinetuneResult(str(encoder_path), str(head_path), [saved.get("metrics") or done.metrics])
