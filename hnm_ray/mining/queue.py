"""The exact global top-k of hard negative mining (paper step 6): `TopKQueue`.

Step 6 keeps only the global top fraction `neg_ratio` of negative-slide tiles by score: an exact
top-k with k = ceil(neg_ratio * N_neg) over the whole training set. `TopKQueue` computes it with
O(k) memory from batches pushed in any order; `HardNegativeMiner` (`miner.py`) wraps it as a named Ray actor
that every scoring worker pushes to, and that survives restarts through snapshots.

Ranking is by score descending, then slide_id ascending, then tile_id ascending, so the result
is deterministic whatever the push order. A (slide_id, tile_id) pushed several times (task
retries, overlapping shards) counts once with its greatest score: max is order-independent, so
concurrent pushes give the same queue as any sequential order.

Scores: the miner ranks whatever it is given (the order of p = sigmoid(logit) and of the logit
is the same); `threshold()` is in the unit pushed. The project pushes instance logits: float32
p saturates at 1.0 above a logit of ~17 and would tie; sigmoid(threshold()) is the paper's
(1 - neg_ratio) quantile of p. `select_positives` (`selection.py`) needs p in [0, 1].
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa

from hnm_ray.core.errors import ConfigError

HARD_NEGATIVE_SCHEMA = pa.schema([("slide_id", pa.string()), ("tile_id", pa.int32()), ("score", pa.float32())])
RANK_ORDER = [("score", "descending"), ("slide_id", "ascending"), ("tile_id", "ascending")]

_TILE_BITS = 32
_TILE_MASK = (1 << _TILE_BITS) - 1
_MIN_PENDING = 1 << 16  # candidates buffered before a merge, at least; bounds merge cost per row
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


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


