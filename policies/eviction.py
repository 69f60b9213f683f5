"""Eviction policies: given the keys that may go, which one goes first. Keys and byte counts only, no torch.

The store calls `on_insert` when a unit enters a tier, `on_access` each time the loop asks for it, and
`on_remove` when it leaves; `victim(candidates)` answers which of the evictable keys to drop. The store, not the
policy, knows which units are in use, so it passes only those that may go. The policies here also rank the
candidates lazily (`ranked`), so that a tier making room for many units at once (an MoE layer's missed experts)
walks its policy once, not once per unit.

cachetools' caches couple choosing a victim to removing it (`popitem`) and cannot skip units in use, so the
orderings here are kept by hand; each is a few lines over an OrderedDict.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Generator, Hashable, Sequence, Set
from typing import Protocol

Key = Hashable  # a unit's name: the one definition, used by the tiers, the store and the policies


class EvictionPolicy(Protocol):
    """Which unit leaves a tier when room is needed."""

    def on_insert(self, key: Key, nbytes: int) -> None: ...
    def on_access(self, key: Key) -> None: ...
    def on_remove(self, key: Key) -> None: ...
    def victim(self, candidates: Set[Key]) -> Key | None: ...


def first(ranking: Generator[Key, None, None]) -> Key | None:
    """The first key of a ranking (None when empty); the ranking is closed, so a walk restores what it moved."""
    try:
        return next(ranking, None)
    finally:
        ranking.close()


def ranked(policy: EvictionPolicy, candidates: Set[Key]) -> Generator[Key, None, None]:
    """`candidates` in the order `policy` would evict them, lazily: its own `ranked` when it has one, else one
    `victim` call per key (a policy plugged in from outside need only answer `victim`)."""
    own = getattr(policy, "ranked", None)
    if own is not None:
        yield from own(candidates)
        return
    left = set(candidates)
    while (victim := policy.victim(left)) is not None:
        left.discard(victim)
        yield victim


class _Ranked:
    """A policy whose `victim` is the first of its `ranked` candidates."""

    def ranked(self, candidates: Set[Key]) -> Generator[Key, None, None]:
        raise NotImplementedError

    def victim(self, candidates: Set[Key]) -> Key | None:
        return first(self.ranked(candidates))


class _Ordered(_Ranked):
    """Shared bookkeeping: keys in insertion order; subclasses choose what access does and which end goes."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def on_insert(self, key: Key, nbytes: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: Key) -> None:
        pass

    def on_remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def ranked(self, candidates: Set[Key]) -> Generator[Key, None, None]:
        return (key for key in self._order if key in candidates)


class FIFO(_Ordered):
    """First in, first out: the oldest insertion goes."""


class LRU(_Ordered):
    """Least recently used goes. On a cyclic scan larger than the tier it never hits."""

    def on_access(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)


class MRU(LRU):
    """Most recently used goes: the right choice for a cyclic scan without a known schedule."""

    def ranked(self, candidates: Set[Key]) -> Generator[Key, None, None]:
        return (key for key in reversed(self._order) if key in candidates)


class LFU(_Ranked):
    """Least frequently used goes, with decay: each access counts 2**(1/half_life) times more than the one before,
    so a count halves in weight after `half_life_accesses` later accesses (to any key) and a unit popular long ago
    does not stay forever. Counts outlive eviction (the keys are a model's units, a bounded set), so a popular unit
    comes back with its history. Ties go to the oldest insertion.

    The choice is a heap of (count, insertion, key), stale entries skipped when they surface: O(log n) per access
    and per victim, for tiers of a thousand expert slots."""

    def __init__(self, half_life_accesses: int = 4096) -> None:
        self._count: dict[Key, float] = {}
        self._inserted: dict[Key, int] = {}  # present keys -> insertion number
        self._heap: list[tuple[float, int, Key]] = []
        self._insertions = 0
        self._growth = 2.0 ** (1.0 / half_life_accesses)
        self._weight = 1.0

    def on_insert(self, key: Key, nbytes: int) -> None:
        self._insertions += 1
        self._inserted[key] = self._insertions
        heapq.heappush(self._heap, (self._count.setdefault(key, 0.0), self._insertions, key))

    def on_access(self, key: Key) -> None:
        count = self._count[key] = self._count.get(key, 0.0) + self._weight
        self._weight *= self._growth
        if key in self._inserted:
            heapq.heappush(self._heap, (count, self._inserted[key], key))
        if self._weight > 1e100 or len(self._heap) > 4 * len(self._inserted) + 64:
            self._rebuild()

    def on_remove(self, key: Key) -> None:
        self._inserted.pop(key, None)

    def ranked(self, candidates: Set[Key]) -> Generator[Key, None, None]:
        """Least counted first: the heap is popped as far as the caller reads (stale entries dropped on the way),
        and the current entries popped go back when the walk is closed."""
        popped: list[tuple[float, int, Key]] = []  # current entries taken off the heap, to go back
        try:
            while self._heap:
                entry = heapq.heappop(self._heap)
                count, inserted, key = entry
                if self._inserted.get(key) != inserted or self._count[key] != count:
                    continue  # stale: removed since, or accessed since
                popped.append(entry)
                if key in candidates:
                    yield key
        finally:
            for entry in popped:
                heapq.heappush(self._heap, entry)

    def _rebuild(self) -> None:
        """Drop stale entries; rescale the counts when the weights grow large (only their ratios matter)."""
        if self._weight > 1e100:
            self._count = {key: count / self._weight for key, count in self._count.items()}
            self._weight = 1.0
        self._heap = [(self._count[key], inserted, key) for key, inserted in self._inserted.items()]
        heapq.heapify(self._heap)


class Belady(_Ranked):
    """Optimal with a known future: drop the unit whose next use is farthest away.

    `schedule` is the order of accesses in one pass (a key may appear twice, e.g. tied embeddings); passes repeat.
    The position follows `on_access`, so the policy stays right when the loop skips nothing.
    """

    def __init__(self, schedule: Sequence[Key]) -> None:
        if not schedule:
            raise ValueError("belady needs a non-empty schedule")
        self._period = len(schedule)
        self._positions: dict[Key, list[int]] = {}
        for index, key in enumerate(schedule):
            self._positions.setdefault(key, []).append(index)
        self._position = -1
        self._present: set[Key] = set()

    def on_insert(self, key: Key, nbytes: int) -> None:
        self._present.add(key)

    def on_access(self, key: Key) -> None:
        positions = self._positions.get(key)
        if positions:
            self._position = min(positions, key=lambda p: (p - self._position - 1) % self._period)

    def on_remove(self, key: Key) -> None:
        self._present.discard(key)

    def next_use_distance(self, key: Key) -> int:
        """Accesses until `key` is used again; beyond one period for a key outside the schedule."""
        positions = self._positions.get(key)
        if not positions:
            return self._period + 1
        return min((p - self._position - 1) % self._period for p in positions) + 1

    def ranked(self, candidates: Set[Key]) -> Generator[Key, None, None]:
        present = [key for key in candidates if key in self._present]
        yield from sorted(present, key=self.next_use_distance, reverse=True)  # ties: the first candidate first


class Static(_Ordered):
    """A fixed resident set chosen by the planner; everything else passes through in FIFO order.

    On a cyclic scan this equals Belady: the resident units always hit, the rest stream through the remaining room.
    A resident unit is dropped only when nothing else can go, so a plan that is too tight degrades, not deadlocks.
    """

    def __init__(self, resident: Set[Key]) -> None:
        super().__init__()
        self.resident = frozenset(resident)

    def ranked(self, candidates: Set[Key]) -> Generator[Key, None, None]:
        yield from (key for key in self._order if key in candidates and key not in self.resident)
        yield from (key for key in self._order if key in candidates and key in self.resident)
