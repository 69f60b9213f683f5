"""Feeding a prompt into a KV cache a chunk at a time, as transformers' own generate would feed it whole.

Each chunk is one forward of the model over the cache: the chunk's positions come from the attention mask as
transformers numbers them (left padding included), and the mask grows with the cache. Only the last position's
logits are made (`logits_to_keep=1`). `feed_prompt` sizes the chunks for a TierstoreModel's budget
(`plan_prefill`) and runs them under the plan that gives them room.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ...errors import BudgetError, InputError
from ..placement.prefill import Prefill, plan_prefill
from ..runtime.chunk_attention import lower_right_chunks, takes_lower_right
from .static_forward import PROMPT_CHUNK_TOKENS, StaticKV, feed_prompt_static


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers' positions for a left-padded batch: each row counts its real tokens from 0 (padding gets 1)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def prefill(model: Any, input_ids: torch.Tensor, cache: Any, chunk_tokens: int,
            attention_mask: torch.Tensor | None = None, start: int = 0, stop: int | None = None) -> Any:
    """Feed `input_ids[:, start:stop]` (rows of equal length; `start` tokens already cached) through `model` (a
    transformers causal LM) into `cache`, `chunk_tokens` per forward; returns the last forward's output (None when
    nothing was fed)."""
    stop = input_ids.shape[1] if stop is None else stop
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = positions_from_mask(attention_mask)
    masked = not bool(attention_mask[:, :stop].all())
    out = None
    with lower_right_chunks(model.config, stop):
        for begin in range(start, stop, chunk_tokens):
            end = min(begin + chunk_tokens, stop)
            out = model(input_ids=input_ids[:, begin:end], attention_mask=attention_mask[:, :end] if masked else None,
                        position_ids=positions[:, begin:end], past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
    return out


def plan_feed(model: Any, tokens: int, rows: int, attention_mask: torch.Tensor | None) -> Prefill:
    """How `model` (a TierstoreModel) feeds `rows` prompts of `tokens` under its current plan; InputError when not
    even one token's activations fit the device budget."""
    masked = (attention_mask is not None and not bool(attention_mask.all())) or \
        not takes_lower_right(model.model.config, tokens)
    try:
        return plan_prefill(model.kv_budget, model.plan, tokens, rows, masked, model.config.runtime.prefill_chunk)
    except BudgetError as exc:
        raise InputError(f"a prompt of {tokens} tokens cannot be fed within the device budget: {exc}; shorten it "
                         f"or raise --vram") from exc


def feed_prompt(model: Any, input_ids: torch.Tensor, cache: Any, start: int = 0, stop: int | None = None,
                attention_mask: torch.Tensor | None = None, planned: Prefill | None = None) -> tuple[Any, str | None]:
    """Feed `input_ids[:, start:stop]` into `cache` through `model` (a TierstoreModel) in the chunks `planned` (or
    `plan_feed`) gives, under the plan that gives them room (`planned_room`). Returns the last forward's output and
    the plan's note when the prompt took more than one chunk."""
    stop = input_ids.shape[1] if stop is None else stop
    planned = planned or plan_feed(model, stop - start, input_ids.shape[0], attention_mask)
    with planned_room(model, planned, stop - start), torch.no_grad():
        out = prefill(model.model, input_ids, cache, planned.chunk_tokens, attention_mask, start, stop)
    return out, planned.note if planned.chunk_tokens < stop - start else None


def feed_prompt_planned(model: Any, kv: StaticKV, input_ids: torch.Tensor) -> torch.Tensor:
    """`feed_prompt_static` for a TierstoreModel that streams: chunks no longer than its plan allows, under the
    plan that gives them room. The last position's logits (rows, vocab), float32."""
    rows, tokens = input_ids.shape
    planned = plan_feed(model, tokens, rows, None)
    with planned_room(model, planned, tokens), torch.no_grad():
        return feed_prompt_static(model.model, kv, input_ids, chunk_tokens=min(PROMPT_CHUNK_TOKENS,
                                                                                 planned.chunk_tokens))


@contextlib.contextmanager
def planned_room(model: Any, planned: Prefill, tokens: int) -> Iterator[None]:
    """Feeding `tokens` prompt tokens as `planned`: the store re-planned for the chunks while they run, then back,
    and the GPU allocator's cache emptied after a re-plan or several chunks (the budget counts what the process
    holds)."""
    decode_plan = model.plan
    if planned.plan is not None:  # the evicted units' blocks stay cached for the chunks to take (emptying the
        model.store.replan(planned.plan)  # cache here took the 32,000-token row from 4.09 to 4.39 GB on an H200)
        model.plan = planned.plan
    try:
        yield
    finally:
        if planned.plan is not None:
            model.store.replan(decode_plan)
            model.plan = decode_plan
        if model.device.type == "cuda" and (planned.plan is not None or planned.chunk_tokens < tokens):
            torch.cuda.empty_cache()  # what the chunks' activations took (one chunk under the decode plan fits)
