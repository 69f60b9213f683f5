"""A device KV cache whose layers are written in place: each layer's keys and values are views of buffers made
once for the sequence's known length.

transformers' DynamicLayer grows by concatenation: every chunk of a long prompt (and every decoded token) makes a
new tensor one step longer and frees the old one, which the allocator keeps but cannot reuse for the next, longer
one. On an H200, a 7B model's 32,000-token prompt in chunks took 4.41 GB of a 4 GB budget that way (the estimate
of its activations held). `ReservedLayer` allocates once; a layer that outgrows its buffer, or whose tensors were
replaced (rows selected, a cache reordered), is copied into a new buffer and goes on from there.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """A full-attention cache layer with room for `capacity_tokens` made at its first update."""

    def __init__(self, capacity_tokens: int) -> None:
        super().__init__()
        self.capacity_tokens = capacity_tokens
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        end = length + key_states.shape[-2]
        if not self._writes_in_place(end):
            # outgrown: room for more than one step
            capacity = self.capacity_tokens if end <= self.capacity_tokens else end + end // 8 + 64
            self._buffers = (_buffer(self.keys, key_states, length, capacity),
                             _buffer(self.values, value_states, length, capacity))
        keys, values = self._buffers
        keys[..., length:end, :].copy_(key_states)
        values[..., length:end, :].copy_(value_states)
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        return self.keys, self.values

    def _writes_in_place(self, end: int) -> bool:
        """Whether the layer's tensors are still views of its buffers, with room up to `end` tokens."""
        if self._buffers is None or end > self._buffers[0].shape[-2]:
            return False
        keys = self._buffers[0]
        return self.keys.data_ptr() == keys.data_ptr() and self.keys.shape[:-2] == keys.shape[:-2]


def _buffer(cached: torch.Tensor, new: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    """A buffer for `capacity` tokens shaped like `new`, holding the `length` tokens of `cached`."""
    buffer = new.new_empty((*new.shape[:-2], capacity, new.shape[-1]))
    if length:
        buffer[..., :length, :].copy_(cached)
    return buffer


def reserved_cache(config: Any, capacity_tokens: int) -> DynamicCache:
    """transformers' DynamicCache for `config` with its full-attention layers `ReservedLayer`s of
    `capacity_tokens` (sliding-window and other layers as transformers makes them)."""
    cache = DynamicCache(config=config)
    cache.layers = [ReservedLayer(capacity_tokens) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


def as_dynamic(cache: DynamicCache) -> DynamicCache:
    """`cache` with its ReservedLayers made plain DynamicLayers holding the same tensors (no copy: for the
    batcher's row surgery, which takes only plain layers; a layer filled to its capacity hands over its buffer)."""
    for index, layer in enumerate(cache.layers):
        if isinstance(layer, ReservedLayer):
            plain = DynamicLayer()
            plain.is_initialized = True
            plain.keys, plain.values, plain.device = layer.keys, layer.values, layer.keys.device
            cache.layers[index] = plain
    return cache
