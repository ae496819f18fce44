"""Reporting metrics with a checkpoint from a Ray Train loop, in distributed and in local mode."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any


def report(metrics: dict[str, Any], state: dict[str, Any] | None, file_name: str, local_dir: str | None) -> None:
    """`ray.train.report` with `state` saved as `file_name` in a checkpoint (None: metrics only).

    Distributed workers save into a temporary folder that Ray Train copies to storage. In local mode
    (num_workers=0) Ray Train keeps the folder itself as the checkpoint, so it is written under
    `local_dir` and only the newest one is kept.
    """
    import ray.train
    import torch

    if state is None:
        ray.train.report(metrics)
        return
    if local_dir is None:
        with tempfile.TemporaryDirectory(prefix="hnm_ckpt_") as directory:
            torch.save(state, Path(directory) / file_name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        return
    root = Path(local_dir)
    directory = root / f"epoch_{int(metrics['epoch']):05d}"
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / file_name)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
    for older in root.glob("epoch_*"):
        if older != directory:
            shutil.rmtree(older, ignore_errors=True)


def local_checkpoint_dir(num_workers: int, run_dir: Path, name: str) -> str | None:
    """Where a local-mode (num_workers=0) run keeps its checkpoint; None for distributed runs."""
    return str(run_dir / "ray_train" / name / "local_checkpoints") if num_workers == 0 else None
