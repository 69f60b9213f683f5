"""A GGUF file read tensor by tensor, its decoder layers' quantized matrices kept in their file's block formats.

transformers' GGUF loader dequantizes every tensor to float32 and then applies its architecture's tensor processor
(renaming, and for llama-family attention a reordering of the query and key rows). Here the same processor and name
map are used, tensor by tensor, so that one tensor at a time is in memory. A quantized 2-D matrix of a decoder layer
in a format ggml.py reads is kept packed when the processor only reorders its rows: that is found by running the
processor on the row numbers, and the packed rows (each row is whole blocks) are reordered the same way. Anything
else (embeddings, norms, expert stacks, a processor that changes values) is dequantized as transformers does it.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ...ggml import BLOCKS
from .skeleton import Skeleton


@dataclasses.dataclass(frozen=True)
class PackedMatrix:
    """A matrix in a ggml block format: its bytes (rows in the model's order) and its shape in the model."""

    format: str
    data: torch.Tensor  # uint8, 1-D
    shape: tuple[int, int]


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

    def packed_bytes(self) -> dict[str, int]:
        """Bytes of each packed matrix, by the model's name."""
        return {self.packed[t.name][0]: int(t.n_bytes) for t in self._reader.tensors if t.name in self.packed}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | PackedMatrix]]:
        from gguf import dequantize

        for tensor in self._reader.tensors:
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
    scratch = {**parsed, "tensors": {}, "config": copy.deepcopy(parsed["config"])}  # no side effects on the real one
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
