"""A model whose units all stay on the device, their tensors bound into its modules once: its forward runs no
hooks and no store, so torch.compile can trace it whole (a model draft's steps, `speculation.compile`).

A compressed unit is dequantized once, each matrix into a tensor of its own (`unpacked_bytes` says what that
takes beside the packed copy the store keeps); the hooks' shared buffer serves one unit at a time, these serve
all at once.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import torch

from ...compression import Decompressor, PackedMatrices
from ...store import TieredStore
from ..loading.skeleton import Skeleton
from .hooks import move_buffers, restore_buffers


class BoundWeights:
    """A module adapter (adapters.py): made, every site's parameters are its unit's tensors, held in the store
    until `detach` puts the meta parameters and the original buffers back."""

    def __init__(self, skeleton: Skeleton, store: TieredStore, device: torch.device,
                 decompressor: Decompressor | None = None) -> None:
        self._sites = skeleton.sites
        self._store = store
        self._held: list[str] = []
        self._moved_buffers = move_buffers(skeleton.model, device)
        for site in self._sites:
            tensors = store.get(site.key, site.position)  # pinned in the store until detach
            self._held.append(site.key)
            if decompressor is not None and site.key in decompressor:
                tensors = {**tensors, **{name: decompressor.materialize_matrix(site.key, name, tensors).clone()
                                         for name in decompressor.matrix_names(site.key)}}
            for binding in site.bindings:
                binding.module._parameters[binding.attr] = tensors[binding.tensor]

    def detach(self) -> None:
        for site in self._sites:
            for binding in site.bindings:
                binding.module._parameters[binding.attr] = binding.original
        for key in self._held:
            self._store.release(key)
        self._held.clear()
        restore_buffers(self._moved_buffers)


def unpacked_bytes(packed: Mapping[Hashable, PackedMatrices], dtype: torch.dtype) -> int:
    """The device bytes `BoundWeights` adds for a compressed model: every matrix of every unit in `packed`
    dequantized into `dtype`."""
    return sum(math.prod(shape) for p in packed.values() for _, shape in p.matrices.values()) * dtype.itemsize
