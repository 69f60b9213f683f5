"""A unit: a named group of tensors (a decoder layer, the embeddings, ...) laid out in one aligned buffer.

Its byte size is exact and known before any byte is read, so tiers can reserve room first.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Container, Hashable, Iterable, Mapping
from typing import Protocol

import torch

from .errors import CheckpointError

ALIGN_BYTES = 256  # every tensor starts on a 256-byte boundary: valid views of any dtype, aligned DMA


def require_tensors(key: Hashable, wanted: Iterable[str], present: Container[str], where: str) -> None:
    """CheckpointError naming the first tensor of unit `key` that `where` does not hold."""
    missing = [name for name in wanted if name not in present]
    if missing:
        raise CheckpointError(f"{where}: unit {key!r} lacks tensor {missing[0]!r} ({len(missing)} missing)")


def align(nbytes: int, alignment: int = ALIGN_BYTES) -> int:
    """`nbytes` rounded up to a multiple of `alignment`."""
    return -(-nbytes // alignment) * alignment


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives inside its unit's buffer."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())


@dataclasses.dataclass(frozen=True)
class UnitLayout:
    """The tensors of one unit and the size of the buffer holding them."""

    key: str
    slots: Mapping[str, TensorSlot]
    nbytes: int

    @classmethod
    def pack(cls, key: str, tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> "UnitLayout":
        """Lay tensors out back to back, each aligned, in the order given."""
        slots: dict[str, TensorSlot] = {}
        offset = 0
        for name, (dtype, shape) in tensors.items():
            slots[name] = TensorSlot(offset, dtype, tuple(shape))
            offset = align(offset + slots[name].nbytes)
        return cls(key, slots, max(offset, ALIGN_BYTES))

    @functools.cached_property
    def places(self) -> tuple[TensorSlot, ...]:
        """Where its tensors lie, in order, hashable: units placed alike (a model's experts) view a buffer alike."""
        return tuple(self.slots.values())

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed tensors viewing `buffer` (uint8, at least `nbytes`), without copying."""
        return {name: buffer[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
                for name, s in self.slots.items()}


class UnitSource(Protocol):
    """The disk tier as the store sees it: a layout per unit and a way to fill a buffer with its bytes."""

    def layout(self, key: Hashable) -> UnitLayout: ...

    def read_into(self, key: Hashable, out: torch.Tensor) -> None:
        """Fill `out` (uint8, `layout(key).nbytes`) with the unit's verified bytes, or raise CheckpointError."""
        ...
