"""Prefetch policies: given the schedule and where the loop is, which units to start loading now."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from .eviction import Key


class PrefetchPolicy(Protocol):
    """What to load next, given the position just reached in a cyclic schedule."""

    depth: int

    def next_keys(self, schedule: Sequence[Key], position: int,
                  skip: Callable[[Key], bool] | None = None) -> list[Key]: ...


class NoPrefetch:
    """Load only on demand."""

    depth = 0

    def next_keys(self, schedule: Sequence[Key], position: int,
                  skip: Callable[[Key], bool] | None = None) -> list[Key]:
        return []


class Lookahead:
    """The next `depth` units of the schedule, wrapping into the next pass (the next token's first layers),
    not counting those `skip` says stay in place (resident units): the copies keep `depth` streamed units ahead
    even where resident units sit between them."""

    def __init__(self, depth: int) -> None:
        if depth < 0:
            raise ValueError(f"lookahead depth must be >= 0, got {depth}")
        self.depth = depth

    def next_keys(self, schedule: Sequence[Key], position: int,
                  skip: Callable[[Key], bool] | None = None) -> list[Key]:
        period = len(schedule)
        chosen: list[Key] = []
        for step in range(1, period + 1):
            if len(chosen) == self.depth:
                break
            key = schedule[(position + step) % period]
            if key not in chosen and not (skip is not None and skip(key)):
                chosen.append(key)
        return chosen
