"""One tier's bookkeeping: which units it holds, bytes used against its budget, pins, and what to evict.

No torch here (as nano-vllm's block manager): the store owns the bytes, the tier owns the accounting. Room is
reserved before bytes are allocated, so the budget holds even while a unit moves between tiers.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Set

from .errors import BudgetError, InvariantError
from .policies.eviction import EvictionPolicy, Key, ranked
from .sizes import format_size


@dataclasses.dataclass
class TierStats:
    """Counters of one tier: requests it served (hits) or passed down (misses), bytes moved in (read or copied
    into it) and out (served to the tier above), time spent moving them, time the loop waited on it."""

    budget_bytes: int | None
    used_bytes: int = 0
    peak_bytes: int = 0
    hits: int = 0
    misses: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    transfer_s: float = 0.0
    stall_s: float = 0.0
    evictions: int = 0

    def to_dict(self) -> dict[str, float | int | None]:
        """Counters plus the derived hit rate and achieved GB/s, JSON-serialisable."""
        data = dataclasses.asdict(self)
        requests = self.hits + self.misses
        data["hit_rate"] = self.hits / requests if requests else None
        moved = self.bytes_in or self.bytes_out  # the disk tier only gives bytes out
        data["gbps"] = moved / self.transfer_s / 1e9 if self.transfer_s > 0 else None
        return data

    def reset(self) -> None:
        """Zero the counters, for a new call; the peak starts from what is held now."""
        for field in ("hits", "misses", "bytes_in", "bytes_out", "transfer_s", "stall_s", "evictions"):
            setattr(self, field, type(getattr(self, field))())
        self.peak_bytes = self.used_bytes


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

    def replace_policy(self, policy: EvictionPolicy) -> None:
        """Hand the units held now to a new eviction policy (a re-plan)."""
        for key, nbytes in self._sizes.items():
            policy.on_insert(key, nbytes)
        self.policy = policy

    def set_budget(self, budget_bytes: int) -> list[Key]:
        """A new budget (a re-plan); returns the victims to remove, by the policy, for what is held to fit it.
        BudgetError when units in use keep it over. The peak restarts from what will be held."""
        victims = self._victims(self.stats.used_bytes - budget_bytes)
        if victims is None:
            raise BudgetError(f"{self.name} tier: units in use while re-planning to {format_size(budget_bytes)}")
        self.stats.budget_bytes = budget_bytes
        self.stats.peak_bytes = self.stats.used_bytes - sum(self._sizes[victim] for victim in victims)
        return victims

    def evictable(self) -> Evictable:
        """Units that may leave now: held and not pinned (a view: asking whether a key is one costs O(1), so a
        policy finding one victim among a thousand expert slots need not copy them all)."""
        return Evictable(self._sizes, self._pins)

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
        return self._victims(nbytes - (budget - self.stats.used_bytes))

    def _victims(self, nbytes: int) -> list[Key] | None:
        """Evictable units, in the policy's order, that free at least `nbytes`; None if pinned ones forbid it."""
        victims: list[Key] = []
        if nbytes <= 0:
            return victims  # room already: no need to look at what is held
        ranking = ranked(self.policy, self.evictable())
        try:  # one walk of the policy, however many victims
            for victim in ranking:
                victims.append(victim)
                nbytes -= self._sizes[victim]
                if nbytes <= 0:
                    return victims
        finally:
            ranking.close()
        return None

    def plan_room(self, nbytes: int) -> list[Key] | None:
        """The victims that would leave `nbytes` free (room for several units, found in one walk of the policy),
        or None if pinned units leave too little room."""
        budget = self.stats.budget_bytes
        return [] if budget is None else self._victims(nbytes - (budget - self.stats.used_bytes))

    def admit(self, key: Key, nbytes: int) -> None:
        """Account `key` as held. The caller has removed the victims from `plan_admit` first."""
        budget = self.stats.budget_bytes
        if key in self._sizes or (budget is not None and self.stats.used_bytes + nbytes > budget):
            raise InvariantError(f"{self.name} tier: admitting {key!r} ({nbytes} bytes) to "
                                 f"{self.stats.used_bytes} of {budget} bytes held, {len(self)} units")
        self._sizes[key] = nbytes
        self.stats.used_bytes += nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.used_bytes)
        self.policy.on_insert(key, nbytes)

    def remove(self, key: Key) -> int:
        """Forget `key`; returns its size. It must not be pinned."""
        if self._pins.get(key):
            raise InvariantError(f"{self.name} tier: removing {key!r}, which is in use")
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
        if count < 0:
            raise InvariantError(f"{self.name} tier: {key!r} unpinned more often than pinned")
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
            if victims is None:
                raise InvariantError("replay: a pinned unit (nothing is pinned during a replay)")
            for victim in victims:
                tier.remove(victim)
            tier.admit(key, sizes[key])
            tier.stats.bytes_in += sizes[key]
        tier.access(key)
    return tier.stats


class Evictable(Set):
    """The held units that are not pinned, seen through the tier's own maps; `discard` takes a unit out of this view
    only (a victim already chosen)."""

    def __init__(self, sizes: dict[Key, int], pins: dict[Key, int]) -> None:
        self._sizes = sizes
        self._pins = pins
        self._taken: set[Key] = set()

    def __contains__(self, key: object) -> bool:
        return key in self._sizes and not self._pins.get(key) and key not in self._taken  # type: ignore[call-overload]

    def __iter__(self) -> Iterator[Key]:
        return (key for key in self._sizes if key in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def discard(self, key: Key) -> None:
        self._taken.add(key)
