"""Drafts: what proposes a tree of tokens for the streamed model to verify in one weight pass.

- `NgramDraft` (prompt lookup): continuations of earlier occurrences of the sequence's last n-gram; free.
- `ModelDraft`: a small model with the same tokenizer, resident on the compute device, growing a tree best-first:
  each step adds up to `width` of the most promising candidates anywhere in the tree (scored by the measured chance
  that the model accepts their paths) and feeds them through the draft at once (one forward, with a tree attention
  mask) to score their children. `TreePolicy` decides how many and when to stop, from the measured costs; a step
  runs over the narrowest of a few fixed widths (`step_widths`) that holds its candidates, each width's cost
  measured, so a GPU (where a wider step costs little more) takes wide steps and a CPU narrow ones.
  With `ahead`, it keeps growing its own copy of the tree while the model verifies it (a streamed verify pass
  leaves the device's compute idle, waiting on the link; the verifier calls `grow_while` between launching the
  pass and reading its picks back, and a pass whose experts stream at each MoE layer's routing read-back, where
  the host waits for that layer's copies); when the pass's bonus token is a node of that grown tree, the next
  tree starts from its subtree, already drafted.

Both implement `propose(history, max_depth) -> DraftTree` and `accepted(tree, path, bonus)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from ...config import TFLOAT32
from ...policies.speculation import DEFAULT_MAX_NODES, TreePolicy, narrowest
from .sampling import Warp
from .static_forward import StaticForward, StaticKV
from .tree import DraftTree

log = logging.getLogger(__name__)

DEFAULT_WIDTH = 8  # a model draft's widest step (speculation.width)
NGRAM_BRANCHES = 8  # continuations an n-gram draft proposes
NARROWEST_STEP = 8  # a draft step's widths: powers of two from this up to `width`
DEFAULT_NGRAM = 3
NGRAM_DEPTH = 64  # tokens of a continuation drafted: past that an earlier occurrence rarely still holds


class NgramDraft:
    """Prompt lookup: the tokens that followed earlier occurrences of the last n tokens (longest n first),
    merged into a tree, most recent occurrence first."""

    name = "ngram"

    def __init__(self, max_ngram: int = DEFAULT_NGRAM, max_branches: int = NGRAM_BRANCHES) -> None:
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
        at most `max_nodes` nodes: those of the longest n-gram (n >= 2) ending the history that occurred before;
        while branches are free, those of an earlier n-gram that the history's last token, or last two, replaced
        (an edit: a rewrite that fixes a word, a rename, goes on as the text it rewrites); and where no n-gram
        of 2 or more occurred, those of the last token alone. Replayed over SmolLM2's greedy answers to the
        speculation benchmarks' prompts, the edits took the three rewrite prompts from 2.6 / 7.8 / 12.4 tokens a
        pass to 3.4 / 12.4 / 20.7 (6.2 / 6.2 / 20.7 to 6.9 / 6.8 / 31.0 in nf4); no prompt's fell."""
        tree = DraftTree.rooted_at(history[-1])
        if max_depth < 1:
            return tree
        self._index(history)
        depth = min(max_depth, NGRAM_DEPTH)
        exact = self._continuations(history, 0, 2)
        branches = self._add(tree, history, exact, depth, self.max_branches)
        for skip in (1, 2):
            if branches < self.max_branches:
                branches += self._add(tree, history, self._continuations(history, skip, 2), depth,
                                      self.max_branches - branches)
        if not exact and branches < self.max_branches:
            self._add(tree, history, self._continuations(history, 0, 1), depth, self.max_branches - branches)
        return tree

    def _continuations(self, history: list[int], skip: int, shortest: int) -> list[int]:
        """Where continuations start in `history`, most recent first: after each earlier occurrence of the longest
        n-gram (`shortest` <= n <= max_ngram) that ends `skip` tokens before the history's end, `skip` tokens
        further on (the history's last `skip` tokens replaced as many of that occurrence's, the first of them
        different: else it is the occurrence skip 0 finds)."""
        last = len(history) - 1
        for n in range(min(self.max_ngram, len(history) - skip - 1), shortest - 1, -1):
            ends = self._ends.get(tuple(history[len(history) - skip - n:len(history) - skip]), [])
            starts = [end + skip for end in ends
                      if end + skip <= last and (skip == 0 or history[end] != history[last - skip + 1])]
            if starts:
                return starts[::-1]
        return []

    def _add(self, tree: DraftTree, history: list[int], starts: list[int], depth: int, most: int) -> int:
        """The continuations at `starts` (at most `most` of them, `depth` tokens each) into `tree`, within
        `max_nodes`; how many were added."""
        for branch, start in enumerate(starts[:most]):
            node = 0
            for token in history[start:start + depth]:
                if len(tree) > self.max_nodes:
                    return branch
                node = tree.add(node, token, 1.0)
        return min(len(starts), most)

    def accepted(self, tree: DraftTree, path: list[int], bonus: int) -> None:
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

    ahead_min_steps = 0  # steps grown ahead even once the verify pass is done (tests: an amount not left to timing)

    def __init__(self, model: Any, name: str, warp: Warp, vocab_size: int, width: int = DEFAULT_WIDTH,
                 policy: TreePolicy | None = None, ahead: bool = False) -> None:
        self.model = model  # the draft's TierstoreModel
        self.name = name
        self.warp = warp
        self.vocab_size = vocab_size  # the target's: a draft padded to more ids never proposes those
        self.width = width
        self.widths = step_widths(width)
        self.policy = policy or TreePolicy()
        self.policy.widths = self.widths
        self.ahead = ahead  # grow the tree while the model verifies it (`grow_while`)
        self.tf32 = model.config.speculation.draft_dtype == TFLOAT32  # its products on TF32 tensor cores
        self.steps = 0
        self.step_s = 0.0
        self.ahead_steps = 0  # steps drafted while the model verified
        self.carried_trees = 0  # proposals that started from a subtree grown while the model verified
        self._kv = StaticKV(0)  # sized by `reset` for each sequence
        self._cached = 0  # accepted tokens whose entries are live, at positions 0..cached-1
        self._fed: list[int] = []  # tree nodes fed in the last proposal, at positions cached, cached + 1, ...
        self._stop_ids: frozenset[int] = frozenset()  # tokens that end the sequence: their children are never drafted
        self._forwards: dict[int, StaticForward] = {}  # by width, over the sequence's buffers (`reset`)
        self._pool: Any = None  # the CUDA graph memory pool the widths' graphs share
        self._stream: Any = None  # the device stream steps grown ahead run on
        self._grown: _Proposal | None = None  # the last proposal, as drafted (and grown ahead)
        self._carried: _Proposal | None = None  # a subtree of it to start the next proposal from

    @property
    def graphed(self) -> bool:
        """Whether the steps replay CUDA graphs (every width that ran)."""
        return bool(self._forwards) and all(forward.graphed for forward in self._forwards.values())

    @property
    def compiled(self) -> bool | None:
        """Whether the steps ran the draft compiled (None: not asked for, `speculation.compile`)."""
        if self.model.compiled is None or not self._forwards:
            return None
        return all(forward.compiled is not None and forward.compiled_runs > 0 for forward in self._forwards.values())

    @property
    def compile_failure(self) -> str | None:
        """Why the steps stopped running compiled, if they did."""
        return next((forward.compile_failure for forward in self._forwards.values() if forward.compile_failure),
                    None)

    def reset(self, max_tokens: int, stop_ids: frozenset[int] = frozenset()) -> None:
        """A new sequence of at most `max_tokens` tokens, ending at any of `stop_ids` (nothing is drafted after
        one): fresh buffers (room for the largest tree too), new graph."""
        self._stop_ids = stop_ids
        trees = 2 if self.ahead else 1  # a tree and what grows ahead of it
        entries = max_tokens + trees * self.policy.max_nodes + 2 * self.width  # any count: compiled once for all
        self._kv = StaticKV(entries)
        self._forwards = {}
        if self.model.device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        self._cached, self._fed, self._grown, self._carried = 0, [], None, None
        if self.ahead and self.model.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.model.device)

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        """Catch up on the accepted tokens (or start from the subtree grown ahead that the last pass's bonus token
        roots), then grow the tree best-first while the tree policy says it pays: each step adds up to `width` of
        the best candidates (children of fed nodes, at most `max_depth` deep) and feeds them to find theirs."""
        carried, self._carried, self._grown = self._usable_carry(history, max_depth), None, None
        if max_depth < 1:
            return DraftTree.rooted_at(history[-1])
        start_s = time.perf_counter()
        if carried is not None:
            tree, candidates, level = carried.tree, carried.candidates, []
            self.carried_trees += 1
        else:
            tree, candidates, level = DraftTree.rooted_at(history[-1]), [], [0]
            top = self._catch_up(history)
        scores, steps, drafted_s = sum(tree.scores[1:]), 0, 0.0
        while True:
            if level:
                self._push(candidates, tree, level, top, max_depth)  # waits for the forward: the step ends here
                step_s = time.perf_counter() - start_s
                self.steps, self.step_s = self.steps + 1, self.step_s + step_s
                steps, drafted_s = steps + 1, drafted_s + step_s
                if steps > 1 or carried is not None:  # a first step that caught up on the accepted tokens is longer
                    self.policy.observe_step(step_s, len(level))
            best, feed = self._choose(candidates, len(tree) - 1, scores, steps, drafted_s)
            if not best:
                break
            level = [tree.add(parent, token, -score, prob, rank) for score, parent, token, prob, rank in best]
            scores -= sum(score for score, *_ in best)
            if not feed:
                break
            start_s = time.perf_counter()
            top = self._feed(tree, level, len(history) - 1)
        self._grown = _Proposal(tree, candidates, max_depth, len(history) - 1)
        return tree

    def grow_while(self, busy: Callable[[], bool]) -> None:
        """Called by the verifier once the model's verify pass of the last proposal is launched, and in a pass
        whose experts stream at each MoE layer's routing read-back (where the host waits for the layer's copies):
        while `busy()` (the pass still running on the device) and for at least `ahead_min_steps` steps a call,
        grow a copy of the proposal's tree best first (one copy a pass, grown on by each call), one step at a time,
        on the draft's own stream, within the KV cache's room. The same thread that runs the pass, so nothing
        contends for the interpreter; a streamed pass leaves the device's compute idle, waiting on the link.
        Nothing unless `ahead` and the steps replay a graph (or run on a CPU)."""
        grown = self._grown
        if not self.ahead or grown is None or not self._forwards or (self._stream is not None and not self.graphed):
            return
        if not grown.copied:  # the verifier reads (and may prune) the tree it was given
            grown.tree, grown.copied = grown.tree.copy(), True
        with torch.no_grad(), torch.cuda.stream(self._stream) if self._stream is not None else \
                contextlib.nullcontext():  # not ordered after the pass: the draft's last step was read back
            self._grow(grown, busy)
        if self._stream is not None:  # what the draft does next (its cache moved) comes after these steps
            torch.cuda.current_stream(self.model.device).wait_stream(self._stream)

    def accepted(self, tree: DraftTree, path: list[int], bonus: int) -> None:
        """Keep the entries of the accepted nodes that were fed, right after the accepted prefix. When the tree
        grown ahead holds the bonus token after the path, fed, keep its entry too and those of the fed nodes below
        it: the next proposal starts from that subtree."""
        where = {node: self._cached + index for index, node in enumerate(self._fed)}
        kept = [where[node] for node in path[1:] if node in where]
        grown = self._grown
        root = grown.tree.children[path[-1]].get(bonus) if grown is not None else None
        if root is None or root not in where or len(kept) < len(path) - 1:
            self._kv.move(kept, self._cached)
            self._cached += len(kept)
            self._fed = []
            return
        below = _capped(grown.tree, grown.tree.subtree(root), set(self._fed), self.policy.node_cap())
        members = set(below)
        fed_below = [node for node in self._fed if node in members and node != root]
        self._kv.move(kept + [where[root]] + [where[node] for node in fed_below], self._cached)
        self._cached += len(kept) + 1
        self._carried, index = _rerooted(grown, root, below, set(fed_below))
        self._fed = [index[node] for node in fed_below]

    def _usable_carry(self, history: list[int], max_depth: int) -> "_Proposal | None":
        """The subtree carried from the last pass, if it roots this history and fits `max_depth`; else forget it
        (its root's entry too: the catch-up feeds it again)."""
        carried = self._carried
        if carried is None:
            return None
        if (carried.tree.tokens[0] == history[-1] and self._cached == len(history)
                and max(carried.tree.depths) <= max_depth):
            carried.candidates = [entry for entry in carried.candidates if carried.tree.depths[entry[1]] < max_depth]
            heapq.heapify(carried.candidates)
            return carried
        self._cached, self._fed = self._cached - 1, []
        return None

    def _catch_up(self, history: list[int]) -> torch.Tensor:
        """Feed the accepted tokens the cache lacks, `width` a forward; the root's likeliest children (`_top`)."""
        pending = list(range(self._cached, len(history)))
        for begin in range(0, len(pending), self.width):
            chunk = pending[begin:begin + self.width]
            top = self._step([history[i] for i in chunk], chunk, chunk, None)
        self._cached = len(history)
        return top[len(chunk) - 1:len(chunk)]

    def _feed(self, tree: DraftTree, level: list[int], root_position: int) -> torch.Tensor:
        """One step over tree nodes `level`, their entries after the fed ones; their likeliest children (`_top`)."""
        writes = [self._cached + len(self._fed) + i for i in range(len(level))]
        positions = [root_position + tree.depths[node] for node in level]
        top = self._step([tree.tokens[node] for node in level], positions, writes,
                         tree.ancestry(level, self._fed + level))
        self._fed += level
        return top

    def _grow(self, grown: "_Proposal", busy: Callable[[], bool]) -> None:
        """Steps that each feed the `width` best of the tree's unfed nodes and candidates (added to the tree), while
        `busy()` or fewer than `ahead_min_steps` ran, until the KV cache's room runs out."""
        if self.ahead_min_steps == 0 and not busy():  # the device has caught up: no step, and no heap to build
            return
        tree, candidates = grown.tree, grown.candidates
        fed = set(self._fed)
        unfed = [(-tree.scores[node], node) for node in range(1, len(tree)) if node not in fed
                 and tree.depths[node] < grown.max_depth and tree.tokens[node] not in self._stop_ids]
        heapq.heapify(unfed)
        steps = 0
        while busy() or steps < self.ahead_min_steps:
            room = self._kv.max_tokens - self._cached - len(self._fed) - 2 * self.width  # pads write past the last
            level: list[int] = []
            while len(level) < min(self.width, room) and (unfed or candidates):
                if unfed and (not candidates or unfed[0][0] <= candidates[0][0]):
                    level.append(heapq.heappop(unfed)[1])
                else:
                    score, parent, token, prob, rank = heapq.heappop(candidates)
                    level.append(tree.add(parent, token, -score, prob, rank))
            if not level:
                break
            self._push(candidates, tree, level, self._feed(tree, level, grown.root_position), grown.max_depth)
            steps += 1
        self.ahead_steps += steps

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
              top: torch.Tensor, max_depth: int) -> None:
        """The `width` most likely children of each fed node (`top`: their probabilities, then their tokens, a row
        per fed node), as candidates scored by the chance that the model accepts their paths (the policy's
        measured acceptance of tokens the draft gave their probability)."""
        children = top.shape[-1] // 2
        for parent, row in zip(fed, top[:len(fed)].tolist()):  # the host needs the tokens: this is the step's sync
            if tree.depths[parent] < max_depth and tree.tokens[parent] not in self._stop_ids:
                for rank, (p, token) in enumerate(zip(row[:children], row[children:])):
                    if p > 0.0:
                        score = tree.scores[parent] * self.policy.acceptance(p, rank)
                        heapq.heappush(candidates, (-score, parent, int(token), p, rank))

    def _step(self, tokens: list[int], positions: list[int], writes: list[int],
              allowed: torch.Tensor | None) -> torch.Tensor:
        """One forward of `width` slots: `tokens` at `positions`, their entries written at `writes`; a causal
        chain after the live prefix (allowed None) or tree nodes (`allowed`: which of the fed nodes and these
        each may see). Returns each slot's `width` likeliest next tokens (`_top`), still on the device."""
        count = len(tokens)
        if allowed is None:  # the chain: all live entries before it, and itself causally
            seen_from, allowed = positions[0], torch.ones(count, count, dtype=torch.bool).tril()
        else:
            seen_from = self._cached
        width = narrowest(self.widths, count)
        forward = self._forwards.get(width)
        if forward is None:
            forward = self._forwards[width] = StaticForward(self.model.model, self._kv, width, self.model.device,
                                                            self._pool, compiled=self.model.compiled, head=self._top)
        with tf32_products(self.tf32):
            return forward.run(tokens, positions, writes, seen_from, allowed)

    def _top(self, logits: torch.Tensor) -> torch.Tensor:
        """(slots, 2 * width) float64 from logits (slots, vocab): each slot's `width` likeliest next tokens'
        probabilities (the sampling settings' warp), then the tokens themselves; computed inside the step's
        forward (its CUDA graph), so that a step reads back this and nothing else."""
        probs = self.warp(logits[:, :self.vocab_size].float())
        top_p, top_i = probs.topk(min(self.width, probs.shape[-1]), dim=-1)
        return torch.cat([top_p.double(), top_i.double()], dim=-1)


@contextlib.contextmanager
def tf32_products(on: bool):
    """While `on`: CUDA float32 matrix products (cuBLAS, torch.compile's calls of it) run on TF32 tensor cores,
    inputs rounded to 10 mantissa bits and sums in float32; the setting as it was afterwards. A CUDA graph keeps
    the kernels it recorded, so its replays stay TF32 too."""
    if not on:
        yield
        return
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"  # torch >= 2.9, else before
    saved = getattr(matmul, name)
    setattr(matmul, name, "tf32" if name == "fp32_precision" else True)
    try:
        yield
    finally:
        setattr(matmul, name, saved)


def step_widths(width: int) -> tuple[int, ...]:
    """A draft step's widths up to `width`: powers of two from NARROWEST_STEP, the last `width` itself."""
    widths, step = [], NARROWEST_STEP
    while step < width:
        widths.append(step)
        step *= 2
    return (*widths, width)


@dataclasses.dataclass
class _Proposal:
    """A proposal as the draft grew it: its tree, the candidates not in it (heap of (-score, parent, token,
    probability, rank)), its depth limit, the root's position, and whether `tree` is already the copy grown ahead
    (the verifier keeps the one it was given)."""

    tree: DraftTree
    candidates: list[tuple[float, int, int, float, int]]
    max_depth: int
    root_position: int
    copied: bool = False


def _capped(tree: DraftTree, below: list[int], fed: set[int], cap: int) -> list[int]:
    """Subtree `below` (its root first, parents before children) with at most `cap` fed nodes under its root, the
    best scored, and the unfed ones whose parents stay: what grows ahead during a pass can outgrow the most a verify
    pass holds. A node's score never exceeds its parent's, so best first is parents first."""
    under = [node for node in below[1:] if node in fed]
    if len(under) <= cap:
        return below
    kept = {below[0]}
    for node in sorted(under, key=lambda node: (-tree.scores[node], tree.depths[node], node)):
        if len(kept) > cap:
            break
        if tree.parents[node] in kept:
            kept.add(node)
    return [node for node in below if node in kept or (node not in fed and tree.parents[node] in kept)]


def _rerooted(grown: _Proposal, root: int, below: list[int], fed: set[int]) -> tuple[_Proposal, dict[int, int]]:
    """The subtree of `grown` under `root` (`below`: root first, parents before children) as a proposal rooted at
    root's token: its fed nodes, scores relative to the root's; its unfed nodes and the candidates under it become
    the candidates. With it, each kept node's index in it."""
    old, scale = grown.tree, grown.tree.scores[root]
    tree, index = DraftTree.rooted_at(old.tokens[root]), {root: 0}
    candidates = [(score / scale, index_parent, token, prob, rank) for score, index_parent, token, prob, rank
                  in grown.candidates if index_parent in fed or index_parent == root]
    for node in below[1:]:
        if node in fed:
            index[node] = tree.add(index[old.parents[node]], old.tokens[node], old.scores[node] / scale,
                                   old.probs[node], old.ranks[node])
        else:  # unfed: a leaf, whose children nobody knows yet
            candidates.append((-old.scores[node] / scale, old.parents[node], old.tokens[node], old.probs[node],
                               old.ranks[node]))
    candidates = [(score, index[parent], token, prob, rank) for score, parent, token, prob, rank in candidates]
    heapq.heapify(candidates)
    return _Proposal(tree, candidates, grown.max_depth - old.depths[root],
                     grown.root_position + old.depths[root]), index
