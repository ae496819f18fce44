"""Learning-rate schedules by name, per epoch: ours and the official ItS2CLR/HNM-WSI ones (train/trainer.py there).

Every schedule is `lr(epoch, base_lr, total_epochs) -> float`, epoch counting from 0 = the learning rate
used during that epoch. `scheduler` turns one into a torch LambdaLR stepped once per epoch.

- "constant": base_lr (our MIL schedule).
- "mil_step_official": StepLR(step_size=75, gamma=0.5) stepped TWICE per MIL epoch, so the rate halves
  every 37.5 epochs: base_lr * 0.5 ** floor(2 * epoch / 75).
- "cosine": base_lr * (1 + cos(pi * epoch / total_epochs)) / 2 from epoch 0 (our fine-tuning schedule).
- "cosine_official": CosineAnnealingLR(T_max=total_epochs, eta_min=0) stepped at the end of each
  fine-tuning epoch >= 10 only: base_lr for epochs 0-10, then the cosine of (epoch - 10) / total_epochs.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

Schedule = Callable[[int, float, int], float]

OFFICIAL_MIL_STEP_SIZE = 75
OFFICIAL_MIL_GAMMA = 0.5
OFFICIAL_MIL_STEPS_PER_EPOCH = 2
OFFICIAL_COSINE_HOLD_EPOCHS = 10


def constant_lr(epoch: int, base_lr: float, total_epochs: int) -> float:
    """The same rate every epoch."""
    return base_lr


def step_lr(epoch: int, base_lr: float, total_epochs: int, step_size: int = OFFICIAL_MIL_STEP_SIZE,
            gamma: float = OFFICIAL_MIL_GAMMA, steps_per_epoch: int = OFFICIAL_MIL_STEPS_PER_EPOCH) -> float:
    """StepLR(step_size, gamma) stepped `steps_per_epoch` times per epoch: base_lr * gamma ** (steps // step_size)."""
    return base_lr * gamma ** ((steps_per_epoch * epoch) // step_size)


def cosine_lr(epoch: int, base_lr: float, total_epochs: int, hold_epochs: int = 0) -> float:
    """Cosine from base_lr to 0 over total_epochs scheduler steps, the first step taken after epoch `hold_epochs`."""
    steps = min(max(epoch - hold_epochs, 0), total_epochs)
    return base_lr * 0.5 * (1 + math.cos(math.pi * steps / total_epochs))


def cosine_lr_official(epoch: int, base_lr: float, total_epochs: int) -> float:
    """The official fine-tuning cosine: held at base_lr through epoch 10, T_max = total_epochs."""
    return cosine_lr(epoch, base_lr, total_epochs, hold_epochs=OFFICIAL_COSINE_HOLD_EPOCHS)


SCHEDULES: dict[str, Schedule] = {
    "constant": constant_lr,
    "mil_step_official": step_lr,
    "cosine": cosine_lr,
    "cosine_official": cosine_lr_official,
}


def lr_at(name: str, epoch: int, base_lr: float, total_epochs: int) -> float:
    """Learning rate of schedule `name` during `epoch` (from 0)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if total_epochs < 1 or epoch < 0:
        raise ValueError(f"need total_epochs >= 1 and epoch >= 0, got {total_epochs} and {epoch}")
    return SCHEDULES[name](epoch, base_lr, total_epochs)


def scheduler(optimizer: torch.optim.Optimizer, name: str, total_epochs: int,
              first_epoch: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following schedule `name`, stepped once per epoch, starting at `first_epoch` of the schedule."""
    lr_at(name, first_epoch, 1.0, total_epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_at(name, e + first_epoch, 1.0, total_epochs))
