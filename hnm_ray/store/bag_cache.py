"""A bounded cache of MIL bags: the MIL loop reads a bag from the FeatureStore when a pair or an evaluation needs it.

Bags are kept as stored (float16 features of a float16 store: half the bytes of float32, so twice the bags fit) and
widened to float32 each time they are handed out (~1 us a 512-d tile, against ~7-9 us to read one again). They are
kept in the order they are first asked for while they fit the budget; a bag that arrives once the budget
is full is read from its Parquet file every time it is asked for (and freed when its caller lets go). Nothing is
evicted: each epoch asks for every bag once in a fresh shuffled order, so an LRU would hit about the same share of
reads (the budget's share of the bags) while evicting and re-allocating on every miss. A cohort within the budget
is read once and then served from memory, as when every bag was loaded up front.

`iterate(..., ahead=n)` reads the next n bags of a sequence in one background thread while the caller computes on
the one in hand (Parquet decoding, the float16 -> float32 widening and torch leave the interpreter lock), for a
node with a core to spare: on the busy shared 2-core node it did not pay (benchmarks/results/mil_epoch.json).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from hnm_ray.core import storage
from hnm_ray.core.errors import StoreError
from hnm_ray.store.features import Bag, FeatureStore

GIB = 2 ** 30


def bag_bytes(bag: Bag) -> int:
    """Bytes a Bag holds in memory (features, tile ids, coords, truth)."""
    return sum(a.nbytes for a in (bag.features, bag.tile_ids, bag.coords, bag.truth))


def check_bag_sizes(store: FeatureStore, slide_ids: Iterable[str], max_gib: float) -> None:
    """StoreError naming the first slide whose float32 features exceed `max_gib` (`mil.max_bag_gib`) and the fix,
    from the Parquet footers, before any bag is read."""
    dim = int(store.metadata()["dim"])
    for slide_id in slide_ids:
        tiles = storage.num_rows(store.slide_path(slide_id))
        if (gib := tiles * dim * 4 / GIB) > max_gib:
            raise StoreError(
                f"slide {slide_id!r}: its bag of {tiles:,} tiles x {dim} features is {gib:.2f} GiB as float32, above "
                f"mil.max_bag_gib {max_gib:g}; MIL holds a bag whole and a training pair of such bags would peak at "
                f"~{7 * gib:.1f}-{13 * gib:.1f} GiB. Raise --mil.max_bag_gib where a worker has that memory, or "
                "extract the slide at a lower magnification / larger tiles, or leave it out of the manifest")


class BagCache:
    """Bags of `store` by slide id, read on first use and kept (as stored) while the kept bags total <=
    `budget_bytes`; handed out with float32 features."""

    def __init__(self, store: FeatureStore, budget_bytes: int) -> None:
        self.store = store
        self.budget_bytes = int(budget_bytes)
        self.held_bytes = 0
        self.reads = 0  # Parquet reads (first reads and re-reads of bags that did not fit)
        self._bags: dict[str, Bag] = {}

    def __len__(self) -> int:
        return len(self._bags)

    def get(self, slide_id: str, label: int | None) -> Bag:
        """The bag of `slide_id` with `label` (float32 features): from memory, or read (and kept if it fits the
        budget)."""
        bag = self._bags.get(slide_id)
        if bag is not None:
            return bag.widened()
        bag = self.store.read_bag(slide_id, label=label, as_stored=True)
        self.reads += 1
        size = bag_bytes(bag)
        if self.held_bytes + size <= self.budget_bytes:
            self._bags[slide_id] = bag
            self.held_bytes += size
        return bag.widened()

    def iterate(self, slides: Iterable[tuple[str, int | None]], ahead: int = 0) -> Iterator[Bag]:
        """The bags of (slide_id, label) pairs one at a time, in order, as `get` gives them. With `ahead` > 0 the next
        `ahead` bags are read in a background thread meanwhile (the same `get` calls in the same order, so the cache
        keeps the same bags): besides the cache, the bags the caller holds plus at most `ahead` more are in memory.
        A read's error is raised when its bag is due."""
        if ahead <= 0:
            yield from (self.get(slide_id, label) for slide_id, label in slides)
            return
        keys = iter(slides)
        with ThreadPoolExecutor(1, thread_name_prefix="bag-read") as reader:
            pending: deque[Future[Bag]] = deque(reader.submit(self.get, *key) for _, key in zip(range(ahead), keys))
            while pending:
                bag = pending.popleft().result()
                if (key := next(keys, None)) is not None:
                    pending.append(reader.submit(self.get, *key))
                yield bag
                del bag  # not held while the caller asks for the next one
