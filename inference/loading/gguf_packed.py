"""A GGUF file read tensor by tensor, its decoder layers' quantized matrices kept in their file's block formats.

transformers' GGUF loader dequantizes every tensor to float32 and then applies its architecture's tensor processor
(renaming, and for llama-family attention a reordering of the query and key rows). Here the same processor and name
map are used, tensor by tensor, so that one tensor at a time is in memory. A quantized 2-D matrix of a decoder layer
in a format ggml.py reads is kept packed when the processor only reorders its rows: that is found by running the
processor on the row numbers, and the packed rows (each row is whole blocks) are reordered the same way. A
mixture-of-experts layer's expert stacks (3-D: experts, rows, columns), which the processor gathers into the model's
fused experts tensors (gate and up stacked into one, for Qwen-style MoE), are kept packed the same way when the
processor only places whole rows of the same expert: the row numbers of every part go through it together, and
each expert's packed rows are gathered in the order found (`PackedStack`; the parts must share a format). Anything
else (embeddings, norms, a processor that changes values, parts in two formats) is dequantized as transformers does
it.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ...ggml import BLOCKS
from .skeleton import Skeleton, expert_slice


@dataclasses.dataclass(frozen=True)
class PackedMatrix:
    """A matrix in a ggml block format: its bytes (rows in the model's order) and its shape in the model."""

    format: str
    data: torch.Tensor  # uint8, 1-D
    shape: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class PackedStack:
    """A fused experts tensor whose experts stay in a ggml block format: expert `e`'s matrix is the rows `order`
    of its slices of `parts` stacked (part p's row r is row p * rows + r), each row whole blocks."""

    format: str
    parts: tuple[np.ndarray, ...]  # each (experts, rows, row bytes), memory-mapped from the file
    order: np.ndarray
    shape: tuple[int, int]  # one expert's matrix in the model

    def __getitem__(self, expert: int) -> PackedMatrix:
        rows = np.concatenate([part[expert] for part in self.parts])[self.order]
        return PackedMatrix(self.format, torch.from_numpy(np.ascontiguousarray(rows)).reshape(-1), self.shape)


class GGUFTensors:
    """The model's tensors in a GGUF file, by the model's names: what `load_gguf_checkpoint` returns, read a few
    at a time, with the layers' quantized matrices as PackedMatrix when `keep_packed`. `packed` says which
    matrices those are (model name -> (format, row order)) before anything is read."""

    def __init__(self, path: str, skeleton: Skeleton, keep_packed: bool) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self._parsed = load_gguf_checkpoint(path, return_tensors=False)  # config and tokenizer fields
        self._parsed["tensors"] = {}
        self._reader = GGUFReader(path)
        self._processor = TENSOR_PROCESSORS.get(read_field(self._reader, "general.architecture")[0],
                                                TensorProcessor)(config=self._parsed["config"])
        self._names = get_gguf_hf_weights_map(skeleton.model, self._processor)
        shapes = {name: tuple(param.shape) for name, param in skeleton.model.named_parameters()}
        self.packed: dict[str, tuple[str, str, np.ndarray]] = {}  # gguf name -> (model name, format, row order)
        for tensor in self._reader.tensors if keep_packed else ():
            found = self._packable(tensor, skeleton.matrices, shapes)
            if found is not None:
                self.packed[tensor.name] = found
        # model name of a fused experts tensor -> (its parts' gguf names, row order), and each part's model name
        self.stacks: dict[str, tuple[tuple[str, ...], np.ndarray]] = \
            _packable_stacks(self._reader, self._processor, self._names, self._parsed, skeleton.matrices, shapes) \
            if keep_packed else {}
        self._stack_of = {part: name for name, (parts, _) in self.stacks.items() for part in parts}

    def packed_bytes(self) -> dict[str, int]:
        """Bytes of each packed matrix, by the model's name (an expert's slice of a stack by its slice name)."""
        sizes = {self.packed[t.name][0]: int(t.n_bytes) for t in self._reader.tensors if t.name in self.packed}
        tensors = {t.name: t for t in self._reader.tensors}
        for name, (parts, _) in self.stacks.items():
            experts = int(tensors[parts[0]].shape[2])
            each = sum(int(tensors[part].n_bytes) for part in parts) // experts
            sizes.update({expert_slice(name, e): each for e in range(experts)})
        return sizes

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | PackedMatrix]]:
        from gguf import dequantize

        parts: dict[str, np.ndarray] = {}  # a stack's parts read so far (memory-mapped)
        for tensor in self._reader.tensors:
            if tensor.name in self._stack_of:
                name = self._stack_of[tensor.name]
                parts[tensor.name] = np.asarray(tensor.data).reshape(int(tensor.shape[2]), int(tensor.shape[1]), -1)
                names, order = self.stacks[name]
                if all(part in parts for part in names):
                    columns = int(tensor.shape[0])
                    yield {name: PackedStack(tensor.tensor_type.name, tuple(parts.pop(part) for part in names),
                                             order, (order.size, columns))}
                continue
            if tensor.name in self.packed:
                name, format, order = self.packed[tensor.name]
                rows = order.size
                data = np.ascontiguousarray(np.asarray(tensor.data).reshape(rows, -1)[order])
                yield {name: PackedMatrix(format, torch.from_numpy(data).reshape(-1),
                                          (rows, int(tensor.shape[0])))}
                continue
            result = self._processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                             tensor_key_mapping=self._names, parsed_parameters=self._parsed)
            if result.name in self._names:
                yield {self._names[result.name]: torch.from_numpy(np.copy(result.weights))}
        if self._parsed["tensors"]:  # what a processor gathered itself (a mixture-of-experts layer's experts)
            yield self._parsed["tensors"]

    def _packable(self, tensor: Any, matrices: frozenset[str],
                  shapes: dict[str, tuple[int, ...]]) -> tuple[str, str, np.ndarray] | None:
        """(model name, format, row order) for a tensor that can stay packed, else None."""
        format = tensor.tensor_type.name
        if format not in BLOCKS or len(tensor.shape) != 2:
            return None
        rows, cols = int(tensor.shape[1]), int(tensor.shape[0])  # GGUF lists dimensions innermost first
        order = _row_order(self._processor, tensor.name, rows, self._names, self._parsed)
        if order is None or order[0] not in matrices or shapes.get(order[0]) != (rows, cols):
            return None
        return order[0], format, order[1]


def _row_order(processor: Any, gguf_name: str, rows: int, names: dict[str, str],
               parsed: dict[str, Any]) -> tuple[str, np.ndarray] | None:
    """The model's name for `gguf_name` and the order of its rows, when the processor does nothing else to it."""
    probe = np.arange(rows, dtype=np.float64)[:, None]
    scratch = _scratch(parsed)
    try:
        result = processor.process(weights=probe, name=gguf_name, tensor_key_mapping=names, parsed_parameters=scratch)
    except Exception:  # a processor that needs the real values or shape: dequantize this one
        return None
    if result.name not in names or scratch["tensors"] or np.shape(result.weights) != (rows, 1):
        return None
    perm = np.asarray(result.weights)[:, 0]
    if not np.array_equal(np.sort(perm), probe[:, 0]):
        return None
    return names[result.name], perm.astype(np.int64)


def _scratch(parsed: dict[str, Any]) -> dict[str, Any]:
    """What the processor is given for a probe: the parsed fields with tensors and config of its own (no side
    effects on the real ones)."""
    return {**parsed, "tensors": {}, "config": copy.deepcopy(parsed["config"])}


def has_quantized_stacks(path: str) -> bool:
    """Whether a GGUF file holds expert stacks in a block format tierstore reads (its header only)."""
    from gguf import GGUFReader

    return bool(_quantized_stacks(GGUFReader(path)))


def _quantized_stacks(reader: Any) -> list[Any]:
    """The file's 3-D tensors (a mixture-of-experts layer's expert stacks) in a block format tierstore reads."""
    return [t for t in reader.tensors if len(t.shape) == 3 and t.tensor_type.name in BLOCKS]


def _packable_stacks(reader: Any, processor: Any, names: dict[str, str], parsed: dict[str, Any],
                     matrices: frozenset[str], shapes: dict[str, tuple[int, ...]],
                     ) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """The fused experts tensors whose parts (3-D expert stacks in one ggml format) can stay packed: model name
    -> (the parts' gguf names, the row order of one expert's matrix over its parts' rows stacked)."""
    by_model: dict[str, list[Any]] = {}
    for tensor in _quantized_stacks(reader):
        target = _gathered_into(processor, tensor, names, parsed)
        if target is not None and expert_slice(target, 0) in matrices:
            by_model.setdefault(target, []).append(tensor)
    found = {}
    for name, parts in by_model.items():
        order = _stack_order(processor, parts, names, parsed, shapes.get(name))
        if order is not None:
            found[name] = (tuple(part.name for part in parts), order)
    return found


def _gathered_into(processor: Any, tensor: Any, names: dict[str, str], parsed: dict[str, Any]) -> str | None:
    """The model tensor the processor gathers a 3-D stack into (a scratch run on zeros of one column), or None."""
    scratch = _scratch(parsed)
    experts, rows = int(tensor.shape[2]), int(tensor.shape[1])
    try:
        processor.process(weights=np.zeros((experts, rows, 1)), name=tensor.name, tensor_key_mapping=names,
                          parsed_parameters=scratch)
    except Exception:  # a processor that needs the real values or shape: dequantize this one
        return None
    gathered = list(scratch["tensors"])
    return gathered[0] if len(gathered) == 1 else None


def _stack_order(processor: Any, parts: list[Any], names: dict[str, str], parsed: dict[str, Any],
                 shape: tuple[int, ...] | None) -> np.ndarray | None:
    """The rows of one expert's matrix as indices into its parts' rows stacked, found by running the processor on
    every part's (part, expert, row) numbers; None unless the parts share a format and shape, each expert's
    matrix is made of whole rows of its own slices, the same way for every expert, and has the model's shape."""
    first = parts[0]
    if any(p.tensor_type != first.tensor_type or tuple(p.shape) != tuple(first.shape) for p in parts):
        return None
    columns, rows, experts = (int(n) for n in first.shape)
    scratch = _scratch(parsed)
    span = experts * rows
    try:
        for index, part in enumerate(parts):
            probe = 1.0 + index * span + np.arange(span, dtype=np.float64).reshape(experts, rows, 1)
            processor.process(weights=probe, name=part.name, tensor_key_mapping=names, parsed_parameters=scratch)
    except Exception:
        return None
    gathered = list(scratch["tensors"].values())
    if len(gathered) != 1:
        return None
    values = np.asarray(gathered[0], dtype=np.float64)
    if values.ndim != 3 or values.shape[0] != experts or values.shape[2] != 1 \
            or shape != (experts, values.shape[1], columns):
        return None
    code = values[:, :, 0].astype(np.int64) - 1  # part * span + expert * rows + row; -1 where nothing was written
    if (code < 0).any():
        return None
    part, expert, row = code // span, code % span // rows, code % rows
    if not (expert == np.arange(experts)[:, None]).all():
        return None
    order = part * rows + row
    if not (order == order[0]).all() or np.unique(order[0]).size != order[0].size:
        return None
    return order[0]
