"""The global hard-negative queue of one round as a named Ray actor (paper step 6): `HardNegativeMiner` wraps
`TopKQueue` in namespace "hnm_ray"; every scoring worker pushes to it (`push_scores`, patient while Ray restarts it),
and it survives restarts through atomic .npz snapshots."""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hnm_ray.config import check_range
from hnm_ray.core.errors import ConfigError, HnmError, StoreError
from hnm_ray.mining.queue import TopKQueue, n_hard_negatives

log = logging.getLogger(__name__)

NAMESPACE = "hnm_ray"
DEFAULT_NAME = "hnm_miner"
_SNAPSHOT_VERSION = 1


def save_snapshot(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write arrays to `path` (.npz) atomically: temp file in the same folder, fsync, rename (`storage.write_bytes`)."""
    from hnm_ray.core.storage import write_bytes

    path = Path(path)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        write_bytes(buffer.getvalue(), path)
    except OSError as exc:
        raise StoreError(f"cannot write miner snapshot {str(path)!r}: {exc}; pick a writable snapshot_path") from exc
    return path


def load_snapshot(path: str | Path) -> dict[str, np.ndarray]:
    """Read a snapshot written by `save_snapshot`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(f"cannot read miner snapshot {str(path)!r}: {exc}; delete it to start the round afresh") from exc


class HardNegativeMiner:
    """Global hard-negative queue of one round (paper step 6); run it as a named Ray actor via `get_miner`.

    State is numpy arrays only. With `snapshot_path`, `__init__` restores the last snapshot (a
    restarted actor re-runs `__init__` with no state), `begin_round` writes one, and so does every
    `autosave_every_n_pushes`-th push (0 = only on `save()`). Pushes after the last snapshot are
    lost on a crash: re-push them (pushes are idempotent) or watch `stats()["restored_from"]`.
    """

    def __init__(self, snapshot_path: str | None = None, autosave_every_n_pushes: int = 0) -> None:
        self.snapshot_path = Path(snapshot_path) if snapshot_path else None
        self.autosave_every_n_pushes = int(autosave_every_n_pushes)
        self.round: int | None = None
        self.n_neg_total = 0
        self.neg_ratio = 0.0
        self.push_calls = 0
        self.restored_from: str | None = None
        self._queue: TopKQueue | None = None
        if self.snapshot_path is not None and self.snapshot_path.is_file():
            self.restore(self.snapshot_path)

    def begin_round(self, n_neg_total: int, neg_ratio: float, round: int = 0) -> int:
        """Start a round over `n_neg_total` negative tiles; returns k = ceil(neg_ratio * n_neg_total)."""
        check_range("neg_ratio", neg_ratio, 0.0, 1.0, low_open=True)
        if int(n_neg_total) < 1:
            raise ConfigError("n_neg_total", f"{n_neg_total!r}: a round needs at least one negative tile; "
                              "check that the training split holds negative slides with tissue")
        self.round, self.n_neg_total, self.neg_ratio = int(round), int(n_neg_total), float(neg_ratio)
        self.push_calls = 0
        self._queue = TopKQueue(n_hard_negatives(self.n_neg_total, self.neg_ratio))
        if self.snapshot_path is not None:
            self.save()
        return self._queue.k

    def _require_round(self) -> TopKQueue:
        if self._queue is None:
            raise HnmError("the miner has no round: call begin_round(n_neg_total, neg_ratio, round) first")
        return self._queue

    def push(self, slide_ids: Any, tile_ids: Any, scores: Any, round: int | None = None) -> int:
        """Offer scores of negative tiles; returns the rows that passed the k-th score (0 for a stale round)."""
        queue = self._require_round()
        if round is not None and int(round) != self.round:
            log.warning("ignored a push for round %s during round %s", round, self.round)
            return 0
        accepted = queue.push(slide_ids, tile_ids, scores)
        self.push_calls += 1
        if self.snapshot_path is not None and self.autosave_every_n_pushes > 0 \
                and self.push_calls % self.autosave_every_n_pushes == 0:
            self.save()
        return accepted

    def hard_negatives(self) -> pa.Table:
        """The exact global top-k (slide_id, tile_id, score), by score desc then slide_id, tile_id."""
        return self._require_round().table()

    def threshold(self) -> float | None:
        """The k-th score; None while fewer than k distinct tiles were pushed."""
        return self._require_round().threshold

    def sample(self, n: int, seed: int = 0, replace: bool | None = None) -> pa.Table:
        """A seeded sample of n hard negatives; replace=None samples with replacement only when n > size."""
        table = self.hard_negatives()
        size = table.num_rows
        replace = n > size if replace is None else replace
        if n < 0 or (size == 0 and n > 0) or (n > size and not replace):
            raise HnmError(f"cannot sample {n} rows {'with' if replace else 'without'} replacement from "
                           f"{size} hard negatives; push scores first or ask for at most {size}")
        rows = np.random.default_rng(seed).choice(size, size=n, replace=replace)
        return table.take(pa.array(rows))

    def save(self, path: str | None = None) -> str:
        """Write the miner state atomically to `path` (default: snapshot_path); returns the path."""
        target = Path(path) if path else self.snapshot_path
        if target is None:
            raise HnmError("save() needs a path: pass one or create the miner with snapshot_path")
        arrays = {"version": np.int64(_SNAPSHOT_VERSION), "has_round": np.bool_(self._queue is not None),
                  "round": np.int64(self.round or 0), "n_neg_total": np.int64(self.n_neg_total),
                  "neg_ratio": np.float64(self.neg_ratio), "push_calls": np.int64(self.push_calls)}
        if self._queue is not None:
            arrays.update({f"queue_{key}": value for key, value in self._queue.state().items()})
        return str(save_snapshot(target, arrays))

    def restore(self, path: str) -> dict[str, Any]:
        """Replace the state with the snapshot at `path`; returns `stats()`."""
        data = load_snapshot(path)
        if int(data.get("version", -1)) != _SNAPSHOT_VERSION:
            raise StoreError(f"miner snapshot {str(path)!r} has version {data.get('version')}, expected "
                             f"{_SNAPSHOT_VERSION}; delete it and re-mine the round")
        has_round = bool(data["has_round"])
        self.round = int(data["round"]) if has_round else None
        self.n_neg_total, self.neg_ratio = int(data["n_neg_total"]), float(data["neg_ratio"])
        self.push_calls = int(data["push_calls"])
        prefix = "queue_"
        self._queue = TopKQueue.from_state({k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}) \
            if has_round else None
        self.restored_from = str(path)
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """Round, k, rows pushed, distinct tiles seen, size, threshold, memory bytes and snapshot facts."""
        queue = self._queue
        return {
            "round": self.round, "k": queue.k if queue else 0, "n_neg_total": self.n_neg_total,
            "neg_ratio": self.neg_ratio, "push_calls": self.push_calls,
            "pushed": queue.pushed if queue else 0, "seen": queue.seen if queue else 0,
            "duplicates": queue.duplicates if queue else 0, "size": queue.size if queue else 0,
            "threshold": queue.threshold if queue else None, "memory_bytes": queue.nbytes if queue else 0,
            "snapshot_path": str(self.snapshot_path) if self.snapshot_path else None,
            "restored_from": self.restored_from,
        }


def get_miner(name: str = DEFAULT_NAME, snapshot_path: str | Path | None = None, create: bool = True, *,
              lifetime: str | None = None, max_restarts: int = 3, max_task_retries: int = 3,
              num_cpus: float = 0.0, autosave_every_n_pushes: int = 0, resources: dict[str, float] | None = None) -> Any:
    """The named miner actor in namespace "hnm_ray"; created (get_if_exists) when absent and `create`.

    The options apply only when this call creates the actor. num_cpus defaults to 0 so the miner
    never takes a CPU from Train workers or Data actors; lifetime="detached" outlives the driver;
    `resources` (Ray custom resources) places it on the nodes that have them.
    """
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        if not create:
            raise HnmError(f"no miner actor {name!r} in namespace {NAMESPACE!r}: the driver must create it "
                           "with get_miner(name, create=True) before workers push") from None
    return ray.remote(HardNegativeMiner).options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime=lifetime, max_restarts=max_restarts,
        max_task_retries=max_task_retries, num_cpus=num_cpus, resources=resources,
    ).remote(str(snapshot_path) if snapshot_path else None, autosave_every_n_pushes)


def push_scores(miner: Any, slide_ids: np.ndarray, tile_ids: np.ndarray, scores: np.ndarray,
                patience_s: float = 120.0, first_wait_s: float = 0.5) -> None:
    """`miner.push` of one batch, pushed again while the actor is temporarily unavailable (its node died and Ray is
    restarting it elsewhere) for up to `patience_s`. Pushes are idempotent (keyed by slide + tile, the greatest score
    kept), so a push that did reach the old actor does no harm; what the restart lost is pushed again at the end
    of scoring (`pseudo_labels.repush_lost_scores`)."""
    import time

    import ray

    deadline, wait = time.monotonic() + patience_s, first_wait_s
    while True:
        try:
            ray.get(miner.push.remote(slide_ids, tile_ids, scores))
            return
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() + wait > deadline:
                raise
            time.sleep(wait)
            wait = min(2 * wait, 5.0)
