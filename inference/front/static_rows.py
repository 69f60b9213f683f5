"""A batch's KV cache as fixed rows, one sequence each, so that its decode steps replay CUDA graphs.

Each layer's keys and values live in one buffer (rows, kv heads, capacity, head dim) made on first use; a sequence
holds a row from its prompt to its end, its tokens at positions 0, 1, ... of that row. A decode step feeds each of
the first `n` rows its last token at the row's own position (a scatter into the buffer) and attends over the whole
row, a bias from the row's length hiding the rest. Steps are padded to a few row counts (powers of two up to the
rows), each captured once it has run twice and replayed after; padded rows sit in free rows, write at position
0 and see only it (a joining sequence's prompt overwrites that). Rows stay packed: a sequence that leaves is
replaced by the last row's. Prompts are fed eagerly, one sequence at a time, in chunks.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import DynamicCache

from ..decoding.static_forward import causal_bias, feed_prompt_static, record_graph

log = logging.getLogger(__name__)

Layers = list[tuple[torch.Tensor, torch.Tensor]]


class RowsKV(DynamicCache):
    """Per-layer (rows, heads, max_tokens, head_dim) buffers; a forward runs over rows [first, first + count) and
    writes its entries at `write_at`: (count, new tokens), each row's own positions, or (new tokens,), the same
    for every row (a prompt's, fed as `StaticKV`'s are)."""

    def __init__(self, rows: int, max_tokens: int) -> None:
        super().__init__()
        self.rows, self.max_tokens = rows, max_tokens
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.first, self.count = 0, rows
        self.write_at: torch.Tensor | None = None
        self.length = 0  # for transformers' own bookkeeping

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            shape = (self.rows, key_states.shape[1], self.max_tokens, key_states.shape[-1])
            self.keys.append(torch.zeros(shape, dtype=key_states.dtype, device=key_states.device))
            self.values.append(torch.zeros(shape, dtype=value_states.dtype, device=value_states.device))
        rows = slice(self.first, self.first + self.count)
        keys, values = self.keys[layer_idx][rows], self.values[layer_idx][rows]
        write_at = self.write_at if self.write_at.dim() == 2 else self.write_at.expand(self.count, -1)
        index = write_at[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[-1])
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class _Step:
    """The decode step of `count` rows: fixed inputs, the logits, and its graph once captured."""

    def __init__(self, count: int, device: torch.device) -> None:
        self.count = count
        self.ids = torch.zeros(count, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(count, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.runs = 0


class StaticRows:
    """Decode steps of up to `rows` sequences of up to `capacity` tokens each over `RowsKV`, replayed from CUDA
    graphs on a GPU (`model`: a TierstoreModel whose units all stay on its device). `before_replay`: work a replay
    cannot do (routed experts read in place keep their bookkeeping)."""

    def __init__(self, model: Any, rows: int, capacity: int, graphs: bool = True) -> None:
        """`graphs`: record and replay the steps on a GPU (`runtime.cuda_graphs`); False keeps them eager."""
        self.model = model.model
        self.device = model.device
        self.rows, self.capacity = rows, capacity
        self.kv = RowsKV(rows, capacity)
        self.lengths = [0] * rows  # tokens cached in each row
        self._keys = torch.arange(capacity, device=self.device)
        self._steps: dict[int, _Step] = {}
        self._graphs = graphs and self.device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if self._graphs else None
        self._before_replay = model.experts.before_replay if model.experts is not None else None
        self.failure: str | None = None  # why capture failed (steps then stay eager)
        self.moves = 0  # sequences moved into a row left free
        self.reused_tokens = 0  # prompt tokens whose entries came from a prefix, not a forward

    @property
    def graphed(self) -> bool:
        return any(step.graph is not None for step in self._steps.values())

    def counts(self) -> list[int]:
        """The row counts a step is padded to: powers of two, the last one `rows`."""
        counts, count = [], 1
        while count < self.rows:
            counts.append(count)
            count *= 2
        return counts + [self.rows]

    def fill(self, row: int, ids: list[int], prefix: Layers | None = None) -> torch.Tensor:
        """Row `row` takes a sequence: `prefix`'s entries (a prefix cache hit, its first tokens) copied in, the rest
        of `ids` fed in chunks; the last position's logits (1, vocab), float32."""
        start = 0
        if prefix:
            self._ensure_buffers()
            start = prefix[0][0].shape[-2]
            self.reused_tokens += start
            for index, (keys, values) in enumerate(prefix):
                self.kv.keys[index][row, :, :start].copy_(keys[0])
                self.kv.values[index][row, :, :start].copy_(values[0])
        self.kv.first, self.kv.count = row, 1
        with torch.no_grad():
            logits = feed_prompt_static(self.model, self.kv, torch.tensor([ids], device=self.device), start)
        self.lengths[row] = len(ids)
        return logits

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Rows 0..len(tokens)-1 each fed its token at its own position; their logits (len(tokens), vocab),
        float32. Each row's length grows by one."""
        count = len(tokens)
        padded = next(size for size in self.counts() if size >= count)
        step = self._steps.get(padded)
        if step is None:
            step = self._steps[padded] = _Step(padded, self.device)
        step.ids.copy_(torch.tensor(tokens + [0] * (padded - count)).view(padded, 1))
        step.positions.copy_(torch.tensor(self.lengths[:count] + [0] * (padded - count)))
        if step.graph is not None:
            if self._before_replay is not None:
                self._before_replay()
            step.graph.replay()
        else:
            self._forward(step)
            step.runs += 1
            if step.runs == 2 and self._graphs and self.failure is None:
                self._capture(step)
        for row in range(count):
            self.lengths[row] += 1
        return step.logits[:count]  # type: ignore[index]

    def move(self, source: int, target: int) -> None:
        """Row `source`'s sequence moves to row `target` (whose sequence has left)."""
        length = self.lengths[source]
        for buffers in (self.kv.keys, self.kv.values):
            for buffer in buffers:
                buffer[target, :, :length].copy_(buffer[source, :, :length])
        self.lengths[target], self.lengths[source] = length, 0
        self.moves += 1

    def layers(self, row: int) -> Layers:
        """Row `row`'s cached entries per layer, copied (the row is reused), as a one-sequence cache's layers."""
        length = self.lengths[row]
        return [(keys[row:row + 1, :, :length].clone(), values[row:row + 1, :, :length].clone())
                for keys, values in zip(self.kv.keys, self.kv.values)]

    def _ensure_buffers(self) -> None:
        """The buffers exist once any forward has run: a prefix copied in before the first runs one token."""
        if not self.kv.keys:
            self.kv.first, self.kv.count = 0, 1
            with torch.no_grad():
                feed_prompt_static(self.model, self.kv, torch.zeros(1, 1, dtype=torch.long, device=self.device))

    def _forward(self, step: _Step) -> None:
        """The step's forward over rows 0..count-1; its bias from each row's position."""
        self.kv.first, self.kv.count = 0, step.count
        self.kv.write_at, self.kv.length = step.positions[:, None], 1
        bias = causal_bias(step.positions, self._keys, self.model.dtype).view(step.count, 1, 1, -1)  # a row each
        with torch.no_grad():
            out = self.model(input_ids=step.ids, position_ids=step.positions[:, None],
                             cache_position=step.positions[:1], attention_mask=bias, past_key_values=self.kv,
                             use_cache=True)
        step.logits = out.logits[:, -1, :].float()

    def _capture(self, step: _Step) -> None:
        """Record the step (right after an eager run); the first replay gives its logits again. A failure is kept
        and the steps stay eager."""
        step.graph, self.failure = record_graph(lambda: self._forward(step), self.device, self._pool)
        if self.failure is not None:
            log.warning("batch steps not graphed: CUDA graph capture failed (%s)", self.failure)
