"""Forwards over buffers at fixed addresses, so that a CUDA graph can record one and replay it.

`StaticKV` holds the key/value entries of every layer in buffers sized once; a forward writes its new entries at
the positions its `write_at` tensor names and attends over the whole buffer, a bias saying which entries each
token sees. `StaticForward` is one forward of a fixed number of tokens over such a cache (the draft's steps, the
verify pass's trees in buckets of widths): its inputs are refilled in place, and on a GPU it runs eagerly once,
is recorded, and is replayed after. `feed_prompt_static` fills the cache with a prompt eagerly, in chunks;
`record_graph` records a forward (every graphed loop's, here and in graphed.py and static_rows.py).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

log = logging.getLogger(__name__)

PROMPT_CHUNK_TOKENS = 512  # prompt tokens a prefill forward feeds: its bias is chunk x buffer entries


class StaticKV(DynamicCache):
    """Key/value buffers at fixed addresses: every forward writes its new entries at the positions in `write_at`
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


def entries_dynamic(bias: torch.Tensor, bias_dim: int, *buffers: torch.Tensor) -> None:
    """Tell torch.compile that the cache's entry count varies (the attention bias's `bias_dim`, the buffers'
    dimension 2): each generate call sizes a draft's cache by its own length, and a shape compiled as a constant
    would compile again (tens of seconds on a GPU) for each new one."""
    torch._dynamo.maybe_mark_dynamic(bias, bias_dim)
    for buffer in buffers:
        torch._dynamo.maybe_mark_dynamic(buffer, 2)


def causal_bias(positions: torch.Tensor, keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, len(positions), len(keys)) additive bias: each position sees the entries up to itself."""
    visible = keys[None, :] <= positions[:, None]
    zero = torch.zeros((), dtype=dtype, device=keys.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)[None, None]


def record_graph(forward: Callable[[], None], device: torch.device, pool: Any = None,
                 muted: contextlib.AbstractContextManager[Any] | None = None,
                 ) -> tuple[torch.cuda.CUDAGraph | None, str | None]:
    """Record `forward` (which has just run eagerly, warming its kernels up) as a CUDA graph, in `pool` when given,
    inside `muted` (a tracer's, so that the capture records no events); then replay it once, so that its outputs
    hold this run's values again. Returns (graph, None), or (None, why) after `forward` ran eagerly once more: the
    caller stays eager."""
    try:
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with muted or contextlib.nullcontext(), torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            forward()
    except Exception as exc:  # noqa: BLE001 - any capture failure means: stay eager
        forward()
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    torch.cuda.synchronize(device)  # what came before the replay is the recording's cost
    graph.replay()
    return graph, None


def feed_prompt_static(model: Any, kv: StaticKV, input_ids: torch.Tensor, start: int = 0,
                       chunk_tokens: int = PROMPT_CHUNK_TOKENS) -> torch.Tensor:
    """Feed `input_ids[:, start:]` (rows, n) into `kv` at positions start.. in chunks of `chunk_tokens`, each
    attending causally over the buffer; the last position's logits (rows, vocab), float32."""
    rows, prompt = input_ids.shape
    keys = torch.arange(kv.max_tokens, device=input_ids.device)  # on the compute device
    for begin in range(start, prompt, chunk_tokens):
        end = min(begin + chunk_tokens, prompt)
        positions = keys[begin:end]
        kv.write_at, kv.length = positions, end
        bias = causal_bias(positions, keys, model.dtype).expand(rows, -1, -1, -1)
        out = model(input_ids=input_ids[:, begin:end], position_ids=positions.expand(rows, -1),
                    cache_position=positions, attention_mask=bias, past_key_values=kv, use_cache=True,
                    logits_to_keep=1)
    return out.logits[:, -1, :].float()


class StaticForward:
    """One forward of exactly `width` tokens over `kv`, for one sequence. `run` refills its inputs in place: the
    tokens, their positions, where their entries are written, and what each sees (every entry before `seen_from`,
    then `allowed` over the entries from there). Fewer tokens than `width` are padded: the pads write just past the
    last real entry (never live there: a later forward overwrites them) and see only entry 0. On a GPU the first
    run is eager and is then recorded as a CUDA graph (in `pool` when given: graphs sharing a pool must not run
    at once, and each run's output is read before the next), which later runs replay. With `compiled` (the
    model under torch.compile, its weights bound), the runs after the first eager one go through it, and on a
    GPU it is what the graph records; should it fail, the runs stay eager.

    A run's host work is two copies from pinned buffers (the integers; which entries the tokens see) and the
    replay: the attention bias is built from them inside the forward, and `head` (logits (width, vocab) to what
    `run` returns; None: the logits) runs in it too, so that a draft's step reads back only its top choices."""

    def __init__(self, model: Any, kv: StaticKV, width: int, device: torch.device, pool: Any = None,
                 compiled: Any = None, head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 allowed_columns: int | None = None) -> None:
        self.model = model  # transformers' model, its units computed on `device`
        self.compiled = compiled
        self.compile_failure: str | None = None  # why the compiled forward was dropped
        self.compiled_runs = 0  # forwards run through `compiled` (a graph's recording counts once)
        self.head = head
        self.kv = kv
        self.width = width
        self.device = device
        self.pool = pool
        pinned = device.type == "cuda"
        # ids, positions, write positions (width each), then seen_from and the count of real tokens
        self._host_ints = torch.zeros(3 * width + 2, dtype=torch.long, pin_memory=pinned)
        # a run's `allowed` block, rows after rows (at most `allowed_columns` wide: a verify pass's tree is
        # square, a draft's grows to the cache's room)
        self._host_allowed = torch.zeros(width * (allowed_columns or kv.max_tokens), dtype=torch.bool,
                                         pin_memory=pinned)
        self._ints = torch.zeros(3 * width + 2, dtype=torch.long, device=device)
        self._seen = torch.zeros(width, kv.max_tokens, dtype=torch.bool, device=device)  # allowed, placed
        self.ids = self._ints[:width].view(1, width)
        self.positions = self._ints[width:2 * width].view(1, width)
        self.writes = self._ints[2 * width:3 * width]
        self._keys = torch.arange(kv.max_tokens, device=device)
        self._rows = torch.arange(width, device=device)[:, None]
        self._masked = torch.tensor(torch.finfo(model.dtype).min, dtype=model.dtype, device=device)
        self._copied = torch.cuda.Event() if pinned else None  # the pinned buffers may be written again
        self.output: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failure: str | None = None  # why capture failed (the runs stay eager)
        self.capture_s = 0.0  # seconds of the eager run and the recording, beyond what a replay costs

    def run(self, tokens: list[int], positions: list[int], writes: list[int], seen_from: int,
            allowed: torch.Tensor) -> torch.Tensor:
        """The head's output (or the logits (width, vocab)) of `tokens` (at most `width`) at `positions`, their
        entries written at `writes`; token i sees entries [0, seen_from) and entry seen_from + j where
        allowed[i, j]. Valid until the next run of any forward sharing the pool."""
        self._fill(tokens, positions, writes, seen_from, allowed)
        self.kv.length = max(writes) + 1
        self.kv.write_at = self.writes
        if self.graph is not None:
            self.graph.replay()
        elif self.device.type == "cuda" and self.failure is None:
            start_s = time.perf_counter()
            self._forward(self.model)  # the eager run warms the kernels up (and sizes the cache's buffers)
            forward = self._compiled_or_eager()  # compiled (and warmed up) now, not while recording
            self.graph, self.failure = record_graph(lambda: self._forward(forward), self.device, self.pool)
            if self.failure is not None:
                log.warning("a %d-token forward is not graphed: CUDA graph capture failed (%s)", self.width,
                            self.failure)
            self.capture_s += time.perf_counter() - start_s
        elif self.output is None:
            self._forward(self.model)  # the first run eager: it sizes the cache's buffers
        else:
            self._compiled_or_eager()
        return self.output  # type: ignore[return-value]

    def _fill(self, tokens: list[int], positions: list[int], writes: list[int], seen_from: int,
              allowed: torch.Tensor) -> None:
        """The run's inputs into the pinned buffers, then onto the device: two copies, and the rows' old marks
        cleared."""
        count, width = len(tokens), self.width
        if self._copied is not None:
            self._copied.synchronize()  # the last run's copies have read the buffers
        ints = self._host_ints.numpy()
        pad_from = max(writes) + 1
        ints[:count], ints[count:width] = tokens, 0
        ints[width:width + count], ints[width + count:2 * width] = positions, 0
        ints[2 * width:2 * width + count] = writes
        ints[2 * width + count:3 * width] = range(pad_from, pad_from + width - count)
        ints[3 * width], ints[3 * width + 1] = seen_from, count
        columns = allowed.shape[1]
        block = self._host_allowed[:count * columns].view(count, columns)
        block.copy_(allowed)
        self._ints.copy_(self._host_ints, non_blocking=True)
        self._seen[:count].zero_()
        self._seen[:count, seen_from:seen_from + columns].copy_(block, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def _bias(self) -> torch.Tensor:
        """(1, 1, width, entries) additive bias from the device's inputs: a real token sees the entries before
        seen_from and those its row of `_seen` marks; a pad sees entry 0."""
        seen_from, count = self._ints[3 * self.width], self._ints[3 * self.width + 1]
        visible = torch.where(self._rows < count, (self._keys < seen_from) | self._seen, self._keys == 0)
        return torch.where(visible, 0.0, self._masked)[None, None]

    def _compiled_or_eager(self) -> Any:
        """Run the forward compiled, or eagerly when there is no compiled model or it fails (then never again);
        returns the model that ran."""
        if self.compiled is not None:
            try:
                self._forward(self.compiled)
                self.compiled_runs += 1
                return self.compiled
            except Exception as exc:  # noqa: BLE001 - a model torch.compile cannot take runs as it did before
                self.compile_failure = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                self.compiled = None
                log.warning("a %d-token forward runs uncompiled: torch.compile failed (%s)", self.width,
                            self.compile_failure)
        self._forward(self.model)
        return self.model

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def _forward(self, model: Any) -> None:
        with torch.no_grad():
            bias = self._bias()
            if model is self.compiled:  # one compiled code for every cache length (see `entries_dynamic`)
                entries_dynamic(bias, 3, *self.kv.keys, *self.kv.values)
            out = model(input_ids=self.ids, position_ids=self.positions, cache_position=self.writes,
                        attention_mask=bias, past_key_values=self.kv, use_cache=True)
            logits = out.logits[0]
            self.output = self.head(logits) if self.head is not None else logits
