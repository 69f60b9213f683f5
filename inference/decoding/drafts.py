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
from transformers import DynamicCache

from ...policies.speculation import DEFAULT_MAX_NODES, TreePolicy
from .sampling import Warp
from .tree import DraftTree

log = logging.getLogger(__name__)

DEFAULT_WIDTH = 8
DEFAULT_NGRAM = 3
NGRAM_DEPTH = 64  # tokens of a continuation drafted: past that an earlier occurrence rarely still holds


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


class StaticKV(DynamicCache):
    """Key/value buffers at fixed addresses (for the draft, and for graphed.py's decode steps), so one forward can
    be captured in a CUDA graph and replayed: every forward writes its new entries at the positions in `write_at`
    and attends over the whole buffer, the mask saying which positions hold live tokens. transformers' layers call
    `update`."""

    def __init__(self, max_tokens: int) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.write_at: torch.Tensor | None = None  # (width,) positions of this forward's new entries
        self.length = 0  # live positions, for transformers' own bookkeeping

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):  # (batch, heads, positions, head_dim), allocated on first use
            shape = (*key_states.shape[:2], self.max_tokens, key_states.shape[-1])
            self.keys.append(torch.zeros(shape, dtype=key_states.dtype, device=key_states.device))
            self.values.append(torch.zeros(shape, dtype=value_states.dtype, device=value_states.device))
        self.keys[layer_idx].index_copy_(2, self.write_at, key_states)
        self.values[layer_idx].index_copy_(2, self.write_at, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def move(self, sources: list[int], to: int) -> None:
        """Copy the entries at `sources` to positions `to`, `to + 1`, ... (the accepted nodes, made contiguous)."""
        if not sources or not self.keys:
            return
        index = torch.tensor(sources, device=self.keys[0].device)
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[:, :, to:to + len(sources)] = buffer.index_select(2, index)


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
        self._graph: torch.cuda.CUDAGraph | None = None
        self._capture_tried = False
        self._static: dict[str, Any] | None = None

    @property
    def graphed(self) -> bool:
        """Whether the steps replay a CUDA graph."""
        return self._graph is not None

    def reset(self, max_tokens: int, stop_ids: frozenset[int] = frozenset()) -> None:
        """A new sequence of at most `max_tokens` tokens, ending at any of `stop_ids` (nothing is drafted after
        one): fresh buffers (room for the largest tree too), new graph."""
        self._stop_ids = stop_ids
        self._kv = StaticKV(max_tokens + self.policy.max_nodes + 2 * self.width)
        self._cached, self._fed, self._graph, self._static = 0, [], None, None
        self._capture_tried = False

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
        each may see). Unused slots write to the buffer's spare end and see only position 0. Returns the
        probabilities of each slot's next token."""
        kv = self._kv
        count, width = len(tokens), self.width
        spare = kv.max_tokens - width  # the last `width` positions are never live
        visible = torch.zeros(width, kv.max_tokens, dtype=torch.bool)
        visible[:, 0] = True
        if allowed is None:  # the chain: all live entries before it, and itself causally
            visible[:count, :positions[0]] = True
            visible[:count, positions[0]:positions[0] + count] = torch.ones(count, count, dtype=torch.bool).tril()
        else:
            visible[:count, :self._cached] = True
            visible[:count, self._cached:self._cached + allowed.shape[1]] = allowed
        inputs = self._inputs()
        inputs["ids"].copy_(torch.tensor(tokens + [0] * (width - count)))
        inputs["positions"].copy_(torch.tensor(positions + [0] * (width - count)))
        inputs["writes"].copy_(torch.tensor(writes + list(range(spare + count, spare + width))))
        bias = torch.zeros(visible.shape, dtype=inputs["bias"].dtype)
        inputs["bias"][0, 0].copy_(bias.masked_fill_(~visible, torch.finfo(bias.dtype).min))
        kv.length = max(writes[:count]) + 1
        if self._graph is not None:
            self._graph.replay()
        else:
            self._forward()
        if not self._capture_tried and self.model.device.type == "cuda":
            self._capture()
        return self.warp(inputs["logits"][0, :, :self.vocab_size].float())

    def _inputs(self) -> dict[str, torch.Tensor]:
        """The forward's fixed input and output tensors (made on first use for each buffer)."""
        if self._static is None:
            device, dtype = self.model.device, self.model.model.dtype
            self._static = {"ids": torch.zeros(1, self.width, dtype=torch.long, device=device),
                            "positions": torch.zeros(1, self.width, dtype=torch.long, device=device),
                            "writes": torch.zeros(self.width, dtype=torch.long, device=device),
                            "bias": torch.zeros(1, 1, self.width, self._kv.max_tokens, dtype=dtype, device=device)}
            self._kv.write_at = self._static["writes"]
        return self._static

    def _forward(self) -> None:
        inputs = self._static
        with torch.no_grad():
            out = self.model.model(input_ids=inputs["ids"], position_ids=inputs["positions"],
                                   cache_position=inputs["writes"], attention_mask=inputs["bias"],
                                   past_key_values=self._kv, use_cache=True)
        inputs["logits"] = out.logits

    def _capture(self) -> None:
        """Record the forward as a CUDA graph (once a sequence, right after an eager forward warmed it up); its
        inputs are refilled in place before each replay. A failure leaves the draft running eagerly (slower,
        same tokens)."""
        self._capture_tried = True
        try:
            torch.cuda.synchronize(self.model.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._forward()
        except Exception as exc:  # noqa: BLE001 - any capture failure means: stay eager
            log.warning("draft %s: CUDA graph capture failed (%s); drafting without it", self.name, exc)
            self._forward()  # the logits again, from an eager forward
            return
        graph.replay()  # capture records without running: this step's logits come from the first replay
        self._graph = graph
