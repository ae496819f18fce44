"""The official fine-tuning loop's steps: which tiles each SGD step of step A and step B sees.

As the official code composes them (winston52/HNM-WSI, train/run.py 177-198, train/trainer.py 586-686): the epoch
iterates over the hard negatives in batches of int(B * (1 - a)) (drop_last; B = finetune.batch_size, a =
step_a_positive_fraction); each step A adds the next int(B * a) positives from a stream of every positive above
the threshold, and after the warm-up each step B takes the next int(B * (1 - b)) negatives (hard negatives, plus the
uncertain negatives once a pseudo-label update was adopted) and the next int(B * b) top-r_t positives. The
positives and step B's negatives are cycling streams (a DataLoader re-iterated when exhausted: reshuffled, drop_last),
restarted every epoch. With B = 512: step A 409 + 102, step B 486 + 25, n_hard // 409 steps an epoch.

Every rank computes the same global plan from (seed, epoch) and takes its part of each step (`rank_part`), so N
workers together see the official per-step batch and the official number of SGD steps.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hnm_ray.core.errors import ConfigError

HARD_NEGATIVE, POSITIVE, UNCERTAIN_NEGATIVE = 0, 1, 2  # row kinds; label = 1 for positives only


@dataclass(frozen=True)
class StepSizes:
    """Tiles per official step: step A's hard negatives and positives, step B's negatives and positives."""

    a_neg: int
    a_pos: int
    b_neg: int
    b_pos: int


def step_sizes(batch_size: int, a_fraction: float, b_fraction: float) -> StepSizes:
    """The official loaders' batch sizes, int() as run.py computes them (512, 0.2, 0.05 -> 409 + 102, 486 + 25)."""
    return StepSizes(int(batch_size * (1 - a_fraction)), int(batch_size * a_fraction),
                     int(batch_size * (1 - b_fraction)), int(batch_size * b_fraction))


def check_split(sizes: StepSizes, world: int) -> None:
    """Every rank needs at least 2 tiles of each step: ConfigError naming the knobs when the batch is too small."""
    for step, parts in (("A", (sizes.a_neg, sizes.a_pos)), ("B", (sizes.b_neg, sizes.b_pos))):
        if sum(n // world for n in parts) < 2:
            raise ConfigError("finetune.batch_size", f"the official step {step} of {sum(parts)} tiles split over "
                              f"{world} workers leaves a worker fewer than 2 tiles; raise finetune.batch_size or "
                              "lower finetune.workers")


def official_ratio(epoch: int, warmup: int, total_epochs: int, ro: float, rT: float) -> float:
    """r_t of fine-tuning epoch `epoch` as the official loop uses it: the ratio set at the end of the previous epoch,
    spl(t - 1) = ro + (t - 1 - warmup) (rT - ro) / (total - warmup), ro up to epoch warmup + 1 (0.787 at epoch 99)."""
    return float(ro + (max(epoch - 1, warmup) - warmup) * (rT - ro) / max(1, total_epochs - warmup))


def top_fraction(scores: np.ndarray, ratio: float) -> np.ndarray:
    """Mask of the top `ratio` by score, as the official positive loader keeps them: p >= quantile(p, 1 - ratio)."""
    if scores.size == 0:
        return np.zeros(0, bool)
    values = scores.astype(np.float64)
    return values >= np.quantile(values, 1 - ratio)


def bottom_fraction(scores: np.ndarray, ratio: float) -> np.ndarray:
    """Mask of the lowest `ratio` by score, as the official uncertain negatives: p <= quantile(p, ratio)."""
    if scores.size == 0:
        return np.zeros(0, bool)
    values = scores.astype(np.float64)
    return values <= np.quantile(values, ratio)


def cycling(items: np.ndarray, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Batches of `size` items of a shuffled pass, drop_last, reshuffled when exhausted (an official DataLoader
    re-iterated on StopIteration); every item each batch when fewer than `size` exist (officially a crash)."""
    if items.size == 0:
        return
    size = min(size, items.size)
    while True:
        order = items[rng.permutation(items.size)]
        for start in range(0, items.size - size + 1, size):
            yield order[start: start + size]


@dataclass(frozen=True)
class Step:
    """One official step: global row indices of its negatives and positives; `b` tells step B from step A."""

    negatives: np.ndarray
    positives: np.ndarray
    b: bool

    def rows(self, rank: int = 0, world: int = 1) -> np.ndarray:
        """This rank's rows of the step: its part of the negatives, then of the positives."""
        return np.concatenate([rank_part(self.negatives, rank, world), rank_part(self.positives, rank, world)])


def rank_part(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s contiguous part of `indices`, sizes differing by at most one (the parts cover every index)."""
    return np.array_split(indices, world)[rank]


def epoch_steps(kind: np.ndarray, score: np.ndarray, sizes: StepSizes, epoch: int, warmup: int, ratio: float,
                seed: int) -> list[Step]:
    """The official epoch's steps over rows of `kind` (HARD_NEGATIVE, POSITIVE, UNCERTAIN_NEGATIVE) and pseudo-label
    `score`: A, then B after the warm-up, per step. `ratio` is this epoch's r_t; it selects the top-r_t positives of
    step B and the lowest r_t of the uncertain negatives that join step B's negatives (the driver includes those rows
    only after the first adopted pseudo-label update). The same on every rank: a function of (seed, epoch) only."""
    rng = np.random.default_rng([seed, epoch])
    hard = np.flatnonzero(kind == HARD_NEGATIVE)
    positives = np.flatnonzero(kind == POSITIVE)
    uncertain = np.flatnonzero(kind == UNCERTAIN_NEGATIVE)
    top = positives[top_fraction(score[positives], ratio)]
    b_negatives = np.concatenate([hard, uncertain[bottom_fraction(score[uncertain], ratio)]])
    hard_order = hard[rng.permutation(hard.size)]
    n_steps = max(1, hard.size // sizes.a_neg) if hard.size else 0
    a_size = min(sizes.a_neg, hard.size)
    a_pos, b_neg, b_pos = (cycling(items, size, rng) for items, size in
                           ((positives, sizes.a_pos), (b_negatives, sizes.b_neg), (top, sizes.b_pos)))
    empty = np.zeros(0, np.int64)
    steps = []
    for s in range(n_steps):
        steps.append(Step(hard_order[s * a_size: (s + 1) * a_size], next(a_pos, empty), b=False))
        if epoch >= warmup and top.size:
            steps.append(Step(next(b_neg, empty), next(b_pos, empty), b=True))
    return steps
