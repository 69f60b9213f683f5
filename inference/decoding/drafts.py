"""Drafts: what proposes a tree of tokens for the streamed model to verify in one weight pass.

- `NgramDraft` (prompt lookup): continuations of earlier occurrences of the sequence's last n-gram; free.
- `ModelDraft`: a small model with the same tokenizer, resident on the compute device, growing a tree best-first:
  each step adds up to `width` of the most promising candidates anywhere in the tree (scored by the measured chance
  that the model accepts their paths) and feeds them through the draft at once (one forward, with a tree attention
  mask) to score their children. `TreePolicy` decides how many and when to stop, from the measured costs.

Both implement `propose(history, max_depth) -> DraftTree` and `accepted(tree, path)`.
"""
from __future__ import annotations

import heapq
import logging
import time
from typing import Any

import torch

from ...policies.speculation import DEFAULT_MAX_NODES, TreePolicy
from .sampling import Warp
from .static_forward import StaticForward, StaticKV
from .tree import DraftTree

log = logging.getLogger(__name__)

DEFAULT_WIDTH = 8
DEFAULT_NGRAM = 3
NGRAM_DEPTH = 64  # tokens of a continuation drafted: past that an earlier occurrence rarely still holds
KV_STEP_TOKENS = 256  # a compiled draft's cache is sized in these steps: calls of similar lengths share its
# shapes (it compiles again for a new shape)


class NgramDraft:
    """Prompt lookup: the tokens that followed earlier occurrences of the last n tokens (longest n first),
    merged into a tree, most recent occurrence first."""

    name = "ngram"

    def __init__(self, max_ngram: int = DEFAULT_NGRAM, max_branches: int = DEFAULT_WIDTH) -> None:
        self.max_ngram = max_ngram
        self.max_branches = max_branches
        self.max_nodes = DEFAULT_MAX_NODES  # set per call from the device reserve
        self.policy = None
        self.steps = 0
        self.step_s = 0.0
        self._ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> end indices of its occurrences
        self._indexed = 0

    def reset(self, max_tokens: int, stop_ids: frozenset[int] = frozenset()) -> None:
        """Forget the last sequence (a new generate call)."""
        self._ends, self._indexed = {}, 0

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        """A tree of at most `max_branches` continuations, each at most `max_depth` (and NGRAM_DEPTH) long, and
        at most `max_nodes` nodes."""
        tree = DraftTree.rooted_at(history[-1])
        if max_depth < 1:
            return tree
        self._index(history)
        for n in range(min(self.max_ngram, len(history) - 1), 0, -1):
            ends = self._ends.get(tuple(history[-n:]), [])
            branches = 0
            for end in reversed(ends):
                if end == len(history):  # the suffix itself
                    continue
                node = 0
                for token in history[end:end + min(max_depth, NGRAM_DEPTH)]:
                    if len(tree) > self.max_nodes:
                        break
                    node = tree.add(node, token, 1.0)
                branches += 1
                if branches == self.max_branches:
                    break
            if branches:
                break
        return tree

    def accepted(self, tree: DraftTree, path: list[int]) -> None:
        """Nothing to keep: the draft holds no state but its index."""

    def _index(self, history: list[int]) -> None:
        """Index the n-grams ending at each new position (the history only grows within a generate call)."""
        for end in range(max(self._indexed, 1), len(history) + 1):
            for n in range(1, min(self.max_ngram, end) + 1):
                self._ends.setdefault(tuple(history[end - n:end]), []).append(end)
        self._indexed = len(history) + 1


class ModelDraft:
    """A resident small model drafting a tree. Each draft step is one forward of exactly `width` tokens (tree
    nodes or a piece of the accepted chain, padded) over fixed buffers, so on a GPU it is captured once per
    generate call as a CUDA graph and replayed: a step costs kernels, not Python."""

    def __init__(self, model: Any, name: str, warp: Warp, vocab_size: int, width: int = DEFAULT_WIDTH,
                 policy: TreePolicy | None = None) -> None:
        self.model = model  # the draft's TierstoreModel
        self.name = name
        self.warp = warp
        self.vocab_size = vocab_size  # the target's: a draft padded to more ids never proposes those
        self.width = width
        self.policy = policy or TreePolicy()
        self.steps = 0
        self.step_s = 0.0
        self._kv = StaticKV(0)  # sized by `reset` for each sequence
        self._cached = 0  # accepted tokens whose entries are live, at positions 0..cached-1
        self._fed: list[int] = []  # tree nodes fed in the last proposal, at positions cached, cached + 1, ...
        self._stop_ids: frozenset[int] = frozenset()  # tokens that end the sequence: their children are never drafted
        self._forward: StaticForward | None = None  # made by `reset` over the sequence's buffers

    @property
    def graphed(self) -> bool:
        """Whether the steps replay a CUDA graph."""
        return self._forward is not None and self._forward.graphed

    @property
    def compiled(self) -> bool | None:
        """Whether the steps ran the draft compiled (None: not asked for, `speculation.compile`)."""
        if self.model.compiled is None or self._forward is None:
            return None
        return self._forward.compiled is not None and self._forward.compiled_runs > 0

    @property
    def compile_failure(self) -> str | None:
        """Why the steps stopped running compiled, if they did."""
        return self._forward.compile_failure if self._forward is not None else None

    def reset(self, max_tokens: int, stop_ids: frozenset[int] = frozenset()) -> None:
        """A new sequence of at most `max_tokens` tokens, ending at any of `stop_ids` (nothing is drafted after
        one): fresh buffers (room for the largest tree too), new graph."""
        self._stop_ids = stop_ids
        entries = max_tokens + self.policy.max_nodes + 2 * self.width
        if self.model.compiled is not None:
            entries = -(-entries // KV_STEP_TOKENS) * KV_STEP_TOKENS
        self._kv = StaticKV(entries)
        self._forward = StaticForward(self.model.model, self._kv, self.width, self.model.device,
                                      compiled=self.model.compiled)
        self._cached, self._fed = 0, []

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        """Catch up on the accepted tokens, then grow the tree best-first while the tree policy says it pays: each
        step adds up to `width` of the best candidates (children of fed nodes, at most `max_depth` deep) and feeds
        them to find theirs."""
        tree = DraftTree.rooted_at(history[-1])
        self._fed = []
        if max_depth < 1:
            return tree
        start_s = time.perf_counter()
        pending = list(range(self._cached, len(history)))
        for begin in range(0, len(pending), self.width):  # the chain, `width` tokens a forward
            chunk = pending[begin:begin + self.width]
            probs = self._step([history[i] for i in chunk], chunk, chunk, None)
        probs = probs[len(chunk) - 1:len(chunk)]  # the root's children
        self._cached = len(history)
        candidates: list[tuple[float, int, int, float, int]] = []  # heap of (-score, parent, token, probability, rank)
        level, scores, steps, drafted_s = [0], 0.0, 0, 0.0
        while True:
            self._push(candidates, tree, level, probs, max_depth)  # waits for the forward: the step ends here
            step_s = time.perf_counter() - start_s
            self.steps, self.step_s = self.steps + 1, self.step_s + step_s
            steps, drafted_s = steps + 1, drafted_s + step_s
            if steps > 1:  # the first step also caught up on the accepted tokens
                self.policy.observe_step(step_s)
            best, feed = self._choose(candidates, len(tree) - 1, scores, steps, drafted_s)
            if not best:
                break
            level = [tree.add(parent, token, -score, prob, rank) for score, parent, token, prob, rank in best]
            scores -= sum(score for score, *_ in best)
            if not feed:
                break
            start_s = time.perf_counter()
            writes = [self._cached + len(self._fed) + i for i in range(len(level))]
            positions = [len(history) - 1 + tree.depths[node] for node in level]
            probs = self._step([tree.tokens[node] for node in level], positions, writes,
                               tree.ancestry(level, self._fed + level))
            self._fed += level
        return tree

    def accepted(self, tree: DraftTree, path: list[int]) -> None:
        """Keep the entries of the accepted nodes that were fed, right after the accepted prefix."""
        where = {node: self._cached + index for index, node in enumerate(self._fed)}
        kept = [where[node] for node in path[1:] if node in where]
        self._kv.move(kept, self._cached)
        self._cached += len(kept)
        self._fed = []

    def _choose(self, candidates: list[tuple[float, int, int, float, int]], nodes: int, scores: float, steps: int,
                drafted_s: float) -> tuple[list[tuple[float, int, int, float, int]], bool]:
        """The candidates that join the tree now (popped from the heap, best first), and whether a draft step
        follows for their children: the policy is asked with a step, then without one."""
        gains = [-candidate[0] for candidate in heapq.nsmallest(self.width, candidates)]
        count = self.policy.take(steps, nodes, scores, gains, drafted_s)
        feed = count > 0
        if not feed:
            count = self.policy.take(steps, nodes, scores, gains, drafted_s, feed=False)
        return [heapq.heappop(candidates) for _ in range(count)], feed

    def _push(self, candidates: list[tuple[float, int, int, float, int]], tree: DraftTree, fed: list[int],
              probs: torch.Tensor, max_depth: int) -> None:
        """The `width` most likely children of each fed node, as candidates scored by the chance that the model
        accepts their paths (the policy's measured acceptance of tokens the draft gave their probability)."""
        top_p, top_i = probs[:len(fed)].topk(min(self.width, probs.shape[-1]), dim=-1)
        top_p, top_i = top_p.tolist(), top_i.tolist()  # the host needs the tokens: this is the step's sync
        for parent, ps, ts in zip(fed, top_p, top_i):
            if tree.depths[parent] < max_depth and tree.tokens[parent] not in self._stop_ids:
                for rank, (p, token) in enumerate(zip(ps, ts)):
                    if p > 0.0:
                        score = tree.scores[parent] * self.policy.acceptance(p, rank)
                        heapq.heappush(candidates, (-score, parent, token, p, rank))

    def _step(self, tokens: list[int], positions: list[int], writes: list[int],
              allowed: torch.Tensor | None) -> torch.Tensor:
        """One forward of `width` slots: `tokens` at `positions`, their entries written at `writes`; a causal
        chain after the live prefix (allowed None) or tree nodes (`allowed`: which of the fed nodes and these
        each may see). Returns the probabilities of each slot's next token."""
        count = len(tokens)
        if allowed is None:  # the chain: all live entries before it, and itself causally
            seen_from, allowed = positions[0], torch.ones(count, count, dtype=torch.bool).tril()
        else:
            seen_from = self._cached
        assert self._forward is not None, "reset() makes the draft's forward"
        logits = self._forward.run(tokens, positions, writes, seen_from, allowed)
        return self.warp(logits[:, :self.vocab_size].float())
