"""Compressed routed experts, dequantized where they compute.

A compressed expert (nf4, int8, a GGML format) stays packed in every tier, its device slot included: a 4-bit
expert takes about a quarter of a bf16 one's slot, link time and RAM. Before transformers' experts kernel runs, a
layer call's experts on the device are dequantized from their slots into a window: a device buffer of `window`
experts in the compute dtype, seen as the kernel's fused parameters (one stacked view per parameter, as the slots
of uncompressed experts are). A call routed to more experts than the window holds runs the kernel once per
window's worth (experts.py). The window is reused call after call in the compute stream's order, as the dense
units' dequantization buffer is. An expert the CPU computes is dequantized by the CPU (`on_host`).

A decode step's few tokens skip the window where the experts' formats have a matrix-vector kernel (GGML, on a GPU:
`in_blocks`): each (token, expert) pair's blocks are gathered from the slots and multiplied in them, one launch a
projection for all the pairs (`forward_in_blocks`), so that a 4-bit expert's bytes are not written and read again
as 16-bit values. Where the kernel has been checked reading matrices at offsets (AT_OFFSETS_DEVICES), nothing is
gathered: it reads each pair's blocks where they lie, in their slot or, for experts read in place, in mapped host
RAM (mapped_experts.py).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ...compression import (ABSMAX, GGML, PACKED, Codec, MatrixUnpacker, PackedMatrices, block_ranges,
                            multiplies_packed, unpacked_numel)
from ...ggml import dequantize as ggml_dequantize
from ...ggml import matvec as ggml_matvec
from ...policies.experts import gather_pairs
from ...units import UnitLayout
from ..loading.skeleton import parse_slice
from .host_experts import expert_math

WINDOW_EXPERTS = 32  # experts dequantized at once: a decode step's or a short call's routed experts in one kernel


def window_size(experts_per_layer: int, top_k: int) -> int:
    """Experts a window holds: WINDOW_EXPERTS, at least one token's, at most a layer's; and at least the (token,
    expert) pairs a layer call reading its experts in place gathers at once (mapped_experts.py)."""
    return max(min(experts_per_layer, max(top_k, WINDOW_EXPERTS)), gather_pairs(top_k))


def row_numel(codec: Codec, packed: PackedMatrices, layout: UnitLayout, names: Sequence[str]) -> int:
    """Elements of one expert in the window (its tensors `names`, in the kernel's parameter order)."""
    return sum(_numel(codec, packed, layout, name) for name in names)


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
    describe one of them. `alike`: every expert is stored alike (`stored_alike`); the
    window is then filled from the slots in a few kernels a call (`fill_slots`: per tensor, one gather of the
    experts' bytes and one dequantization), else one expert at a time (`fill`)."""

    def __init__(self, codec: Codec, packed: PackedMatrices, layout: UnitLayout, names: Sequence[str], window: int,
                 dtype: torch.dtype, device: torch.device, alike: bool = False) -> None:
        self.window = window
        self.alike = alike
        self._codec = codec
        self._first, self._layout = packed, layout
        self._unpacker = MatrixUnpacker(codec, dtype, device)
        self._host = MatrixUnpacker(codec, dtype, torch.device("cpu")) if device.type != "cpu" else self._unpacker
        self._dtype = dtype
        self._names = list(names)
        # per tensor: its window, flat (window x elements written per expert), and the kernel's view of it
        self._flat, self.views = [], []
        for name in names:
            numel, shape = _numel(codec, packed, layout, name), _shape(packed, layout, name)
            flat = torch.empty(window * numel, dtype=dtype, device=device)
            self._flat.append(flat)
            self.views.append(flat.view(window, numel)[:, :math.prod(shape)].view(window, *shape))
        # a decode step's experts multiplied in their blocks: stored alike, GGML formats with a kernel on this
        # device, every other tensor a bias
        self.in_blocks = (alike and multiplies_packed(codec, packed, device)
                          and all(name in packed.matrices or parse_slice(name)[0].endswith("_bias") for name in names))

    @property
    def nbytes(self) -> int:
        return sum(flat.nbytes for flat in self._flat)

    def fill_slots(self, pool: torch.Tensor, slots: torch.Tensor) -> None:
        """Dequantize the experts in rows `slots` of `pool` (a long tensor on the device; `pool`: experts' bytes as
        (rows, bytes a row), the device slots or a gathered buffer) into window places 0, 1, ...: needs `alike`."""
        count = slots.numel()
        for name, flat, view in zip(self._names, self._flat, self.views):
            if name not in self._first.matrices:
                place = self._layout.slots[name]
                rows = pool[slots, place.offset:place.offset + place.nbytes]
                view[:count].copy_(rows.view(place.dtype).view(count, *place.shape))
                continue
            numel = flat.numel() // self.window
            if self._codec.format == GGML:
                start, end = self._first.ggml_bytes(name)
                base = self._layout.slots[PACKED].offset
                rows = pool[slots, base + start:base + end]  # each expert's blocks, back to back
                ggml_dequantize(self._first.formats[name][0], rows.reshape(-1), flat[:count * numel])
                continue
            codes, scales = block_ranges(self._codec, self._first.matrices[name][0], numel)
            codes_at, absmax = self._layout.slots[PACKED].offset, self._layout.slots[ABSMAX]
            scales_at, scale_bytes = absmax.offset, absmax.dtype.itemsize
            codes_rows = pool[slots, codes_at + codes.start:codes_at + codes.stop]
            scale_rows = pool[slots, scales_at + scales.start * scale_bytes:scales_at + scales.stop * scale_bytes]
            self._unpacker.dequantize(codes_rows.reshape(-1), scale_rows.reshape(-1).view(absmax.dtype),
                                      flat[:count * numel])

    def forward_in_blocks(self, module: torch.nn.Module, attrs: Sequence[str], memory: torch.Tensor,
                          rows: torch.Tensor, row_bytes: int, inputs: torch.Tensor) -> torch.Tensor | None:
        """Each row of `inputs` [pairs, hidden] through the expert whose stored bytes begin at row `rows[pair]` of
        `memory` (uint8, 1-D, in rows of `row_bytes`: the device slots, one expert a row, or the span of slots and
        mapped host RAM), its matrices multiplied in their blocks (`in_blocks`): [pairs, hidden]. Where the device
        `multiplies_at_offsets`, the kernel reads each pair's blocks where they lie (nothing gathered); else each
        matrix's bytes are first gathered back to back (one expert a row only). `attrs`: the module's parameter
        names in the kernel's order (the unpacker's tensor names are expert 0's slices of them). None where a
        kernel failed (it is not tried again: the window is filled instead)."""
        starts = rows * row_bytes
        at_offsets = multiplies_at_offsets(memory.device)
        names = dict(zip(attrs, self._names))

        def linear(attr: str, x: torch.Tensor) -> torch.Tensor:
            name = names[attr]
            format, (start, end) = self._first.formats[name][0], self._first.ggml_bytes(name)
            at = self._layout.slots[PACKED].offset + start  # the matrix's first byte in an expert's
            out = torch.empty(x.shape[0], self._first.matrices[name][1][0], dtype=x.dtype, device=x.device)
            if at_offsets:
                done = ggml_matvec(format, memory, x.contiguous(), out, grouped=True, offsets=starts + at,
                                   offsets_align=math.gcd(16, row_bytes, at))
            else:
                done = ggml_matvec(format, memory.view(-1, row_bytes)[rows, at:at + end - start], x.contiguous(),
                                   out, grouped=True)
            if not done:
                raise _NoKernel
            bias = self._layout.slots.get(names.get(f"{attr}_bias", ""))
            if bias is not None:  # a few bytes a pair, gathered
                where = (starts + bias.offset)[:, None] + torch.arange(bias.nbytes, device=starts.device)
                out += memory[where].view(bias.dtype).to(out.dtype)
            return out
        try:
            return expert_math(module, inputs, linear)
        except _NoKernel:
            self.in_blocks = False
            return None

    def fill(self, position: int, names: Sequence[str], packed: PackedMatrices,
             tensors: Mapping[str, torch.Tensor]) -> None:
        """Dequantize one expert (its tensor names in parameter order, where its matrices sit, its stored tensors
        on the device) into window place `position`."""
        for name, flat, view in zip(names, self._flat, self.views):
            if name in packed.matrices:
                numel = flat.numel() // self.window
                self._unpacker.matrix_into(packed, name, tensors, flat[position * numel:(position + 1) * numel])
            else:
                view[position].copy_(tensors[name])

    def on_host(self, names: Sequence[str], packed: PackedMatrices,
                tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """One expert's tensors (stored in host RAM: `tensors`) dequantized by the CPU, in parameter order."""
        out = []
        for name, flat in zip(names, self._flat):
            if name in packed.matrices:
                buffer = torch.empty(flat.numel() // self.window, dtype=self._dtype)
                out.append(self._host.matrix_into(packed, name, tensors, buffer))
            else:
                out.append(tensors[name])
        return out


# Devices whose compiled matrix-vector kernel has been checked reading each expert's blocks at its offset: CUDA,
# on an H100 (2026-12-07): tests/test_cuda.py::test_ggml_matrices_multiplied_in_their_blocks_grouped_on_cuda_...
# passed for every GGML format with a kernel, offsets 16-byte aligned or not, and an 8-layer q4_k store of the
# Qwen3-30B-A3B shape gave the same sampled tokens read where they lie as gathered, from slots and mapped RAM.
# Elsewhere each matrix's bytes are gathered from the slots first, and steps reading experts in place dequantize
# them. A compiled kernel summed wrong once where Triton's interpreter did not (benchmarks/RESULTS.md, seventeenth
# session), hence the check before a device is added.
AT_OFFSETS_DEVICES: tuple[str, ...] = ("cuda",)


def multiplies_at_offsets(device: torch.device) -> bool:
    """Whether experts' blocks are multiplied where they lie on `device` (AT_OFFSETS_DEVICES)."""
    return device.type in AT_OFFSETS_DEVICES


class _NoKernel(Exception):
    """A matrix-vector kernel failed (ggml.matvec warned): the window is filled instead."""


def stored_alike(codec: Codec, packed: Mapping[str, PackedMatrices], keys: Sequence[str]) -> bool:
    """Whether the compressed experts `keys` can be dequantized all alike, a few kernels for many (read in place,
    or a window filled from the slots): every expert's matrices sit where the first's do, in its formats (a mixed
    store may give experts of the same size different formats), unrotated (a rotation's signs are drawn per matrix
    name)."""
    if codec.rotation:
        return False
    first = packed[keys[0]]
    where = (list(first.matrices.values()), list(first.formats.values()))
    return all((list(packed[key].matrices.values()), list(packed[key].formats.values())) == where for key in keys)
