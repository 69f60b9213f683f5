"""A finished sequence's KV cache copied into one flat host buffer, each layer's keys and values a view of it.

One buffer per entry, not one per tensor: torch's pinned-memory allocator rounded each of a 7B model's 56 tensors
of a 16,000-token entry (16.4 MB) up to 32 MiB, twice the entry's bytes. From a GPU the copies run on a stream of
their own, ordered after the work that wrote the cache (`ready`), so they neither wait behind nor hold up the passes
queued after it.
"""
from __future__ import annotations

import contextlib

import torch

from ...units import align

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values [1, heads, tokens, head_dim]

ALIGN_BYTES = 512  # each view starts on this boundary (any dtype's alignment, and whole DMA lines)


def host_bytes(layers: Layers) -> int:
    """The bytes a flat buffer for `layers` needs."""
    return sum(align(tensor.nbytes, ALIGN_BYTES) for pair in layers for tensor in pair)


def copy_to_host(layers: Layers, buffer: torch.Tensor, ready: torch.cuda.Event | None = None,
                 stream: torch.cuda.Stream | None = None) -> Layers:
    """`layers` copied into `buffer` (at least `host_bytes(layers)`), returned as views of it. Tensors on a GPU are
    copied on `stream` once `ready` has passed, and waited for."""
    views: Layers = []
    offset = 0
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        if stream is not None and ready is not None:
            stream.wait_event(ready)
        for keys, values in layers:
            pair = []
            for tensor in (keys, values):
                view = buffer[offset:offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
                view.copy_(tensor, non_blocking=stream is not None)
                pair.append(view)
                offset += align(tensor.nbytes, ALIGN_BYTES)
            views.append((pair[0], pair[1]))
        if stream is not None:
            stream.synchronize()
    return views


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, copied without blocking. A prefix cropped from a longer entry ([batch, heads,
    tokens, head_dim] cut along tokens) is not contiguous; torch would first gather it into pageable memory (96 ms
    for a 7B model's 16,000-token prefix on an H200, against 18 ms from pinned), so it crosses as one contiguous
    [tokens, head_dim] block per batch row and head instead."""
    if tensor.device == device or tensor.is_contiguous() or tensor.dim() < 3 or \
            tensor.stride(-1) != 1 or tensor.stride(-2) != tensor.shape[-1]:
        return tensor.to(device, non_blocking=True)
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    rows, out_rows = tensor.flatten(0, -3), out.view(-1, *tensor.shape[-2:])
    for row in range(rows.shape[0]):
        out_rows[row].copy_(rows[row], non_blocking=True)
    return out
