"""A tree of drafted tokens, its attention mask, and KV cache pruning to the accepted path.

Node 0 is the root: the last accepted token, not yet in the verifying model's cache. Every other node is a drafted
token whose parent is the token before it. A model verifies the whole tree in one forward: each node attends to
the cached prefix, its ancestors and itself, at position `prefix + depth`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...errors import InputError, ModelError


@dataclasses.dataclass
class DraftTree:
    """Tokens with parents; `scores[i]` is the expected chance that the path to node i is accepted, `probs[i]` the
    draft's probability of node i's token after its parent's, and `ranks[i]` that token's rank among the draft's
    choices there (0: its best)."""

    tokens: list[int]
    parents: list[int] = dataclasses.field(default_factory=lambda: [-1])
    depths: list[int] = dataclasses.field(default_factory=lambda: [0])
    scores: list[float] = dataclasses.field(default_factory=lambda: [1.0])
    probs: list[float] = dataclasses.field(default_factory=lambda: [1.0])
    ranks: list[int] = dataclasses.field(default_factory=lambda: [0])
    children: list[dict[int, int]] = dataclasses.field(default_factory=lambda: [{}])  # token -> child node

    @classmethod
    def rooted_at(cls, token: int) -> "DraftTree":
        return cls(tokens=[token])

    def __len__(self) -> int:
        return len(self.tokens)

    def copy(self) -> "DraftTree":
        """A tree that grows apart from this one (its nodes keep their indices)."""
        return DraftTree(self.tokens[:], self.parents[:], self.depths[:], self.scores[:], self.probs[:], self.ranks[:],
                         [dict(children) for children in self.children])

    def subtree(self, node: int) -> list[int]:
        """`node` and its descendants, each after its parent."""
        order = [node]
        for member in order:
            order.extend(self.children[member].values())
        return order

    def add(self, parent: int, token: int, score: float, prob: float = 1.0, rank: int = 0) -> int:
        """Add a child of `parent` (or return the one with that token); its node index."""
        existing = self.children[parent].get(token)
        if existing is not None:
            return existing
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.scores.append(score)
        self.probs.append(prob)
        self.ranks.append(rank)
        self.children.append({})
        self.children[parent][token] = node
        return node

    def drop(self, live: list[bool]) -> int:
        """Take the nodes that are not `live` (an expert budget pruned them, with their subtrees) out of their
        parents' children, so that walks and acceptance counts see only the rest; their indices stay. Returns how
        many were dropped."""
        dropped = [node for node in range(1, len(self.tokens)) if not live[node]]
        for node in dropped:
            self.children[self.parents[node]].pop(self.tokens[node], None)
        return len(dropped)

    def path_to(self, node: int) -> list[int]:
        """Nodes from the root to `node`, both included."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def ancestry(self, nodes: list[int], among: list[int]) -> torch.Tensor:
        """(len(nodes), len(among)) bool: `among[j]` is `nodes[i]` or one of its ancestors."""
        where = {node: column for column, node in enumerate(among)}
        rows: list[int] = []
        columns: list[int] = []
        for row, node in enumerate(nodes):  # one index list for the whole matrix: trees reach thousands of nodes
            while node >= 0:
                column = where.get(node)
                if column is not None:
                    rows.append(row)
                    columns.append(column)
                node = self.parents[node]
        allowed = torch.zeros(len(nodes), len(among), dtype=torch.bool)
        allowed[rows, columns] = True
        return allowed


def attention_bias(prefix_len: int, allowed: torch.Tensor, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """(1, 1, queries, prefix + keys) additive mask: 0 where a query may attend, the dtype's minimum elsewhere.
    Every query sees the whole prefix; among the new keys, what `allowed` (queries, keys) says. transformers uses
    a 4D mask as given, for eager and SDPA attention alike."""
    queries = allowed.shape[0]
    full = torch.ones(queries, prefix_len + allowed.shape[1], dtype=torch.bool)
    full[:, prefix_len:] = allowed
    bias = torch.zeros(full.shape, dtype=dtype)
    bias.masked_fill_(~full, torch.finfo(dtype).min)
    return bias.to(device)[None, None]


def keep_positions(cache: object, keep_from: int, positions: list[int]) -> None:
    """Cut the cache to its first `keep_from` positions plus `positions` (each >= keep_from), in that order: each
    layer's keys and values become new tensors of their own. (Views of one new buffer for all layers were tried:
    under verify passes' churn on an H100 the allocator then held more beyond what it had allocated after giving
    its cache back, 10-12 MB on average and up to 25 MB, against 2.5 and 5 MB for tensors of their own;
    benchmarks/kv_cut_pages.py.)"""
    index = None
    for layer in _layers(cache):
        if layer.keys is None or not layer.keys.numel():
            continue
        if index is None:
            index = torch.tensor([*range(keep_from), *positions], dtype=torch.long, device=layer.keys.device)
        layer.keys, layer.values = layer.keys.index_select(-2, index), layer.values.index_select(-2, index)


def check_window(config: Any, total_tokens: int, name: str) -> None:
    """The tree mask is a full causal mask: refuse a sequence longer than a sliding window the model attends
    through (where it is shorter, the window changes nothing)."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if window and (not layer_types or "sliding_attention" in layer_types) and total_tokens > window:
        raise InputError(f"{name}: speculative decoding runs sequences up to the model's sliding window of {window} "
                         f"tokens; this one would have {total_tokens} (use fewer tokens, or no draft)")


def check_mask_support(config: Any, name: str) -> None:
    """The tree is verified with a 4D attention mask, which eager and SDPA attention take and flash kernels do not."""
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    if implementation not in ("sdpa", "eager"):
        raise InputError(f"{name}: speculative decoding verifies a tree of tokens with an attention mask, which "
                         f"{implementation} does not take; use runtime.attention = \"sdpa\" or \"eager\"")


def _layers(cache: object) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ModelError(f"speculative decoding needs transformers' layered cache, got {type(cache).__name__}")
    return layers
