"""The verifying model's side of speculation: the prompt fed into its cache, then one forward per drafted tree
(tree attention mask, positions by depth), the cache cut to the accepted path.

`Verifier` runs transformers' own cache and forward: any model, any tier; for a mixture-of-experts model whose
experts stream, a pass may run under an expert budget (inference/runtime/expert_budget.py) that prunes the tree to
the missed experts it may move. `GraphedVerifier` is for a model whose every unit stays on the device, where a pass
is launches rather than bytes: its cache is a `StaticKV` sized for the call, and a tree is padded to the next of a
few widths (`widths`: powers of two up to the node cap), each width one `StaticForward`, recorded as a CUDA graph
on its first run and replayed after. Both give the same tokens up to the attention kernels' rounding.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from ..runtime.expert_budget import ExpertBudget, PassRate, Worth
from .sampling import Choose
from .static_forward import StaticForward, StaticKV, feed_prompt_static
from .tree import DraftTree, attention_bias, keep_positions

ROUND_TOKENS = 256  # the cache is sized in these steps, so calls of similar lengths reuse its graphs
SMALLEST_WIDTH = 8  # a pass of fewer tokens costs what one of eight does: no graph below it


Meanwhile = Callable[[Callable[[], bool]], None]  # work done while a launched pass runs, given whether it still does


def running(device: torch.device) -> Callable[[], bool]:
    """Whether the work queued so far on `device`'s current stream is still running (never, on a CPU: each op has
    finished when it returns)."""
    if device.type != "cuda":
        return lambda: False
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return lambda: not event.query()


def walk(tree: DraftTree, picks: list[int]) -> tuple[list[int], int]:
    """The accepted path (node indices from the root) following the model's pick at each node, and the pick
    after its last node (the bonus token)."""
    path = [0]
    while (child := tree.children[path[-1]].get(picks[path[-1]])) is not None:
        path.append(child)
    return path, picks[path[-1]]


class Verifier:
    """Verify passes through transformers' DynamicCache; `feed(ids, cache)` feeds the prompt (the caller's
    chunking within the budget) and returns its last logits. With `experts` (the streamed experts' runner) and
    `max_missed`, each pass moves at most that many missed experts per MoE layer, dropping the nodes that would
    need more; with `rate` (the run's tokens per second, observed here), it drops the nodes not worth the experts
    they add (expert_budget.py, `Worth`). With `experts`, a pass's `meanwhile` also runs at each MoE layer's
    routing read-back, where the host waits for the layer's copies. `make_room(context_tokens, nodes)` runs
    before each pass (the model's: cached device memory given back where the pass would take the process past its
    budget)."""

    graphed = None  # never replays a graph

    @staticmethod
    def capture_s() -> float:
        return 0.0

    def __init__(self, model: Any, device: torch.device, feed: Any = None, experts: Any = None,
                 max_missed: int | None = None, rate: PassRate | None = None,
                 make_room: Callable[[int, int], None] | None = None) -> None:
        from transformers import DynamicCache

        self.model = model
        self.device = device
        self.cache = DynamicCache()
        self._feed = feed or (lambda ids, kv: model(ids, past_key_values=kv, use_cache=True,
                                                    logits_to_keep=1).logits[0])
        self.experts = experts  # the streamed experts' runner (None: no MoE layer streams its experts)
        self._budgeted = experts is not None and (max_missed is not None or rate is not None)
        self.max_missed = max_missed
        self.rate = rate
        self._pass_end_s: float | None = None  # when the last pass (or the prompt) ended: a pass's time drafts too
        self.pruned_nodes = 0  # drafted nodes the expert budget dropped, over this call's passes
        self.most_missed = 0  # the most missed experts one budgeted MoE layer call moved
        self.last_kept: int | None = None  # drafted nodes the last pass's budget kept (None: no budget)
        self._make_room = make_room  # called with (context tokens, nodes) before each pass

    def start(self, input_ids: torch.Tensor, max_tokens: int) -> torch.Tensor:
        """Feed the prompt (1, n); its last position's logits (1, vocab)."""
        with torch.no_grad():
            logits = self._feed(input_ids, self.cache)[-1:]
        self._pass_end_s = time.perf_counter()
        return logits

    def verify(self, tree: DraftTree, choose: Choose, meanwhile: Meanwhile | None = None) -> tuple[list[int], int]:
        """One forward over the tree; the accepted path and the bonus token. The cache keeps the prefix and the
        path's nodes. `meanwhile(busy)` runs once the forward is launched, before its picks are read back, and in
        a pass whose experts stream, also at each MoE layer's routing read-back (the host waits there for the
        layer's copies: busy() until the device has caught up)."""
        device = self.device
        prefix = self.cache.get_seq_length()
        if self._make_room is not None:
            self._make_room(prefix, len(tree))
        nodes = list(range(len(tree)))
        bias = attention_bias(prefix, tree.ancestry(nodes, nodes), self.model.dtype, device)
        budget = self._budget(tree)
        pruning = self.experts.pruning(budget) if budget is not None else contextlib.nullcontext()
        waits = (self.experts.while_routing(lambda: meanwhile(running(device)))
                 if meanwhile is not None and self.experts is not None else contextlib.nullcontext())
        with waits, pruning, torch.no_grad():  # the experts' runner prunes the tree at each MoE layer
            logits = self.model(input_ids=torch.tensor([tree.tokens], device=device),
                                position_ids=torch.tensor([[prefix + depth for depth in tree.depths]], device=device),
                                attention_mask=bias, past_key_values=self.cache, use_cache=True).logits[0]
        if meanwhile is not None:
            meanwhile(running(device))
        if budget is not None:
            self.pruned_nodes += tree.drop(budget.live)
            # a cap bounds what any pass verifies: the tree policy drafts up to twice what it kept; pruning by worth
            # drops the side nodes of every tree, whatever its size, and must not shrink the paths drafted after
            self.last_kept = budget.kept if self.max_missed is not None else None
            self.most_missed = max([self.most_missed, *budget.missed_per_layer])
        path, bonus = walk(tree, choose(logits).tolist())  # the host needs the picks: the pass's sync
        keep_positions(self.cache, prefix, [prefix + node for node in path])
        now_s = time.perf_counter()
        if self.rate is not None and self._pass_end_s is not None:
            self.rate.observe(len(path), now_s - self._pass_end_s)
        self._pass_end_s = now_s
        return path, bonus

    def _budget(self, tree: DraftTree) -> ExpertBudget | None:
        """The pass's expert budget: a cap of missed experts, pruning by worth once the run's rate is known, or
        both; None without either."""
        if not self._budgeted:
            return None
        worth = None
        if self.rate is not None:
            expert_s, tokens_per_s = self.experts.missed_expert_s(), self.rate.tokens_per_s
            worth = Worth(expert_s, tokens_per_s) if expert_s and tokens_per_s else None
        if worth is None and self.max_missed is None:
            return None
        return ExpertBudget(tree.parents, tree.scores, self.max_missed, worth)


class GraphedVerifier:
    """Verify passes of a model resident on the device, over fixed buffers. Kept across calls: a call whose
    sequence and tree fit the buffers reuses their graphs."""

    pruned_nodes = most_missed = 0  # every expert is on the device: no budget
    last_kept = None

    def __init__(self, model: Any, device: torch.device, max_nodes: int) -> None:
        self.model = model  # transformers' model, every unit on `device`
        self.device = device
        self.max_nodes = max_nodes  # drafted nodes a tree may have (set per call: the device reserve's share)
        self.kv: StaticKV | None = None
        self._forwards: dict[int, StaticForward] = {}
        self._pool: Any = None
        self._max_width = 0
        self._cached = 0  # accepted tokens whose entries are live, at positions 0..cached-1

    @property
    def graphed(self) -> bool:
        """Whether any width's passes replayed a CUDA graph."""
        return any(forward.graphed for forward in self._forwards.values())

    def capture_s(self) -> float:
        """Seconds spent so far recording graphs (beyond what replays would have cost)."""
        return sum(forward.capture_s for forward in self._forwards.values())

    @property
    def failure(self) -> str | None:
        return next((forward.failure for forward in self._forwards.values() if forward.failure), None)

    def widths(self) -> list[int]:
        """The widths a tree is padded to: powers of two from SMALLEST_WIDTH, the last one the node cap."""
        widths, width = [], SMALLEST_WIDTH
        while width < self._max_width:
            widths.append(width)
            width *= 2
        return widths + [self._max_width]

    def start(self, input_ids: torch.Tensor, max_tokens: int) -> torch.Tensor:
        """Feed the prompt (1, n) into buffers for a sequence of up to `max_tokens` and trees of up to `max_nodes`
        drafted nodes; its last position's logits (1, vocab)."""
        width = max(self.max_nodes + 1, SMALLEST_WIDTH)  # the root and its drafted nodes
        tokens = -(-max_tokens // ROUND_TOKENS) * ROUND_TOKENS + width  # pads write past the tree
        if self.kv is None or self.kv.max_tokens < tokens or self._max_width != width:
            self.kv, self._forwards, self._max_width = StaticKV(tokens), {}, width
            self._pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        with torch.no_grad():
            logits = feed_prompt_static(self.model, self.kv, input_ids)
        self._cached = input_ids.shape[1]
        return logits

    def verify(self, tree: DraftTree, choose: Choose, meanwhile: Meanwhile | None = None) -> tuple[list[int], int]:
        """One forward over the tree, padded to a width; the accepted path and the bonus token. The path's
        entries are moved right after the prefix. `meanwhile` is never called: this pass replays a graph, and a
        draft's graph replayed beside it would share the cuBLAS workspace of the stream both were recorded on."""
        count, prefix = len(tree), self._cached
        width = next(width for width in self.widths() if width >= count)
        forward = self._forwards.get(width)
        if forward is None:
            forward = self._forwards[width] = StaticForward(self.model, self.kv, width, self.device, self._pool,
                                                            allowed_columns=width)
        nodes = list(range(count))
        logits = forward.run(tree.tokens, [prefix + depth for depth in tree.depths],
                             [prefix + node for node in nodes], prefix, tree.ancestry(nodes, nodes))
        path, bonus = walk(tree, choose(logits[:count]).tolist())  # the host needs the picks: the pass's sync
        self.kv.move([prefix + node for node in path], prefix)  # type: ignore[union-attr]
        self._cached = prefix + len(path)
        return path, bonus
