"""Prefetch policies: given the schedule and where the loop is, which units to start loading now."""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

Key = Hashable


class PrefetchPolicy(Protocol):
    """What to load next, given the position just reached in a cyclic schedule."""

    depth: int

    def next_keys(self, schedule: Sequence[Key], position: int) -> list[Key]: ...


class NoPrefetch:
    """Load only on demand."""

    depth = 0

    def next_keys(self, schedule: Sequence[Key], position: int) -> list[Key]:
        return []


class Lookahead:
    """The next `depth` units of the schedule, wrapping into the next pass (the next token's first layers)."""

    def __init__(self, depth: int) -> None:
        if depth < 0:
            raise ValueError(f"lookahead depth must be >= 0, got {depth}")
        self.depth = depth

    def next_keys(self, schedule: Sequence[Key], position: int) -> list[Key]:
        period = len(schedule)
        seen: list[Key] = []
        for step in range(1, min(self.depth, period) + 1):
            key = schedule[(position + step) % period]
            if key not in seen:
                seen.append(key)
        return seen
