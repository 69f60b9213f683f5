"""Continuous batching: one weight pass per step advances every active sequence by a token; a request joins the
running batch at the next step, and a finished or cancelled one leaves it (its KV cache rows freed).

The batch shares one transformers `DynamicCache`. Rows are aligned on the right: `mask` [rows, columns] marks which
cache columns hold a row's real tokens, so a row that joins later, or a pass that carries a prompt beside the
running rows' next tokens, leaves masked columns in the other rows; positions come from each row's own count. A
compaction repacks the rows when masked columns outgrow the real ones. transformers' own forward, masks and
sampling warpers do the rest; nothing here knows the architecture.

The cache is held to a size in tokens (rows times columns, what the budget reserved for it): a request joins only
when the batch, with every row grown to its `max_tokens`, still fits. Short requests therefore share a pass in
larger numbers than sequences of the longest length would.

When the model's decode steps can replay a CUDA graph (every unit and the KV cache on the device), the cache is
instead one fixed row per sequence (static_rows.py): prompts are fed into their rows one at a time, and every
step of the running rows is replayed from a graph for its (power-of-two) row count.

Caches with other layer kinds (sliding windows, recurrent states) cannot be joined this way: for those models a
new request waits until the running batch has drained, and the batch then starts afresh (still one pass per step
for all of it).

Finished sequences go to the prefix cache (`runtime.prefix_cache_ram`). When the batch drains, the last one's KV
cache also stays where it is until the next request: a chat's next turn continues it without crossing the link
(`PrefixCache.keep_on_device`), and any other request lets it go before making its own.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ...errors import InputError
from ..decoding import sampling
from ..decoding.model import quiet_forward
from ..decoding.prefill import feed_prompt, plan_feed
from ..placement.kv import kv_cache_tokens
from ..runtime.prefix_cache import cache_layers, restore
from ..runtime.reserved_cache import as_dynamic, reserved_cache
from .kv_rows import compact, keep_rows, merge_rows, plain_layers
from .static_rows import StaticRows

log = logging.getLogger(__name__)

EXPERT_WINDOW_STEPS = 64  # a mixture-of-experts model's routing record is replayed (policy choice) and reset this often


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings. `temperature` 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def check(self) -> None:
        if self.max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise InputError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not stop for stop in self.stop):
            raise InputError("a stop string is empty")


@dataclasses.dataclass(frozen=True)
class Event:
    """What a sequence produced in one step: new text (held back while it may still become a stop string), and on
    the last event `finish_reason` ("stop", "length", "cancelled" or "error", with `error`)."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class QueueFull(Exception):
    """The wait queue is at its bound."""


class ShuttingDown(Exception):
    """The batcher takes no new requests."""


class Sequence:
    """One request in the batcher: its prompt, settings, tokens so far, and where its events go (`on_event` is
    called on the batcher's thread)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.on_event = on_event
        self.tokens: list[int] = []
        self.cached = 0  # tokens of this sequence in the KV cache
        self.sent_chars = 0
        self.cancelled = False
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None


class Batcher:
    """Runs `model` (a TierstoreModel) for many sequences at once on a thread of its own.

    `max_batch` caps the rows of a pass, `max_queue` the requests waiting to join (beyond it `submit` raises
    QueueFull), `max_seq_tokens` a sequence's prompt plus completion, `cache_tokens` the rows times columns the
    KV cache may come to (default: `max_batch` sequences of `max_seq_tokens`, see `kv_cache_tokens`).
    `static_rows`: keep the cache as fixed rows whose decode steps replay CUDA graphs (static_rows.py); None
    does so when the model's steps can be graphed and `cache_tokens` holds `max_batch` rows of
    `max_seq_tokens`; True forces the layout (eagerly on a CPU: tests), False the ragged cache."""

    def __init__(self, model: Any, max_batch: int, max_queue: int, max_seq_tokens: int,
                 cache_tokens: int | None = None, static_rows: bool | None = None) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.device = model.device
        self.max_batch, self.max_queue, self.max_seq_tokens = max_batch, max_queue, max_seq_tokens
        self.cache_tokens = cache_tokens or kv_cache_tokens(max_batch, max_seq_tokens)
        settings = model.model.generation_config
        self.eos_ids = sampling.eos_ids(settings.eos_token_id if settings.eos_token_id is not None
                                        else self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, columns] int64: 1 where a row's token is cached
        self._joinable: bool | None = None  # learnt from the first cache: are all its layers plain DynamicLayers
        self._wake = threading.Condition()
        self._accepting = True
        self._running = True
        self.steps = 0  # weight passes
        self.tokens_generated = 0
        self.prefills_apart = 0  # joining prompts given a pass of their own (see _step)
        runtime = model.config.runtime
        wanted = bool(runtime.prefix_cache_ram) or runtime.prefix_cache_dir is not None
        self.prefixes = model.open_prefix_cache() if wanted and not model.kv_on_host else None
        self.steps_note = ""  # whether decode steps replay CUDA graphs, and why not (a server's start-up line)
        self._rows = self._static_rows(static_rows)
        self._thread = threading.Thread(target=self._loop, name="tierstore-batcher", daemon=True)
        self._thread.start()

    # -- callers (any thread) ------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]) -> Sequence:
        """Queue a request; it joins the batch at the next step with room. Bad settings raise InputError."""
        params.check()
        if not prompt_ids:
            raise InputError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_seq_tokens:
            raise InputError(f"prompt of {len(prompt_ids)} tokens plus max_tokens {params.max_tokens} exceeds the "
                             f"{self.max_seq_tokens} tokens a sequence may have")
        sequence = Sequence(prompt_ids, params, on_event)
        with self._wake:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the queue's bound")
            self._waiting.append(sequence)
            self._wake.notify()
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """Drop `sequence` at the next step boundary (its cache rows are freed then); its last event says
        "cancelled". Cancelling a finished sequence does nothing."""
        with self._wake:
            sequence.cancelled = True
            self._wake.notify()

    @property
    def mask(self) -> torch.Tensor | None:
        """The batch cache's mask [rows, columns] (1 where a row's token is cached); None while no batch runs,
        and with static rows (their lengths say it). Read it between steps (from an event), as the batcher's
        thread replaces it each step."""
        return self._mask

    @property
    def graphed(self) -> bool | None:
        """Whether decode steps replayed CUDA graphs (None: the cache is not kept as static rows)."""
        return None if self._rows is None else self._rows.graphed

    def _static_rows(self, wanted: bool | None) -> StaticRows | None:
        """The static rows this batcher keeps its cache in, if it does (see `static_rows` in the class doc); their
        steps are graphed when the model's can be."""
        if wanted is False:
            return None
        unfit = self.model.graph_rows_refusal(self.max_batch, self.max_seq_tokens)
        if unfit is None and self.cache_tokens < self.max_batch * self.max_seq_tokens:
            unfit = f"the KV cache's {self.cache_tokens} tokens hold fewer than {self.max_batch} rows of " \
                    f"{self.max_seq_tokens}"
        self.steps_note = f"batch decode steps not graphed: {unfit}" if unfit else ""
        if wanted is None and unfit is not None:
            return None
        if unfit is None:
            self.steps_note = (f"batch decode steps replayed from CUDA graphs (the KV cache as {self.max_batch} "
                               f"static rows of {self.max_seq_tokens} tokens)")
        return StaticRows(self.model, self.max_batch, self.max_seq_tokens, graphs=unfit is None)

    def counts(self) -> dict[str, int]:
        with self._wake:
            return {"active": len(self._active), "waiting": len(self._waiting)}

    def close(self, grace_s: float = 30.0) -> None:
        """Take no new requests, cancel the waiting ones, let the active ones finish for up to `grace_s`, then
        cancel the rest and stop the thread."""
        with self._wake:
            self._accepting = False
            for sequence in self._waiting:
                sequence.cancelled = True
            self._wake.notify()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._thread.is_alive():
            with self._wake:
                if not self._active and not self._waiting:
                    break
            time.sleep(0.02)
        with self._wake:
            for sequence in [*self._active, *self._waiting]:
                sequence.cancelled = True
            self._running = False
            self._wake.notify()
        self._thread.join()
        if self.prefixes is not None:
            self.prefixes.close()

    # -- the loop (the batcher's thread) -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                self._drop_cancelled()
                while self._running and not self._active and not self._waiting:
                    self._wake.wait()
                if not self._running and not self._active and not self._waiting:
                    return
                joining = self._admit()
            try:
                self._step(joining)
            except Exception as exc:  # the model failed: these sequences end with the error, the server goes on
                log.exception("a batch step failed")
                message = f"{type(exc).__name__}: {exc}"
                for sequence in [*self._active, *joining]:
                    self._finish(sequence, "error", error=message)
                with self._wake:
                    self._active = []
                self._cache = self._mask = None

    def _drop_cancelled(self) -> None:
        """Called under the lock: cancelled sequences leave the queue and the batch."""
        for sequence in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(sequence)
            self._finish(sequence, "cancelled")
        if any(s.cancelled for s in self._active):
            self._keep([s for s in self._active if not s.cancelled], reason="cancelled")

    def _admit(self) -> list[Sequence]:
        """Called under the lock: the waiting sequences that join this step, in their order, while the rows and
        the cache they come to stay within bounds (the first into an empty batch always joins)."""
        if self._joinable is False and self._active:
            return []  # this model's cache cannot take new rows: wait for the batch to drain
        joining: list[Sequence] = []
        if self._rows is not None:  # every row holds a sequence of max_seq_tokens
            while self._waiting and len(self._active) + len(joining) < self.max_batch:
                joining.append(self._waiting.popleft())
            return joining
        while self._waiting and len(self._active) + len(joining) < self.max_batch:
            candidates = [*joining, self._waiting[0]]
            columns = max([self._columns()] + [len(s.prompt_ids) for s in candidates])  # at best: a pass apart
            if (self._active or joining) and self._cache_size(candidates, columns) > self.cache_tokens:
                break
            joining.append(self._waiting.popleft())
        return joining

    def _columns(self) -> int:
        return self._mask.shape[1] if self._mask is not None else 0

    def _cache_size(self, joining: list[Sequence], columns: int) -> int:
        """Rows times columns the cache comes to when `joining` join it at `columns` columns and every row then
        feeds its tokens up to its `max_tokens` (its last token is sampled, never cached)."""
        rows = [*self._active, *joining]
        growth = max((s.params.max_tokens - max(len(s.tokens), 1) for s in rows), default=0)
        return len(rows) * (columns + growth)

    def _step(self, joining: list[Sequence]) -> None:
        """One weight pass: the running rows' next tokens, and the joining prompts beside them when that pads the
        running rows less than the prompts' own length and keeps the cache within its tokens; otherwise the
        prompts first get a pass of their own."""
        for sequence in joining:
            if sequence.params.temperature > 0:
                sequence.generator = sampling.generator(self.device, sequence.params.seed)
        if self._rows is not None:
            for sequence in joining:
                self._join_row(sequence)
            if self._active:
                self._step_rows()
            return
        if self._joinable is not False:
            joining = [s for s in joining if not self._join_apart(s)]
        width = max([len(s.prompt_ids) for s in joining] + [1])
        if joining and self._active and not self._beside(joining, width):
            self.prefills_apart += 1  # counted first: a caller may see the prompts' first tokens before it returns
            self._prefill_apart(joining)
            joining = []
        if self._active or joining:  # none when a prompt that joined on its own ended at its first token
            self._forward(joining)

    def _join_row(self, sequence: Sequence) -> None:
        """A prompt takes the next static row: its prefix restored from the prefix cache, the rest fed in chunks,
        its first token sampled."""
        assert self._rows is not None
        hit = self.prefixes.lookup(sequence.prompt_ids) if self.prefixes is not None else None
        with quiet_forward():
            logits = self._rows.fill(len(self._active), sequence.prompt_ids, hit[1] if hit is not None else None)
        sequence.tokens.append(self._sample(logits, [sequence])[0])
        sequence.cached = len(sequence.prompt_ids)
        self.steps += 1
        self.tokens_generated += 1
        with self._wake:
            self._active = [*self._active, sequence]
        self._emit(sequence)
        if sequence.finish_reason is not None:
            with self._wake:
                self._keep([s for s in self._active if s is not sequence], reason=None)

    def _step_rows(self) -> None:
        """One decode step of every static row (a replayed graph on a GPU), a token for each; the finished leave."""
        assert self._rows is not None
        rows = self._active
        with quiet_forward():
            logits = self._rows.step([sequence.tokens[-1] for sequence in rows])
        self._advance(rows, self._sample(logits, rows), [1] * len(rows))

    def _advance(self, rows: list[Sequence], next_tokens: list[int], fed: list[int]) -> None:
        """After a pass: each row's `fed` tokens are cached and its next token emitted; the finished rows leave."""
        self.steps += 1
        if self.model.experts is not None and self.steps % EXPERT_WINDOW_STEPS == 0:
            for note in self.model.experts.end_call():  # a server has no calls: windows of steps stand in
                log.info(note)
            self.model.experts.reset()
        for sequence, count, token in zip(rows, fed, next_tokens):
            sequence.cached += count
            sequence.tokens.append(token)
            self._emit(sequence)
        self.tokens_generated += len(rows)
        with self._wake:
            self._active = rows
            self._keep([s for s in rows if s.finish_reason is None], reason=None)

    def _join_apart(self, sequence: Sequence) -> bool:
        """A prompt that starts like a finished sequence (the prefix cache), or too long for one pass within the
        device budget, joins on its own: its cache restored from the prefix, the rest of the prompt fed in chunks
        (`feed_prompt`), its first token sampled and its row appended to the batch's. Whether it joined so."""
        prompt = len(sequence.prompt_ids)
        hit = self.prefixes.lookup(sequence.prompt_ids) if self.prefixes is not None else None
        start = hit[0] if hit is not None else 0
        if hit is None and (self.model.kv_on_host or plan_feed(self.model, prompt, 1, None).chunk_tokens >= prompt):
            return False
        cache = reserved_cache(self.model.model.config, prompt)  # written in place while the chunks run
        if hit is not None:
            restore(cache, hit[1], self.device)
        ids = torch.tensor([sequence.prompt_ids], device=self.device)
        with quiet_forward():
            out, note = feed_prompt(self.model, ids, cache, start)
        as_dynamic(cache)
        if note:
            log.info(note)
        sequence.tokens.append(self._sample(out.logits[:, -1, :].float(), [sequence])[0])
        sequence.cached = prompt
        self.steps += 1
        self.tokens_generated += 1
        mask = torch.ones((1, prompt), dtype=torch.long)
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            assert self._mask is not None
            self._mask = merge_rows(self._cache, self._mask, cache, mask)
        with self._wake:
            self._active = [*self._active, sequence]
        self._emit(sequence)  # in the batch first: its receiver may look at the batch
        if sequence.finish_reason is not None:
            with self._wake:
                self._keep([s for s in self._active if s is not sequence], reason=None)
        return True

    def _finished_kv(self, sequence: Sequence, cache: Any, mask: torch.Tensor,
                     row: int) -> tuple[list[int], Any] | None:
        """A finished sequence's cached tokens and their KV (row `row` of `cache`), for the prefix cache; None
        when it did not end by a stop or its length, or its cache cannot be cut to a prefix."""
        layers = cache_layers(cache)
        if layers is None or sequence.finish_reason not in ("stop", "length"):
            return None
        columns = mask[row].nonzero().squeeze(1)
        tokens = [*sequence.prompt_ids, *sequence.tokens][:sequence.cached]
        if len(columns) != len(tokens) or not len(columns):
            return None
        first, last = int(columns[0]), int(columns[-1]) + 1
        if last - first == len(columns):  # one run of columns (rows are right-aligned): views, nothing copied here
            return tokens, [(k[row:row + 1, :, first:last], v[row:row + 1, :, first:last]) for k, v in layers]
        return tokens, [(k[row:row + 1, :, columns.to(k.device)], v[row:row + 1, :, columns.to(k.device)])
                        for k, v in layers]

    def _beside(self, joining: list[Sequence], width: int) -> bool:
        """Whether `joining`'s prompts (`width` the longest) share the running rows' pass: when that pads the
        running rows less than the prompts' own length, and the cache, with `width` more columns, still fits."""
        return (len(self._active) * (width - 1) <= sum(len(s.prompt_ids) for s in joining)
                and self._cache_size(joining, self._columns() + width) <= self.cache_tokens)

    def _prefill_apart(self, joining: list[Sequence]) -> None:
        """The joining prompts' pass alone, then their cache rows appended to the running batch's."""
        running, cache, mask = self._active, self._cache, self._mask
        with self._wake:
            self._active = []
        self._cache = self._mask = None
        self._forward(joining)
        if self._cache is not None:
            assert mask is not None and self._mask is not None
            mask = merge_rows(cache, mask, self._cache, self._mask)
        with self._wake:
            self._active = [*running, *self._active]
        self._cache, self._mask = cache, mask

    def _forward(self, joining: list[Sequence]) -> None:
        """One pass over the running rows (their last token each) and the `joining` ones (their prompts, left
        padded), then a token for each; the finished rows leave."""
        rows = [*self._active, *joining]
        width = max([len(s.prompt_ids) for s in joining] + [1])
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        new_mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.ones((len(rows), width), dtype=torch.long)
        for row, sequence in enumerate(rows):
            fed = sequence.tokens[-1:] if sequence.cached else sequence.prompt_ids
            input_ids[row, width - len(fed):] = torch.tensor(fed)
            new_mask[row, width - len(fed):] = 1
            positions[row, width - len(fed):] = torch.arange(sequence.cached, sequence.cached + len(fed))
        if self._cache is None:  # a fresh batch: the model makes the cache its architecture needs
            self._mask = torch.zeros((len(rows), 0), dtype=torch.long)
        elif joining:  # empty rows for them, as long as the others'
            assert self._mask is not None
            self._mask = merge_rows(self._cache, self._mask, None, torch.zeros((len(joining), 0), dtype=torch.long))
        assert self._mask is not None
        mask = torch.cat([self._mask, new_mask], dim=1)
        cache = self._cache if self._cache is not None else self.model.new_kv_cache()
        with quiet_forward():
            out = self.model.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                   position_ids=positions.to(self.device), past_key_values=cache,
                                   use_cache=True, logits_to_keep=1)
        self.model.settle_kv_cache()  # rows are merged, compacted and dropped below and at the next step
        self._cache, self._mask = out.past_key_values, mask
        if self._joinable is None:
            self._joinable = plain_layers(self._cache)
        self._advance(rows, self._sample(out.logits[:, -1, :].float(), rows), new_mask.sum(dim=1).tolist())
        if self._joinable and self._cache is not None:
            self._mask = compact(self._cache, self._mask)

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> list[int]:
        """Each row's next token under its own settings: greedy rows by argmax, the others with transformers'
        temperature and top-p warpers and the row's own seeded generator."""
        tokens = logits.argmax(dim=-1).tolist()
        for row, sequence in enumerate(rows):
            params = sequence.params
            if params.temperature > 0:
                tokens[row] = sampling.sample(logits[row:row + 1], sampling.warp(params.temperature, None,
                                                                                 params.top_p), sequence.generator)
        return tokens

    def _emit(self, sequence: Sequence) -> None:
        """The text the new token completes, and the finish when it ends the sequence."""
        params = sequence.params
        ended_by_eos = sequence.tokens[-1] in self.eos_ids
        text = self.tokenizer.decode(sequence.tokens, skip_special_tokens=True)
        stop_at = min((i for i in (text.find(s, max(0, sequence.sent_chars - len(s))) for s in params.stop)
                       if i >= 0), default=-1)
        if stop_at >= 0:
            self._finish(sequence, "stop", text[sequence.sent_chars:stop_at])
        elif ended_by_eos:
            self._finish(sequence, "stop", text[sequence.sent_chars:])
        elif len(sequence.tokens) >= params.max_tokens:
            self._finish(sequence, "length", text[sequence.sent_chars:])
        else:
            safe = len(text) - _held_back(text, params.stop)
            if safe > sequence.sent_chars:
                self._deliver(sequence, Event(text[sequence.sent_chars:safe]))
                sequence.sent_chars = safe

    def _finish(self, sequence: Sequence, reason: str, text: str = "", error: str | None = None) -> None:
        if sequence.finish_reason is not None:
            return
        sequence.finish_reason = reason
        self._deliver(sequence, Event(text, reason, len(sequence.prompt_ids), len(sequence.tokens), error))

    @staticmethod
    def _deliver(sequence: Sequence, event: Event) -> None:
        """Hand `event` to the sequence's receiver; a receiver that fails (its client gone) cancels only its own
        sequence, never the batch."""
        try:
            sequence.on_event(event)
        except Exception:
            log.warning("a sequence's receiver failed; cancelling it", exc_info=True)
            sequence.cancelled = True

    def _keep(self, survivors: list[Sequence], reason: str | None) -> None:
        """Called under the lock: the batch shrinks to `survivors` (in their order; static rows fill the rows
        left free with the last rows' sequences), freeing the others' rows; the sequences leaving end with
        `reason` (None: they have finished already)."""
        if len(survivors) == len(self._active):
            return
        kept = {id(s) for s in survivors}
        if self.prefixes is not None:
            for row, sequence in enumerate(self._active):
                finished = None if id(sequence) in kept else self._leaving_kv(sequence, row)
                if finished is not None:
                    self.prefixes.store(*finished)
                    if not survivors and len(self._active) == 1:  # the batch drains: its cache stays on the
                        self.prefixes.keep_on_device(*finished)  # device, where the next turn continues it
        for sequence in self._active:
            if id(sequence) not in kept and reason is not None:
                self._finish(sequence, reason)
        if self._rows is not None:
            self._active = self._pack_rows(kept)
            return
        indices = [row for row, s in enumerate(self._active) if id(s) in kept]
        self._active = survivors
        if not survivors:
            self._cache = self._mask = None
            return
        assert self._cache is not None and self._mask is not None
        self._mask = keep_rows(self._cache, self._mask, indices)

    def _leaving_kv(self, sequence: Sequence, row: int) -> tuple[list[int], Any] | None:
        """A leaving sequence's cached tokens and their KV, for the prefix cache (see `_finished_kv`)."""
        if self._rows is None:
            if self._cache is None or self._mask is None:
                return None
            return self._finished_kv(sequence, self._cache, self._mask, row)
        if sequence.finish_reason not in ("stop", "length") or self._rows.lengths[row] != sequence.cached:
            return None
        return [*sequence.prompt_ids, *sequence.tokens][:sequence.cached], self._rows.layers(row)

    def _pack_rows(self, kept: set[int]) -> list[Sequence]:
        """The static rows' sequences after the others leave: the last rows' kept sequences move into the rows
        left free before them, so that the batch's rows stay the first ones."""
        assert self._rows is not None
        count = sum(1 for s in self._active if id(s) in kept)
        placed: list[Sequence | None] = [s if id(s) in kept else None for s in self._active[:count]]
        movers = [(row, s) for row, s in enumerate(self._active) if row >= count and id(s) in kept]
        free = [row for row, s in enumerate(placed) if s is None]
        for row, (source, sequence) in zip(free, movers):
            self._rows.move(source, row)
            placed[row] = sequence
        return placed  # type: ignore[return-value]


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not to send yet: an unfinished character, or what may begin a stop."""
    if text.endswith("\ufffd"):
        return 1
    return max((k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:k])), default=0)
