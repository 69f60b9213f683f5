"""Compressed routed experts, dequantized where they compute.

A compressed expert (nf4, int8, a GGML format) stays packed in every tier, its device slot included: a 4-bit
expert takes about a quarter of a bf16 one's slot, link time and RAM. Before transformers' experts kernel runs, a
layer call's experts on the device are dequantized from their slots into a window: a device buffer of `window`
experts in the compute dtype, seen as the kernel's fused parameters (one stacked view per parameter, as the slots
of uncompressed experts are). A call routed to more experts than the window holds runs the kernel once per
window's worth (experts.py). The window is reused call after call in the compute stream's order, as the dense
units' dequantization buffer is. An expert the CPU computes is dequantized by the CPU (`on_host`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ...compression import Codec, MatrixUnpacker, PackedMatrices, unpacked_numel
from ...units import UnitLayout, align

WINDOW_EXPERTS = 32  # experts dequantized at once: a decode step's or a short call's routed experts in one kernel
ROW_ALIGN_ELEMENTS = 64  # where each parameter's part of a window row starts (128 bytes in bf16)


def window_size(experts_per_layer: int, top_k: int) -> int:
    """Experts a window holds: WINDOW_EXPERTS, at least one token's, at most a layer's."""
    return min(experts_per_layer, max(top_k, WINDOW_EXPERTS))


def row_numel(codec: Codec, packed: PackedMatrices, layout: UnitLayout, names: Sequence[str]) -> int:
    """Elements of one expert in the window (its tensors `names`, in the kernel's parameter order)."""
    return sum(align(_numel(codec, packed, layout, name), ROW_ALIGN_ELEMENTS) for name in names)


def window_bytes(codec: Codec, packed: PackedMatrices, layout: UnitLayout, names: Sequence[str], window: int,
                 dtype: torch.dtype) -> int:
    """Device bytes of a window of `window` experts in `dtype`."""
    return window * row_numel(codec, packed, layout, names) * dtype.itemsize


def _numel(codec: Codec, packed: PackedMatrices, layout: UnitLayout, name: str) -> int:
    if name in packed.matrices:
        return unpacked_numel(codec, packed.matrices[name][1])
    return math.prod(layout.slots[name].shape)


def _shape(packed: PackedMatrices, layout: UnitLayout, name: str) -> tuple[int, ...]:
    return tuple(packed.matrices[name][1]) if name in packed.matrices else tuple(layout.slots[name].shape)


class ExpertUnpacker:
    """The window of dequantized experts (see the module docstring), for experts stored as `packed` and `layout`
    describe one of them (every expert of the model is placed alike)."""

    def __init__(self, codec: Codec, packed: PackedMatrices, layout: UnitLayout, names: Sequence[str], window: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.window = window
        self._unpacker = MatrixUnpacker(codec, dtype, device)
        self._host = MatrixUnpacker(codec, dtype, torch.device("cpu")) if device.type != "cpu" else self._unpacker
        self._dtype = dtype
        starts, start = [], 0
        for name in names:
            starts.append(start)
            start += align(_numel(codec, packed, layout, name), ROW_ALIGN_ELEMENTS)
        self._parts = [(first, _numel(codec, packed, layout, name), _shape(packed, layout, name))
                       for first, name in zip(starts, names)]
        self.buffer = torch.empty((window, start), dtype=dtype, device=device)
        self.views = [self.buffer[:, first:first + math.prod(shape)].view(window, *shape)
                      for first, _, shape in self._parts]  # the kernel's parameters, in `names`' order

    def fill(self, position: int, names: Sequence[str], packed: PackedMatrices,
             tensors: Mapping[str, torch.Tensor]) -> None:
        """Dequantize one expert (its tensor names in parameter order, where its matrices sit, its stored tensors
        on the device) into window position `position`."""
        row = self.buffer[position]
        for name, (first, numel, shape) in zip(names, self._parts):
            if name in packed.matrices:
                self._unpacker.matrix_into(packed, name, tensors, row[first:first + numel])
            else:
                row[first:first + math.prod(shape)].view(shape).copy_(tensors[name])

    def on_host(self, names: Sequence[str], packed: PackedMatrices,
                tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """One expert's tensors (stored in host RAM: `tensors`) dequantized by the CPU, in parameter order."""
        out = []
        for name, (_, numel, shape) in zip(names, self._parts):
            if name in packed.matrices:
                buffer = torch.empty(numel, dtype=self._dtype)
                out.append(self._host.matrix_into(packed, name, tensors, buffer))
            else:
                out.append(tensors[name])
        return out
