"""Hard negative mining on frozen features (`finetune.scope adapter`): a small adapter instead of the encoder.

The encoder stays frozen; round 0's features are extracted once. Each round trains a residual MLP adapter
`a(x) = x + W2 relu(W1 x)` (D -> h -> D, W2 zero at the start: the identity) and the projection head with the SAME
SupCon loss on the SAME rows as full fine-tuning (`round_rows`: the mined hard negatives, the self-paced positives,
the uncertain negatives once joined; `epoch_batches`: our loop or the official steps), reading each row's features
from round 0's store instead of decoding its tile. The two views of a tile are feature-space augmentations of its
stored features (dropout + Gaussian noise scaled to each feature's std). Round r + 1's store is then a(round 0's
features), slide by slide, with the same tile ids and coordinates: no slide is read after round 0. The adapter
continues from the previous round's, as the encoder does. It trains in this process: a few thousand feature rows
through a two-layer MLP take a second or two, less than a Ray Train worker group takes to start.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn

from hnm_ray.config import TrainConfig
from hnm_ray.core.errors import HnmError, ModelFileError
from hnm_ray.store.features import GRID_TYPES, METADATA_KEY, FeatureStore, bag_from_table

log = logging.getLogger("hnm_ray")


class ResidualAdapter(nn.Module):
    """x + W2 relu(W1 x): D -> h -> D, the output the same size as the stored features (the aggregator, mining and
    the store keep their shapes). W2 starts at zero, so the first adapter is the identity: round 1 starts from round
    0's features, which the aggregator already separates, and learns a correction of rank <= h."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


def load_adapter(path: str | Path) -> ResidualAdapter:
    """The adapter saved at `path` (safetensors: no code runs), its sizes read from the weights' shapes; eval mode.
    ModelFileError naming the file when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
        hidden, dim = state["down.weight"].shape
        adapter = ResidualAdapter(int(dim), int(hidden))
        adapter.load_state_dict(state)
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelFileError(f"{path} is not an hnm-ray adapter (safetensors with down.* and up.* of a D -> h -> D "
                             f"residual MLP): {exc}; train it with --finetune.scope adapter") from exc
    return adapter.eval()


def feature_views(x: torch.Tensor, std: torch.Tensor, dropout: float, noise: float,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of features (B, D): each an independent feature dropout (kept features rescaled by 1 / (1 - p)) plus
    Gaussian noise of `noise` times each feature's `std`."""
    def view() -> torch.Tensor:
        keep = (torch.rand(x.shape, generator=gen) >= dropout).to(x.dtype) / (1.0 - dropout)
        return x * keep + noise * std * torch.randn(x.shape, generator=gen)

    return view(), view()


def fit_adapter(config: TrainConfig, rows: pa.Table, round0: FeatureStore, weights: str | None,
                adapter_weights: str | None, head_weights: str | None, run_dir: str | Path, name: str,
                first_epoch: int, last_epoch: int, total_epochs: int, positive_floor: float = 0.0):
    """Train adapter + projection head on `rows` (`round_rows`) for epochs [first_epoch, last_epoch) of a
    `total_epochs` schedule, features read from `round0`; from `adapter_weights` (None: the identity adapter) and
    `head_weights`. Returns a FinetuneResult: the frozen encoder's `weights`, the new adapter and head files, and the
    per-epoch metrics."""
    from hnm_ray.run.cluster import torch_device
    from hnm_ray.training.finetune import check_official_rows

    ft = config.finetune
    if rows.num_rows < 2:
        raise HnmError(f"adapter round {name!r} needs at least 2 tiles; the selection has {rows.num_rows}. "
                       "Raise --mining.neg_ratio or lower --mining.threshold.")
    if ft.loop == "official":
        check_official_rows(rows, ft, 1, name)
    device = torch_device(ft.use_gpu, "finetune.use_gpu")
    with one_thread():
        return _fit(config, rows, round0, weights, adapter_weights, head_weights, Path(run_dir), name, first_epoch,
                    last_epoch, total_epochs, device, positive_floor)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the block (then the caller's count again): the adapter's matrices are small, and on
    a busy 2-core machine a step took 0.36 s with 2 threads against 0.014 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(config: TrainConfig, rows: pa.Table, round0: FeatureStore, weights: str | None, adapter_weights: str | None,
         head_weights: str | None, run_dir: Path, name: str, first_epoch: int, last_epoch: int, total_epochs: int,
         device: str, positive_floor: float):
    """`fit_adapter`'s training, on `device`."""
    from hnm_ray.models.weights import save_weights
    from hnm_ray.training.contrastive import contrastive_model, load_head
    from hnm_ray.training.finetune import (FinetuneResult, _usable, epoch_batches, official_objective, optimizer_for,
                                           our_objective, schedule)
    from hnm_ray.training.schedules import scheduler as lr_scheduler
    from hnm_ray.training.tile_batches import worker_share

    ft = config.finetune
    torch.manual_seed(config.run.seed)
    features = torch.from_numpy(round0.select_tiles(rows.select(["slide_id", "tile_id"]), name).features)
    dim = int(features.shape[1])
    adapter = load_adapter(adapter_weights) if adapter_weights else ResidualAdapter(dim, ft.adapter_hidden)
    if adapter.out_dim != dim:
        raise ModelFileError(f"adapter {adapter_weights} maps {adapter.out_dim} features; round 0's store "
                             f"{round0.directory} holds {dim}")
    model = contrastive_model(adapter, load_head(dim, ft.proj_dim, head_weights)).to(device)
    ft = dataclasses.replace(ft, lr=ft.step_lr())
    optimizer = optimizer_for(model.parameters(), dataclasses.asdict(ft))
    lr = lr_scheduler(optimizer, ft.schedule, total_epochs, first_epoch)
    loop, share = schedule(config, ft, total_epochs, True, positive_floor), worker_share(rows, 0, 1)
    fc, std = loop["ft"], features.std(0)
    history = []
    for epoch in range(first_epoch, last_epoch):
        model.train()
        started, losses = time.perf_counter(), []
        gen = torch.Generator().manual_seed(config.run.seed * 100003 + epoch * 101)
        batches, step_b, ratio = epoch_batches(loop, share, epoch, 0, 1)
        for index, is_b in zip(batches, step_b):
            batch = {k: share[k][index] for k in ("label", "kind", "pos_rank", "supcon_class")}
            batch["error"] = np.zeros(len(index), bool)  # stored features: nothing to decode, nothing fails
            keep = _usable(batch, ratio, True) if is_b is None else np.ones(len(index), bool)
            if keep.sum() < 2:
                continue
            v1, v2 = feature_views(features[index[keep]], std, ft.adapter_dropout, ft.adapter_noise, gen)
            z1, z2 = model(v1.to(device)), model(v2.to(device))
            labels = batch["label"][keep]
            loss = (our_objective(z1, z2, labels, fc, epoch, batch["supcon_class"][keep]) if is_b is None
                    else official_objective(z1, z2, labels, batch["kind"][keep], is_b, fc))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        lr.step()
        history.append({"epoch": epoch, "ft_loss": float(np.mean(losses)) if losses else float("nan"),
                        "tiles": int(sum(len(b) for b in batches)), "positive_ratio": ratio,
                        "lr": lr.get_last_lr()[0], "epoch_seconds": time.perf_counter() - started})
    adapter_path, head_path = run_dir / f"{name}_adapter.safetensors", run_dir / f"{name}_head.pt"
    save_weights(adapter.state_dict(), adapter_path)
    torch.save(model.head.state_dict(), head_path)
    return FinetuneResult(weights, str(head_path), history, adapter_weights=str(adapter_path))


def adapt_store(source: FeatureStore, target: FeatureStore, adapter_path: str | Path,
                threads: int = 4) -> dict[str, Any]:
    """Write adapter(`source` features) into `target` for every slide of `source` not yet there (resumable), with
    the same tile ids, coordinates, levels, sizes and truth, in the source's dtype. Reads no slide. `threads` slides
    at a time: a slide's cost is its file read and atomic write (fsync), which release the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    adapter = load_adapter(adapter_path)
    started = time.perf_counter()
    todo = sorted(source.completed() - target.completed())
    if not todo:
        return {"slides_written": 0, "tiles_written": 0, "seconds": 0.0}
    target.ensure_writable()
    added = {"adapter": str(adapter_path), "adapted_from": str(source.directory)}

    def adapt(slide_id: str) -> int:
        table = source.read_table(slide_id)
        bag = bag_from_table(table, slide_id)
        with torch.no_grad():
            adapted = adapter(torch.from_numpy(bag.features)).numpy()
        metadata = {**json.loads(table.schema.metadata[METADATA_KEY]), **added}  # this slide's own (its source file)
        target.write_slide(slide_id, table.select(list(GRID_TYPES)), adapted.astype(metadata.get("dtype", "float32")),
                           bag.truth, metadata)
        return len(bag)

    with one_thread(), ThreadPoolExecutor(max_workers=threads, thread_name_prefix="adapt") as pool:
        tiles = sum(pool.map(adapt, todo))
    seconds = time.perf_counter() - started
    log.info("adapter: wrote %d slides (%d tiles) of %s in %.1f s", len(todo), tiles, target.directory, seconds)
    return {"slides_written": len(todo), "tiles_written": tiles, "seconds": seconds}
