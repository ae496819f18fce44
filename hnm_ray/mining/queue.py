"""Hard negative mining (paper step 6) and self-paced positive selection (paper step 5, ItS2CLR).

Step 6 keeps only the global top fraction `neg_ratio` of negative-slide tiles by score: an exact
top-k with k = ceil(neg_ratio * N_neg) over the whole training set. `TopKQueue` computes it with
O(k) memory from batches pushed in any order; `HardNegativeMiner` wraps it as a named Ray actor
that every scoring worker pushes to, and that survives restarts through snapshots.

Ranking is by score descending, then slide_id ascending, then tile_id ascending, so the result
is deterministic whatever the push order. A (slide_id, tile_id) pushed several times (task
retries, overlapping shards) counts once with its greatest score: max is order-independent, so
concurrent pushes give the same queue as any sequential order.

Scores: the miner ranks whatever it is given (the order of p = sigmoid(logit) and of the logit
is the same); `threshold()` is in the unit pushed. The project pushes instance logits: float32
p saturates at 1.0 above a logit of ~17 and would tie; sigmoid(threshold()) is the paper's
(1 - neg_ratio) quantile of p. `select_positives` needs p in [0, 1].
"""
from __future__ import annotations

import io
import logging
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hnm_ray.config import check_range
from hnm_ray.core.errors import ConfigError, HnmError, StoreError

log = logging.getLogger(__name__)

NAMESPACE = "hnm_ray"
DEFAULT_NAME = "hnm_miner"
HARD_NEGATIVE_SCHEMA = pa.schema([("slide_id", pa.string()), ("tile_id", pa.int32()), ("score", pa.float32())])
RANK_ORDER = [("score", "descending"), ("slide_id", "ascending"), ("tile_id", "ascending")]

_TILE_BITS = 32
_TILE_MASK = (1 << _TILE_BITS) - 1
_MIN_PENDING = 1 << 16  # candidates buffered before a merge, at least; bounds merge cost per row
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
_SNAPSHOT_VERSION = 1


def n_hard_negatives(n_neg_total: int, neg_ratio: float) -> int:
    """k = ceil(neg_ratio * n_neg_total), exact for decimal ratios (0.7 * 10 is 7, not 8)."""
    return math.ceil(Fraction(str(neg_ratio)) * int(n_neg_total))


def _keep_greatest_per_key(keys: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collapse runs of equal keys (keys sorted) to one row holding the greatest score."""
    if len(keys) < 2:
        return keys, scores
    first = np.empty(len(keys), dtype=bool)
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    if first.all():
        return keys, scores
    starts = np.flatnonzero(first)
    return keys[starts], np.maximum.reduceat(scores, starts)


def _merge_sorted(a_keys: np.ndarray, a_scores: np.ndarray, b_keys: np.ndarray, b_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge two key-sorted row sets in linear time (insertion positions from searchsorted)."""
    if len(a_keys) == 0:
        return b_keys, b_scores
    n = len(a_keys) + len(b_keys)
    at = np.searchsorted(a_keys, b_keys, side="right") + np.arange(len(b_keys))
    keys = np.empty(n, dtype=np.int64)
    scores = np.empty(n, dtype=np.float32)
    keys[at], scores[at] = b_keys, b_scores
    rest = np.ones(n, dtype=bool)
    rest[at] = False
    keys[rest], scores[rest] = a_keys, a_scores
    return keys, scores


class TopKQueue:
    """Exact global top-k of (slide_id, tile_id, score) rows in O(k) memory; idempotent pushes.

    Kept rows are distinct (slide_code << 32 | tile_id) int64 keys sorted by key, with float32
    scores. Pushed rows below the current k-th score are dropped at once; the rest wait in a
    buffer of at most max(k, 65536) rows plus one batch, then merge (dedupe by key keeping the
    greatest score, argpartition to k). Ties at the k-th score go to the smaller (slide_id,
    tile_id). `track_seen` keeps one bit per pushed tile id per slide (N/8 bytes) to count the
    distinct tiles seen, which tells whether every negative tile of the round was scored.
    """

    def __init__(self, k: int, track_seen: bool = True) -> None:
        if int(k) < 1:
            raise ConfigError("k", f"{k!r}: a top-k queue needs k >= 1")
        self.k = int(k)
        self.track_seen = track_seen
        self.pushed = 0
        self.duplicates = 0
        self._names: list[str] = []
        self._codes: dict[str, int] = {}
        self._lex_rank: np.ndarray | None = None
        self._seen: list[np.ndarray] = []
        self._keys = np.empty(0, dtype=np.int64)
        self._scores = np.empty(0, dtype=np.float32)
        self._pending_keys: list[np.ndarray] = []
        self._pending_scores: list[np.ndarray] = []
        self._n_pending = 0
        self._kth = -np.inf

    # -- pushing ---------------------------------------------------------------------------
    def push(self, slide_ids: Any, tile_ids: Any, scores: Any) -> int:
        """Offer a batch of rows; returns how many passed the current k-th score (candidates).

        slide_ids: one str for the whole batch, or a sequence / numpy / Arrow (dictionary)
        array of str; tile_ids: integers in [0, 2**31); scores: floats, stored as float32.
        """
        scores = np.asarray(scores, dtype=np.float32).ravel()
        tile_ids = np.asarray(tile_ids).ravel()
        n = len(scores)
        if len(tile_ids) != n:
            raise ValueError(f"push got {len(tile_ids)} tile_ids for {n} scores; pass one tile_id per score")
        if n == 0:
            return 0
        if not np.issubdtype(tile_ids.dtype, np.integer):
            raise ValueError(f"tile_ids must be integers, got dtype {tile_ids.dtype}")
        if tile_ids.min() < 0 or tile_ids.max() > np.iinfo(np.int32).max:
            raise ValueError(f"tile_ids must lie in [0, 2**31), got [{tile_ids.min()}, {tile_ids.max()}]")
        codes = self._encode(slide_ids, n)
        nan = np.isnan(scores)
        if nan.any():
            first = self._names[int(np.broadcast_to(codes, (n,))[nan.argmax()])]
            raise ValueError(f"{int(nan.sum())} NaN scores in a push (first from slide {first!r}); "
                             "fix the model output before mining")
        if self.track_seen:
            self._mark_seen(codes, tile_ids)
        self.pushed += n
        keep = scores >= self._kth
        n_kept = int(keep.sum())
        if n_kept:
            kept_codes = codes if np.ndim(codes) == 0 else codes[keep]
            keys = (np.asarray(kept_codes, dtype=np.int64) << _TILE_BITS) | tile_ids[keep].astype(np.int64)
            self._pending_keys.append(keys)
            self._pending_scores.append(scores[keep])
            self._n_pending += n_kept
            if self._n_pending >= max(self.k, _MIN_PENDING):
                self._merge()
        return n_kept

    def _code(self, slide_id: str) -> int:
        code = self._codes.get(slide_id)
        if code is None:
            code = self._codes[slide_id] = len(self._names)
            self._names.append(slide_id)
            self._seen.append(np.zeros(0, dtype=np.uint8))
            self._lex_rank = None
        return code

    def _encode(self, slide_ids: Any, n: int) -> np.int64 | np.ndarray:
        """Slide codes of a batch: a scalar when one slide, else an int64 array of length n."""
        if isinstance(slide_ids, str):
            return np.int64(self._code(slide_ids))
        array = slide_ids.combine_chunks() if isinstance(slide_ids, pa.ChunkedArray) else slide_ids
        array = array if isinstance(array, pa.Array) else pa.array(array, type=pa.string())  # list or numpy
        if len(array) != n:
            raise ValueError(f"push got {len(array)} slide_ids for {n} scores; pass one str or one per score")
        if array.null_count:
            raise ValueError(f"{array.null_count} null slide_ids in a push; every row needs its slide_id")
        array = array if pa.types.is_dictionary(array.type) else array.dictionary_encode()
        lut = np.array([self._code(str(name)) for name in array.dictionary.to_pylist()], dtype=np.int64)
        return lut[0] if len(lut) == 1 else lut[array.indices.to_numpy(zero_copy_only=False)]

    def _mark_seen(self, codes: np.int64 | np.ndarray, tile_ids: np.ndarray) -> None:
        """Set the seen-bit of every pushed tile in its slide's bitmap (grown geometrically)."""
        if np.ndim(codes) == 0:
            groups = [(int(codes), tile_ids)]
        else:
            order = np.argsort(codes, kind="stable")
            sorted_codes = codes[order]
            starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
            groups = zip(sorted_codes[starts].tolist(), np.split(tile_ids[order], starts[1:]))
        for code, tiles in groups:
            bitmap = self._seen[code]
            need = int(tiles.max() >> 3) + 1
            if len(bitmap) < need:
                grown = np.zeros(max(need, 2 * len(bitmap)), dtype=np.uint8)
                grown[: len(bitmap)] = bitmap
                bitmap = self._seen[code] = grown
            np.bitwise_or.at(bitmap, tiles >> 3, (1 << (tiles & 7)).astype(np.uint8))

    # -- merging ---------------------------------------------------------------------------
    def _merge(self) -> None:
        """Fold the buffered candidates into the kept rows: dedupe by key, keep the top k."""
        if not self._n_pending:
            return
        keys = np.concatenate(self._pending_keys)
        scores = np.concatenate(self._pending_scores)
        self._pending_keys, self._pending_scores, self._n_pending = [], [], 0
        order = np.argsort(keys)
        keys, scores = _merge_sorted(self._keys, self._scores, keys[order], scores[order])
        n_rows = len(keys)
        keys, scores = _keep_greatest_per_key(keys, scores)
        self.duplicates += n_rows - len(keys)
        self._keys, self._scores = self._top_k(keys, scores)
        if len(self._keys) == self.k:
            self._kth = float(self._scores.min())

    def _top_k(self, keys: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The k best distinct rows, still sorted by key (a mask keeps the order)."""
        n = len(keys)
        if n <= self.k:
            return keys, scores
        kth = np.partition(scores, n - self.k)[n - self.k]
        keep = scores > kth
        ties = np.flatnonzero(scores == kth)
        need = self.k - int(keep.sum())
        keep[ties[np.argsort(self._rank_keys(keys[ties]), kind="stable")[:need]]] = True
        return keys[keep], scores[keep]

    def _rank_keys(self, keys: np.ndarray) -> np.ndarray:
        """Keys re-coded so that their order is (slide_id, tile_id) order, whatever the push order."""
        if self._lex_rank is None:
            self._lex_rank = np.argsort(np.argsort(np.array(self._names, dtype=str), kind="stable")).astype(np.int64)
        return (self._lex_rank[keys >> _TILE_BITS] << _TILE_BITS) | (keys & _TILE_MASK)

    # -- reading ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of distinct rows kept (at most k)."""
        self._merge()
        return len(self._keys)

    @property
    def threshold(self) -> float | None:
        """Score of the k-th row (the paper's (1 - neg_ratio) quantile); None while fewer than k rows."""
        self._merge()
        return float(self._scores.min()) if len(self._keys) == self.k else None

    @property
    def seen(self) -> int:
        """Distinct (slide_id, tile_id) pushed so far (0 when track_seen is off)."""
        return int(sum(_POPCOUNT[bitmap].sum() for bitmap in self._seen))

    @property
    def nbytes(self) -> int:
        """Bytes held by kept rows, buffered candidates and seen-bitmaps."""
        pending = sum(a.nbytes for a in self._pending_keys) + sum(a.nbytes for a in self._pending_scores)
        return self._keys.nbytes + self._scores.nbytes + pending + sum(b.nbytes for b in self._seen)

    def table(self) -> pa.Table:
        """The top-k rows as (slide_id, tile_id, score), by score desc, slide_id asc, tile_id asc."""
        self._merge()
        order = np.lexsort((self._rank_keys(self._keys), -self._scores))
        keys = self._keys[order]
        slide_ids = pa.DictionaryArray.from_arrays(
            pa.array((keys >> _TILE_BITS).astype(np.int32)), pa.array(self._names, type=pa.string()))
        return pa.table([slide_ids.dictionary_decode(), pa.array((keys & _TILE_MASK).astype(np.int32)),
                         pa.array(self._scores[order])], schema=HARD_NEGATIVE_SCHEMA)

    # -- snapshots ---------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """The queue as a dict of numpy arrays (what `np.savez` writes)."""
        self._merge()
        lengths = np.array([len(b) for b in self._seen], dtype=np.int64)
        return {
            "k": np.int64(self.k), "pushed": np.int64(self.pushed), "duplicates": np.int64(self.duplicates),
            "track_seen": np.bool_(self.track_seen), "keys": self._keys, "scores": self._scores,
            "names": np.array(self._names, dtype=str) if self._names else np.empty(0, dtype="U1"),
            "seen_lengths": lengths,
            "seen_bits": np.concatenate(self._seen) if self._seen else np.empty(0, dtype=np.uint8),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> TopKQueue:
        """Rebuild a queue from `state()`."""
        queue = cls(int(state["k"]), track_seen=bool(state["track_seen"]))
        queue.pushed, queue.duplicates = int(state["pushed"]), int(state["duplicates"])
        for name in state["names"].tolist():
            queue._code(name)
        bits, offsets = state["seen_bits"], np.concatenate([[0], np.cumsum(state["seen_lengths"])])
        queue._seen = [bits[offsets[i]:offsets[i + 1]].copy() for i in range(len(queue._names))]
        queue._keys = state["keys"].astype(np.int64)
        queue._scores = state["scores"].astype(np.float32)
        if len(queue._keys) == queue.k:
            queue._kth = float(queue._scores.min())
        return queue


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


def positive_ratio(epoch: int, warmup: int, total_epochs: int, ro: float = 0.2, rT: float = 0.8) -> float:
    """Self-paced fraction r_t of positives kept: ro up to the warm-up epoch, linear to rT at the last epoch.

    Epochs count from 0; epoch `warmup` gives ro and epoch `total_epochs - 1` gives rT (ro throughout
    when the warm-up ends at the last epoch).
    """
    check_range("ro", ro, 0.0, 1.0, low_open=True)
    check_range("rT", rT, ro, 1.0)
    if not 0 <= warmup < total_epochs:
        raise ConfigError("warmup", f"{warmup!r} must lie in [0, total_epochs={total_epochs}); shorten the warm-up")
    span = total_epochs - 1 - warmup
    if span == 0:
        return float(ro)
    return float(ro + (rT - ro) * min(max(epoch - warmup, 0), span) / span)


def _ranked(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=RANK_ORDER))


def select_positives(table: pa.Table, threshold: float = 0.3, *, ratio: float) -> pa.Table:
    """Paper step 5: among positive-slide tiles with p > threshold, the top fraction `ratio` by p.

    `table` has slide_id, tile_id and score = p = sigmoid(instance logit) in [0, 1] (other columns
    are kept). Returns ceil(ratio * n_above) rows by score desc, then slide_id, tile_id.
    """
    check_range("ratio", ratio, 0.0, 1.0, low_open=True)
    check_range("threshold", threshold, 0.0, 1.0, high_open=True)
    scores = table["score"]
    if table.num_rows and (pc.min(scores).as_py() < 0 or pc.max(scores).as_py() > 1):
        raise HnmError(f"select_positives needs probabilities in [0, 1], got scores in [{pc.min(scores).as_py()}, "
                       f"{pc.max(scores).as_py()}]: pass p = sigmoid(logit), not logits")
    above = _ranked(table.filter(pc.greater(scores, pa.scalar(threshold, type=scores.type))))  # 0.3 as float32 too
    return above.slice(0, math.ceil(Fraction(str(ratio)) * above.num_rows))


def select_hard_negatives_local(table: pa.Table, neg_ratio: float) -> pa.Table:
    """Reference for the miner on one machine: dedupe (greatest score), full sort, top ceil(neg_ratio * N)."""
    check_range("neg_ratio", neg_ratio, 0.0, 1.0, low_open=True)
    distinct = table.group_by(["slide_id", "tile_id"]).aggregate([("score", "max")])
    distinct = pa.table([distinct["slide_id"].cast(pa.string()), distinct["tile_id"].cast(pa.int32()),
                         distinct["score_max"].cast(pa.float32())], schema=HARD_NEGATIVE_SCHEMA)
    return _ranked(distinct).slice(0, n_hard_negatives(distinct.num_rows, neg_ratio))


def uncertain_negatives(table: pa.Table, threshold: float = 0.3, *, ratio: float) -> pa.Table:
    """ItS2CLR's uncertain negatives: positive-slide tiles with p <= threshold, the lowest fraction `ratio` by p.

    As the official code selects them (InssepSPLDataset.init_bag): q = np.quantile(p of those tiles,
    ratio) with linear interpolation, keep every tile with p <= q (ties included), i.e.
    floor(ratio * (n - 1)) + 1 tiles without ties. `table` holds positive-slide tiles with slide_id,
    tile_id and score = p in [0, 1]; returned by score ascending, then slide_id, tile_id. They are
    label 0 in the official step B (after the first adopted pseudo-label update).
    """
    check_range("ratio", ratio, 0.0, 1.0, low_open=True)
    check_range("threshold", threshold, 0.0, 1.0, high_open=True)
    scores = table["score"]
    # The complement of select_positives' candidates (p > threshold, threshold cast to the score type).
    below = table.filter(pc.less_equal(scores, pa.scalar(threshold, type=scores.type)))
    if below.num_rows == 0:
        return below
    values = below["score"].to_numpy().astype(np.float64)  # the official code compares Python floats
    kept = below.filter(pa.array(values <= np.quantile(values, ratio)))
    return kept.take(pc.sort_indices(kept, sort_keys=[("score", "ascending"), ("slide_id", "ascending"),
                                                      ("tile_id", "ascending")]))


def adopt_round(new_best_val_f1: float, best_so_far: float) -> bool:
    """Official update gate: adopt a round's pseudo labels and hard negatives iff its best val F1 >= the best so far."""
    return bool(new_best_val_f1 >= best_so_far)
