"""Checkpoints of the train loops, the same in a Ray Train worker group and in process (0 workers, `runner`).

Workers save into a temporary folder that `ray.train.report` copies to the run's storage, and
`ray.train.get_checkpoint()` hands the latest back on a restart. In process there is no Ray Train, so the
loop keeps its own folder: atomic epoch folders (temp + rename), the newest KEEP kept, and the newest one
restored when the same run is started again.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

DRIVER_CHECKPOINTS = "driver_checkpoints"
KEEP = 2


def driver_checkpoint_dir(num_workers: int, storage: Path, name: str) -> str | None:
    """Where an in-process run keeps its checkpoints; None for worker groups (Ray Train keeps them)."""
    return str(storage / name / DRIVER_CHECKPOINTS) if num_workers == 0 else None


def newest_driver_checkpoint(driver_dir: str | None, file_name: str):
    """The newest complete in-process checkpoint in `driver_dir`, or None."""
    import ray.train

    if not driver_dir or not Path(driver_dir).is_dir():
        return None
    done = sorted(p for p in Path(driver_dir).glob("epoch_*") if (p / file_name).is_file())
    return ray.train.Checkpoint.from_directory(str(done[-1])) if done else None


def latest_checkpoint(driver_dir: str | None, file_name: str):
    """Inside a train loop: the newest in-process checkpoint (`driver_dir` set), else Ray Train's, else None."""
    if driver_dir:
        return newest_driver_checkpoint(driver_dir, file_name)
    import ray.train

    return ray.train.get_checkpoint()


def load_state(checkpoint, file_name: str) -> dict[str, Any]:
    """The state saved in a checkpoint, read with weights_only=True: tensors and plain containers, never code."""
    import torch

    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / file_name, map_location="cpu", weights_only=True)


def plain(value: Any) -> Any:
    """`value` with numpy scalars and arrays turned into Python numbers and tensors (what weights_only loads)."""
    import numpy as np
    import torch

    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return value


def report(metrics: dict[str, Any], state: dict[str, Any] | None, file_name: str, driver_dir: str | None) -> None:
    """`ray.train.report` of `metrics`, with `state` saved as `file_name` in a checkpoint when given; in process
    (`driver_dir` set) the checkpoint goes to `driver_dir` and nothing else happens."""
    import ray.train
    import torch

    if driver_dir and state is None:
        return
    if state is None:
        ray.train.report(metrics)
    elif driver_dir:
        root = Path(driver_dir)
        root.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=".epoch_", dir=root))
        torch.save(plain(state), temp / file_name)
        final = root / f"epoch_{int(metrics['epoch']):06d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temp, final)
        for old in sorted(root.glob("epoch_*"))[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    else:
        with tempfile.TemporaryDirectory(prefix="hnm_ckpt_") as directory:  # report copies it to storage
            torch.save(plain(state), Path(directory) / file_name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
