"""Feeding a prompt into a KV cache a chunk at a time, as transformers' own generate would feed it whole.

Each chunk is one forward of the model over the cache: the chunk's positions come from the attention mask as
transformers numbers them (left padding included), and the mask grows with the cache. Only the last position's
logits are made (`logits_to_keep=1`); the caller's generate then feeds the tokens left over.
"""
from __future__ import annotations

from typing import Any

import torch

from ..runtime.chunk_attention import lower_right_chunks


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
