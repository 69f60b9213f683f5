"""Tensors parked on disk between the pass that makes them and the write that uses them.

GPTQ rounds every matrix while the calibration text runs through the model, long before the store's units are
written, and its blocks for a whole model are the store's size: 39 GB for a 70B model in q4_k, five times that for
mixed formats, which round every matrix in each candidate. So they wait here, one file each, in a folder of the store
being written, and are read back (checked against the hash taken when they were written) as each unit is written.
Small tensors (the measured errors) stay in memory.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping

import numpy as np
import torch
import xxhash

from ...errors import CheckpointError
from ...files import write_atomic

SPILL_BYTES = 1 << 16  # tensors at least this large go to disk


class SpilledTensors(MutableMapping[str, torch.Tensor]):
    """A mapping of names to CPU tensors whose large ones live as files in `directory` (made if missing)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._memory: dict[str, torch.Tensor] = {}
        self._files: dict[str, tuple[str, torch.dtype, tuple[int, ...], str]] = {}  # path, dtype, shape, hash
        self._written = 0

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self.pop(name, None)
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel() * tensor.element_size() < SPILL_BYTES:
            self._memory[name] = tensor
            return
        raw = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        path = os.path.join(self.directory, f"{self._written:06d}.bin")
        self._written += 1
        write_atomic(path, raw)
        self._files[name] = (path, tensor.dtype, tuple(tensor.shape), xxhash.xxh3_128_hexdigest(raw))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._memory:
            return self._memory[name]
        path, dtype, shape, digest = self._files[name]
        try:
            raw = np.fromfile(path, dtype=np.uint8)
        except OSError as exc:
            raise CheckpointError(f"{path}: the parked tensor {name!r} cannot be read back ({exc.strerror}); "
                                  f"write the store again") from exc
        if xxhash.xxh3_128_hexdigest(memoryview(raw)) != digest:
            raise CheckpointError(f"{path}: the parked tensor {name!r} changed on disk since it was written "
                                  f"({raw.size} bytes); write the store again")
        return torch.from_numpy(raw).view(dtype).view(shape)

    def __delitem__(self, name: str) -> None:
        if name in self._memory:
            del self._memory[name]
            return
        path = self._files.pop(name)[0]
        os.unlink(path)

    def __contains__(self, name: object) -> bool:
        return name in self._memory or name in self._files

    def __iter__(self) -> Iterator[str]:
        yield from self._memory
        yield from self._files

    def __len__(self) -> int:
        return len(self._memory) + len(self._files)
