"""One DDP rank of tests/test_official_pipeline.py's lockstep test, in its own small module so a spawned rank imports
little: three official steps over gloo, rank 1 unable to decode any tile of the second."""
from __future__ import annotations

import datetime

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hnm_ray.training.finetune import official_step_loss
from hnm_ray.training.official_steps import HARD_NEGATIVE, POSITIVE

TILE = 8


def run_rank(rank: int, world: int, init_file: str, outs: list[str]) -> None:
    """Train three steps on this rank and save its weights to outs[rank]."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Flatten(), nn.Linear(3 * TILE * TILE, 4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fc = {"augment": "ours", "orientations": "dihedral", "temperature": 0.07}
    gen, n = torch.Generator().manual_seed(rank), 6
    for step in range(3):
        batch = {"tiles": np.full((n, TILE, TILE, 3), 40 * step + 20 * rank, np.uint8), "label": np.arange(n) % 2,
                 "kind": np.where(np.arange(n) % 2, POSITIVE, HARD_NEGATIVE),
                 "error": np.full(n, "corrupt JPEG" if (rank, step) == (1, 1) else "", dtype=object)}
        loss = official_step_loss(batch, False, model, fc, gen, "cpu", "bgr01", world)
        if loss is None:  # as the fine-tuning loop does
            continue
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({k: v.detach() for k, v in model.module.state_dict().items()}, outs[rank])
    dist.barrier()  # neither rank tears gloo down while its peer still talks (a rank once aborted at exit, SIGABRT)
    dist.destroy_process_group()
