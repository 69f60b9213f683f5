"""One tier's bookkeeping: which units it holds, bytes used against its budget, pins, and what to evict.

No torch here (as nano-vllm's block manager): the store owns the bytes, the tier owns the accounting. Room is
reserved before bytes are allocated, so the budget holds even while a unit moves between tiers.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Hashable

from .errors import BudgetError
from .policies.eviction import EvictionPolicy
from .sizes import format_size

Key = Hashable


@dataclasses.dataclass
class TierStats:
    """Counters of one tier: requests it served (hits) or passed down (misses), bytes moved in, time spent."""

    budget_bytes: int | None
    used_bytes: int = 0
    peak_bytes: int = 0
    hits: int = 0
    misses: int = 0
    bytes_in: int = 0
    transfer_s: float = 0.0
    stall_s: float = 0.0
    evictions: int = 0

    def to_dict(self) -> dict[str, float | int | None]:
        """Counters plus the derived hit rate and achieved GB/s, JSON-serialisable."""
        data = dataclasses.asdict(self)
        requests = self.hits + self.misses
        data["hit_rate"] = self.hits / requests if requests else None
        data["gbps"] = self.bytes_in / self.transfer_s / 1e9 if self.transfer_s > 0 else None
        return data


class Tier:
    """A byte budget holding units; evicts by its policy, never a pinned unit."""

    def __init__(self, name: str, budget_bytes: int | None, policy: EvictionPolicy) -> None:
        self.name = name
        self.policy = policy
        self.stats = TierStats(budget_bytes=budget_bytes)
        self._sizes: dict[Key, int] = {}
        self._pins: dict[Key, int] = {}

    def __contains__(self, key: Key) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def budget_bytes(self) -> int | None:
        return self.stats.budget_bytes

    @property
    def used_bytes(self) -> int:
        return self.stats.used_bytes

    def keys(self) -> list[Key]:
        """Units held now."""
        return list(self._sizes)

    def evictable(self) -> set[Key]:
        """Units that may leave now: held and not pinned."""
        return {key for key in self._sizes if not self._pins.get(key)}

    def plan_admit(self, key: Key, nbytes: int) -> list[Key] | None:
        """The victims that would make room for `key`, or None if pinned units leave too little room.

        Raises BudgetError when the unit can never fit, whatever is evicted.
        """
        budget = self.stats.budget_bytes
        if budget is None:
            return []
        if nbytes > budget:
            raise BudgetError(f"{self.name} tier budget {format_size(budget)} cannot hold unit {key!r}: "
                              f"it needs {nbytes} bytes ({format_size(nbytes)})")
        victims: list[Key] = []
        free = budget - self.stats.used_bytes
        candidates = self.evictable()
        while free < nbytes:
            victim = self.policy.victim(candidates)
            if victim is None:
                return None
            candidates.discard(victim)
            victims.append(victim)
            free += self._sizes[victim]
        return victims

    def admit(self, key: Key, nbytes: int) -> None:
        """Account `key` as held. The caller has removed the victims from `plan_admit` first."""
        assert key not in self._sizes, f"{key!r} already in {self.name}"
        budget = self.stats.budget_bytes
        assert budget is None or self.stats.used_bytes + nbytes <= budget, f"{self.name} over budget"
        self._sizes[key] = nbytes
        self.stats.used_bytes += nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.used_bytes)
        self.policy.on_insert(key, nbytes)

    def remove(self, key: Key) -> int:
        """Forget `key`; returns its size. It must not be pinned."""
        assert not self._pins.get(key), f"{key!r} is pinned in {self.name}"
        nbytes = self._sizes.pop(key)
        self.stats.used_bytes -= nbytes
        self.stats.evictions += 1
        self.policy.on_remove(key)
        return nbytes

    def access(self, key: Key) -> None:
        """Tell the policy `key` was used."""
        self.policy.on_access(key)

    def pin(self, key: Key) -> None:
        """Keep `key` from eviction until `unpin`."""
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: Key) -> None:
        """Let the policy decide about `key` again once every pin is gone."""
        count = self._pins.get(key, 0) - 1
        assert count >= 0, f"{key!r} unpinned more often than pinned in {self.name}"
        if count:
            self._pins[key] = count
        else:
            self._pins.pop(key, None)

    def pinned(self, key: Key) -> bool:
        """Whether `key` is in use."""
        return bool(self._pins.get(key))


def replay(trace: list[Key], sizes: dict[Key, int], budget_bytes: int, policy: EvictionPolicy) -> TierStats:
    """Run an access trace through one tier on demand (no prefetch); returns its counters."""
    tier = Tier("replay", budget_bytes, policy)
    for key in trace:
        if key in tier:
            tier.stats.hits += 1
        else:
            tier.stats.misses += 1
            victims = tier.plan_admit(key, sizes[key])
            assert victims is not None, "nothing is pinned during a replay"
            for victim in victims:
                tier.remove(victim)
            tier.admit(key, sizes[key])
            tier.stats.bytes_in += sizes[key]
        tier.access(key)
    return tier.stats
