"""The KV cache as a tier in pinned host RAM for one generate call: each layer's keys and values live in host
buffers made once for the sequence, and come to the device a layer ahead of their use, the way streamed weights do.

transformers' offloaded DynamicCache (`host_cache.HostKVCache`, which the batcher keeps for its row surgery) copies
each layer to the device and the whole layer back after every update, into new pageable memory: at 131,000 tokens
a 7B model's 7.5 GB cache crossed the link both ways each pass (0.448 s/token on an H200 against 0.238 for the
weights alone). Here only the new tokens' rows go back; the rest of the layer is already in RAM, pinned, and
crosses at the link's full rate. Two device slots take turns: while layer l computes in one, layer l + 1 is copied
into the other (a slot is reused only after the compute queued before the copy, its last reader, has run).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SLOTS = 2  # layers of the cache on the device at once: the one computing and the one fetched ahead


class PinnedKVCache(DynamicCache):
    """A DynamicCache for `config` whose full-attention layers live in pinned host buffers of `capacity_tokens`;
    on `device` only while in use. `supports(config)` says whether a model's cache can be one."""

    def __init__(self, config: Any, capacity_tokens: int, device: torch.device) -> None:
        super().__init__(config=config)
        self.capacity_tokens = capacity_tokens
        self.device = device
        self._cuda = device.type == "cuda"
        count = len(self.layers)
        self._host: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * count
        self._lengths = [0] * count
        self._slots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._fetched: dict[int, Any] = {}  # layer -> the event its copy into its slot records (CPU: None)
        self._stream = torch.cuda.Stream(device) if self._cuda else None

    @staticmethod
    def supports(cache: DynamicCache) -> bool:
        return all(type(layer) is DynamicLayer for layer in cache.layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self._host[layer_idx] is None:
            self._allocate(layer_idx, key_states)
        start = self._lengths[layer_idx]
        end = start + key_states.shape[-2]
        if end > self.capacity_tokens:
            raise ValueError(f"the host KV cache holds {self.capacity_tokens} tokens; {end} were fed")
        if layer_idx not in self._fetched:
            self._fetch(layer_idx)
        event = self._fetched.pop(layer_idx)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        keys, values = self._slots[layer_idx % SLOTS]
        keys[..., start:end, :].copy_(key_states)
        values[..., start:end, :].copy_(value_states)
        self._lengths[layer_idx] = end
        host_keys, host_values = self._host[layer_idx]
        with self._on_copy_stream():  # the new rows back to RAM, then the next layer up, after the compute so far
            host_keys[..., start:end, :].copy_(keys[..., start:end, :], non_blocking=True)
            host_values[..., start:end, :].copy_(values[..., start:end, :], non_blocking=True)
        self._fetch((layer_idx + 1) % len(self.layers))
        layer = self.layers[layer_idx]
        layer.keys, layer.values = keys[..., :end, :], values[..., :end, :]
        return layer.keys, layer.values

    def _allocate(self, layer_idx: int, states: torch.Tensor) -> None:
        """Host buffers for a layer, and the device slots on first use, shaped like `states`."""
        shape = (*states.shape[:-2], self.capacity_tokens, states.shape[-1])
        self._host[layer_idx] = tuple(torch.empty(shape, dtype=states.dtype, pin_memory=self._cuda)
                                      for _ in range(2))
        self.layers[layer_idx].is_initialized = True  # its keys and values are set at each update
        if not self._slots:
            self._slots = [tuple(states.new_empty(shape) for _ in range(2)) for _ in range(SLOTS)]

    def _fetch(self, layer_idx: int) -> None:
        """Start copying a layer's cached tokens into its slot (after the compute queued so far: the slot's last
        reader); nothing for a layer not yet made."""
        if self._host[layer_idx] is None:
            return
        length = self._lengths[layer_idx]
        keys, values = self._slots[layer_idx % SLOTS]
        host_keys, host_values = self._host[layer_idx]
        with self._on_copy_stream():
            keys[..., :length, :].copy_(host_keys[..., :length, :], non_blocking=True)
            values[..., :length, :].copy_(host_values[..., :length, :], non_blocking=True)
        self._fetched[layer_idx] = self._stream.record_event() if self._stream is not None else None

    @contextlib.contextmanager
    def _on_copy_stream(self) -> Any:
        if self._stream is None:
            yield
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            yield

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._lengths[layer_idx]
