"""Reading units in place from safetensors shards: no second copy of the model on disk."""
from __future__ import annotations

import os
import threading
from collections.abc import Hashable, Mapping, Sequence

import torch

from ..errors import CheckpointError
from ..units import UnitLayout, require_tensors
from .layerstore import pread_exact
from .safetensors_header import TensorEntry


class SafetensorsSource:
    """Units gathered from tensors of one or more safetensors files, converted to the compute dtype on read."""

    def __init__(self, entries: Mapping[str, TensorEntry], units: Mapping[str, Sequence[str]],
                 dtype: torch.dtype, drop_page_cache: bool = False) -> None:
        self._entries = entries
        self.drop_page_cache = drop_page_cache
        # O_DIRECT needs block-aligned offsets, and a safetensors tensor starts wherever its header says.
        self.read_mode = "posix_fadvise(DONTNEED); in-place safetensors are not block-aligned for O_DIRECT" \
            if drop_page_cache else "page cache"
        self._layouts: dict[str, UnitLayout] = {}
        for key, names in units.items():
            require_tensors(key, names, entries, "the checkpoint")
            self._layouts[key] = UnitLayout.pack(key, {
                name: (dtype if entries[name].dtype.is_floating_point else entries[name].dtype, entries[name].shape)
                for name in names})
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()

    def layout(self, key: Hashable) -> UnitLayout:
        """The unit's layout in the compute dtype."""
        return self._layouts[key]

    def read_into(self, key: Hashable, out: torch.Tensor) -> None:
        """Read each tensor of the unit straight into its slot (converting dtype where the file differs)."""
        layout = self._layouts[key]
        for name, slot in layout.slots.items():
            entry = self._entries[name]
            target = out[slot.offset:slot.offset + slot.nbytes]
            if entry.dtype == slot.dtype:
                self._pread(entry, target)
            else:
                raw = torch.empty(entry.end - entry.start, dtype=torch.uint8)
                self._pread(entry, raw)
                target.view(slot.dtype).copy_(raw.view(entry.dtype).view(-1))

    def _pread(self, entry: TensorEntry, out: torch.Tensor) -> None:
        fd = self._fd(entry.path)
        try:
            pread_exact(fd, memoryview(out.numpy()), entry.start, entry.path)
            if self.drop_page_cache:  # the host tier holds these bytes; the page cache must not as well
                os.posix_fadvise(fd, entry.start, entry.end - entry.start, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise CheckpointError(f"{entry.path}: cannot read: {exc.strerror or exc}") from exc

    def _fd(self, path: str) -> int:
        with self._fd_lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        """Close the shard files."""
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
