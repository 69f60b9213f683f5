"""A verify pass's expert budget: the drafted tree pruned, layer by layer, to the missed experts the pass may move.

A verify pass of a mixture-of-experts model costs the distinct experts its tree routes to that are not in device
slots: each one's bytes cross the link (or the CPU reads them). A tree of hundreds of nodes touches every expert of
every layer, while the tokens it yields lie on one path. So at each MoE layer, once the routing is known, the tree
keeps its nodes best first (by score: the chance that the path to a node is accepted; a node only after its parent)
while the missed experts they need stay within `max_missed`; a node dropped there is dropped with its subtree for the
rest of the pass. The root, the token plain decoding would compute, always stays.

The pruning is exact: a kept node attends only to its ancestors, all kept, and a dropped node's experts are skipped
(its rows are garbage nobody reads); the accepted path is walked among kept nodes only. Pure bookkeeping, no torch.

Off by default (`speculation.expert_budget = "none"`): on real language with a matched draft, consecutive tokens
share experts (8 tokens route to 33-39 distinct experts of 128 per layer, 32 tokens to 50-67), so a deep accepted
path is the cheapest way to buy tokens, and budgets of 32 and 64 experts cut tokens per pass more than pass time
(benchmarks/RESULTS.md, 2026-12-04).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence


class ExpertBudget:
    """One verify pass's tree (`parents`, `scores`, node 0 the root) under a budget of `max_missed` missed experts
    per MoE layer call."""

    def __init__(self, parents: Sequence[int], scores: Sequence[float], max_missed: int) -> None:
        self.parents = list(parents)
        self.max_missed = max_missed
        self.live = [True] * len(self.parents)
        self._order = sorted(range(1, len(self.parents)), key=lambda node: (-scores[node], node))
        self.missed_per_layer: list[int] = []  # the missed experts each layer call kept within the budget

    @property
    def kept(self) -> int:
        """Drafted nodes still in the tree."""
        return sum(self.live) - 1

    def prune(self, rows: Sequence[Sequence[int]], missed: Callable[[int], bool]) -> list[bool]:
        """One MoE layer's routing, `rows[node]` the experts each node is routed to, `missed(expert)` whether an
        expert must be moved to run: drop the nodes that do not fit; returns which nodes stay."""
        live = self.live
        chosen = {expert for expert in rows[0] if missed(expert)}
        for node in self._order:
            if not live[node] or not live[self.parents[node]]:
                live[node] = False
                continue
            new = {expert for expert in rows[node] if expert not in chosen and missed(expert)}
            if len(chosen) + len(new) > self.max_missed:
                live[node] = False
            else:
                chosen |= new
        for node in range(1, len(live)):  # a parent scored below its child, then dropped: the child goes too
            live[node] = live[node] and live[self.parents[node]]
        self.missed_per_layer.append(len(chosen))
        return live
