"""A bounded cache of MIL bags: the MIL loop reads a bag from the FeatureStore when a pair or an evaluation needs it.

Bags are kept in the order they are first asked for while they fit the budget; a bag that arrives once the budget
is full is read from its Parquet file every time it is asked for (and freed when its caller lets go). Nothing is
evicted: each epoch asks for every bag once in a fresh shuffled order, so an LRU would hit about the same share of
reads (the budget's share of the bags) while evicting and re-allocating on every miss. A cohort within the budget
is read once and then served from memory, as when every bag was loaded up front.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from hnm_ray.store.features import Bag, FeatureStore

GIB = 2 ** 30


def bag_bytes(bag: Bag) -> int:
    """Bytes a Bag holds in memory (features float32, tile ids, coords, truth)."""
    return sum(a.nbytes for a in (bag.features, bag.tile_ids, bag.coords, bag.truth))


class BagCache:
    """Bags of `store` by slide id, read on first use and kept while the kept bags total <= `budget_bytes`."""

    def __init__(self, store: FeatureStore, budget_bytes: int) -> None:
        self.store = store
        self.budget_bytes = int(budget_bytes)
        self.held_bytes = 0
        self.reads = 0  # Parquet reads (first reads and re-reads of bags that did not fit)
        self._bags: dict[str, Bag] = {}

    def __len__(self) -> int:
        return len(self._bags)

    def get(self, slide_id: str, label: int | None) -> Bag:
        """The bag of `slide_id` with `label`: from memory, or read (and kept if it fits the budget)."""
        bag = self._bags.get(slide_id)
        if bag is not None:
            return bag
        bag = self.store.read_bag(slide_id, label=label)
        self.reads += 1
        size = bag_bytes(bag)
        if self.held_bytes + size <= self.budget_bytes:
            self._bags[slide_id] = bag
            self.held_bytes += size
        return bag

    def iterate(self, slides: Iterable[tuple[str, int]]) -> Iterator[Bag]:
        """The bags of (slide_id, label) pairs one at a time, as `get` gives them (an evaluation pass)."""
        return (self.get(slide_id, label) for slide_id, label in slides)
