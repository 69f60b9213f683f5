"""Config names to policy classes. Each factory takes what the policy may need: the schedule, the resident set."""
from __future__ import annotations

from collections.abc import Callable, Sequence, Set

from .eviction import FIFO, LFU, LRU, MRU, Belady, EvictionPolicy, Key, Static
from .prefetch import Lookahead, NoPrefetch, PrefetchPolicy

EvictionFactory = Callable[[Sequence[Key], Set[Key]], EvictionPolicy]

EVICTION_POLICIES: dict[str, EvictionFactory] = {
    "lru": lambda schedule, resident: LRU(),
    "lfu": lambda schedule, resident: LFU(),
    "fifo": lambda schedule, resident: FIFO(),
    "mru": lambda schedule, resident: MRU(),
    "belady": lambda schedule, resident: Belady(schedule),
    "static": lambda schedule, resident: Static(resident),
}

PREFETCH_POLICIES: dict[str, Callable[[int], PrefetchPolicy]] = {
    "none": lambda depth: NoPrefetch(),
    "lookahead": Lookahead,
}


def make_eviction(name: str, schedule: Sequence[Key], resident: Set[Key]) -> EvictionPolicy:
    """Build the eviction policy registered under `name`."""
    return EVICTION_POLICIES[name](schedule, resident)


def make_prefetch(name: str, depth: int) -> PrefetchPolicy:
    """Build the prefetch policy registered under `name`."""
    return PREFETCH_POLICIES[name](depth)
