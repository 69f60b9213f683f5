"""A verify pass's expert budget: the drafted tree pruned, layer by layer, to the missed experts the pass may move.

A verify pass of a mixture-of-experts model costs the distinct experts its tree routes to that are not in device
slots: each one's bytes cross the link (or the CPU reads them). A tree of hundreds of nodes touches every expert of
every layer, while the tokens it yields lie on one path. So at each MoE layer, once the routing is known, the tree
keeps its nodes best first (by score: the chance that the path to a node is accepted; a node only after its parent)
while the missed experts they need stay within `max_missed`; a node dropped there is dropped with its subtree for the
rest of the pass. The root, the token plain decoding would compute, always stays.

The pruning is exact: a kept node attends only to its ancestors, all kept, and a dropped node's experts are skipped
(its rows are garbage nobody reads); the accepted path is walked among kept nodes only. Pure bookkeeping, no torch.

A fixed budget is a blunt cut: on real language with a matched draft, consecutive tokens share experts (8 tokens
route to 33-39 distinct experts of 128 per layer, 32 tokens to 50-67, 64 to 50-79), so a deep accepted path is the
cheapest way to buy tokens, and budgets of 32 and 64 experts cut tokens per pass more than pass time
(benchmarks/RESULTS.md, 2026-12-04). `Worth` prunes by value instead (`speculation.expert_budget = "auto"`): a node
stays while the tokens its subtree is expected to yield are worth the link time of the missed experts it alone adds,
from this layer to the last, at the run's rate of tokens per second. The accepted path's nodes (scores near 1, deep
subtrees) stay; the side nodes a large tree carries, each a few hundredths of a token bringing experts of its own,
go, and with them most of the bytes past those of the path.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Worth:
    """What a missed expert costs a verify pass, in the tokens the run would make meanwhile: `expert_s` seconds
    to move (or compute) one at one layer, at `tokens_per_s`, the run's rate."""

    expert_s: float
    tokens_per_s: float

    def tokens(self, experts: int, layers: int) -> float:
        """The tokens `experts` missed experts a layer cost over `layers` layers."""
        return self.tokens_per_s * self.expert_s * experts * layers


class ExpertBudget:
    """One verify pass's tree (`parents`, `scores`, node 0 the root) under a budget of `max_missed` missed experts
    per MoE layer call (None: no cap), and/or pruned by `worth`."""

    def __init__(self, parents: Sequence[int], scores: Sequence[float], max_missed: int | None,
                 worth: Worth | None = None) -> None:
        self.parents = list(parents)
        self.max_missed = max_missed
        self.worth = worth
        self.live = [True] * len(self.parents)
        self._order = sorted(range(1, len(self.parents)), key=lambda node: (-scores[node], node))
        self._yield = list(scores)  # a node's expected tokens with its subtree's (children come after parents)
        for node in range(len(self.parents) - 1, 0, -1):
            self._yield[self.parents[node]] += self._yield[node]
        self.missed_per_layer: list[int] = []  # the missed experts each layer call kept within the budget

    @property
    def kept(self) -> int:
        """Drafted nodes still in the tree."""
        return sum(self.live) - 1

    def prune(self, rows: Sequence[Sequence[int]], missed: Callable[[int], bool], layers_left: int = 1) -> list[bool]:
        """One MoE layer's routing, `rows[node]` the experts each node is routed to, `missed(expert)` whether an
        expert must be moved to run, `layers_left` the MoE layers from this one to the last: drop the nodes that do
        not fit or are not worth their experts; returns which nodes stay."""
        live, worth = self.live, self.worth
        chosen = {expert for expert in rows[0] if missed(expert)}
        for node in self._order:
            if not live[node] or not live[self.parents[node]]:
                live[node] = False
                continue
            new = {expert for expert in rows[node] if expert not in chosen and missed(expert)}
            if self.max_missed is not None and len(chosen) + len(new) > self.max_missed:
                live[node] = False
            elif worth is not None and new and self._yield[node] < worth.tokens(len(new), layers_left):
                live[node] = False
            else:
                chosen |= new
        for node in range(1, len(live)):  # a parent scored below its child, then dropped: the child goes too
            live[node] = live[node] and live[self.parents[node]]
        self.missed_per_layer.append(len(chosen))
        return live


class PassRate:
    """The speculative run's tokens per second, as `Worth` prices a missed expert: decayed sums of the tokens each
    pass gave and the seconds it took with its drafting. Kept across calls; None before any pass."""

    DECAY = 0.7

    def __init__(self) -> None:
        self._tokens = self._seconds = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        self._tokens = self.DECAY * self._tokens + tokens
        self._seconds = self.DECAY * self._seconds + seconds

    @property
    def tokens_per_s(self) -> float | None:
        return self._tokens / self._seconds if self._seconds > 0 else None
