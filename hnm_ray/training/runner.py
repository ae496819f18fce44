"""Run a train loop: in this process (0 workers) or as a Ray Train worker group (N workers).

With 0 workers the loop is a plain function call: no controller, worker or placement group to start (15-25 s a
stage on 2 CPUs), no per-report round trip, and it works inside a Ray Tune trial, where Ray Train's own local mode
refuses to run (its `report` sees Tune's session). The loop keeps its own checkpoints then (`checkpointing`), so
`--resume` continues from the newest one exactly as with workers. With N workers `TorchTrainer` runs it, and
`FailureConfig` restarts the group after a lost worker or node.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hnm_ray.run.cluster import torch_device
from hnm_ray.core.errors import HnmError
from hnm_ray.run.run_folder import ray_train_storage
from hnm_ray.training.checkpointing import newest_driver_checkpoint


@dataclass
class LoopRun:
    """What a finished loop left: its newest checkpoint (None when it reported none) and its last metrics."""

    checkpoint: Any
    metrics: dict[str, Any]


def in_process(loop: dict[str, Any]) -> bool:
    """Whether this loop runs in the calling process (it keeps its own checkpoints) rather than in a worker group."""
    return bool(loop.get("driver_checkpoints"))


def rank_and_world(loop: dict[str, Any]) -> tuple[int, int]:
    """(this worker's rank, number of workers): (0, 1) in process."""
    if in_process(loop):
        return 0, 1
    import ray.train

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def loop_device(loop: dict[str, Any], use_gpu: bool, key: str) -> str:
    """The torch device of this worker: Ray Train's GPU for a GPU worker, the first GPU in process (refused where
    torch sees none: config key `key`), else the CPU."""
    if not use_gpu or in_process(loop):
        return torch_device(use_gpu, key)
    import ray.train.torch

    return str(ray.train.torch.get_device())


def wrap_model(model, world: int, device: str):
    """The model a loop trains: DDP-wrapped by Ray Train across several workers, else moved to `device`."""
    if world > 1:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)
    return model.to(device)


def place_and_restore(model, world: int, device: str, make_optimizer: Callable, make_scheduler: Callable,
                      state: dict[str, Any] | None) -> tuple[Any, Any, Any]:
    """(the model as trained, optimizer, scheduler) of a loop, restored from a checkpoint's `state` when given.

    The model goes to its device (and into DDP) BEFORE the optimizer is built and its state loaded: torch casts
    optimizer state to its parameters' device and dtype when the state is loaded, so state loaded before the move
    stays on the CPU and the first step after a restart or `--resume` on a GPU fails with a device mismatch.
    `make_optimizer(parameters)` and `make_scheduler(optimizer)` build them fresh."""
    if state is not None:
        model.load_state_dict(state["model"])
    wrapped = wrap_model(model, world, device)
    optimizer = make_optimizer(model.parameters())
    scheduler = make_scheduler(optimizer)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return wrapped, optimizer, scheduler


def run_loop(train_loop: Callable[[dict[str, Any]], None], loop: dict[str, Any], *, workers: int, use_gpu: bool,
             cpus_per_worker: float, max_failures: int, run_dir: Path, name: str, checkpoint_file: str,
             what: str) -> LoopRun:
    """Run `train_loop(loop)` in this process (`loop["driver_checkpoints"]` set: see `driver_checkpoint_dir`) or
    with `workers` Ray Train workers; `checkpoint_file` is the loop's state file, `what` names the stage in errors."""
    if in_process(loop):
        train_loop(loop)
        return LoopRun(newest_driver_checkpoint(loop["driver_checkpoints"], checkpoint_file), {})
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop, train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, **ray_train_storage(Path(run_dir)), checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise HnmError(f"{what} failed: {result.error}")
    return LoopRun(result.checkpoint, dict(result.metrics or {}))
