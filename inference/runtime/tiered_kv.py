"""The KV cache as a tier beside the weights: each full-attention layer's keys and values live on the device, in
host RAM (pinned on a GPU) or in a file on disk, as the planner placed them (`KVBudget.placement`).

A layer kept off the device is fetched into one of two device buffers a layer ahead of its use, on a stream of
its own, while the layer before it computes; the layer after that is read from disk into a pinned bounce buffer
two layers ahead. Only a pass's new rows go back (to RAM, or through a pinned staging buffer to the file), so a
decode pass moves each offloaded layer's keys and values across the link once, not up and back as transformers'
offloaded cache does. Every buffer is laid out [batch, heads, capacity, head_dim] like a device cache, and each
(batch, head) row is copied as its own contiguous block: a strided copy between host and device would go
through a temporary and wait.

The disk files are unlinked as soon as they are opened, so a killed run leaves nothing. Reads, and writes of a
prompt's rows, drop their pages from the page cache so that RAM outside the budget does not hold them and a read
is the disk's (a decoded token's few rows stay cached until the kernel writes them). Writes run in order on one
thread; a layer's read runs in pieces on READ_THREADS threads (one read at a time waits on the disk's latency),
after the layer's last write. Sliding-window and other layer kinds stay as
transformers makes them, on the device. The cache serves one generate call: its rows do not change.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import tempfile
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ...errors import InputError
from ..loading.layerstore import pread_exact
from .reserved_cache import ReservedLayer

DEVICE_BUFFERS = 2  # an offloaded layer computing, and the next one fetched ahead
DROP_AFTER_BYTES = 2**20  # writes this large are synced and dropped from the page cache (a token's rows stay)
READ_THREADS = 8  # a disk layer is read in pieces this many at a time: one read at a time waits on the disk's latency
READ_PIECE_BYTES = 8 * 2**20


@dataclasses.dataclass
class KVTraffic:
    """Bytes an offloaded KV cache moved: host to device, device to host, read from and written to disk, and the
    passes that moved them (counted at the first offloaded layer)."""

    h2d_bytes: int = 0
    d2h_bytes: int = 0
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    passes: int = 0

    def since(self, before: KVTraffic) -> KVTraffic:
        """What was moved after `before` (an earlier copy of these counters)."""
        return KVTraffic(*(getattr(self, field.name) - getattr(before, field.name)
                           for field in dataclasses.fields(KVTraffic)))

    def per_pass(self) -> dict[str, int]:
        passes = max(self.passes, 1)
        return {"link_bytes_per_pass": (self.h2d_bytes + self.d2h_bytes) // passes,
                "disk_bytes_per_pass": (self.disk_read_bytes + self.disk_write_bytes) // passes}


class OffloadedLayer(DynamicLayer):
    """A full-attention layer whose tokens live in host RAM or on disk between its uses; `keys`/`values` are views
    of the device buffer it last ran in."""

    def __init__(self, tier: str, capacity_tokens: int) -> None:
        super().__init__()
        self.tier = tier
        self.capacity_tokens = capacity_tokens
        self.length = 0
        self.host: tuple[torch.Tensor, torch.Tensor] | None = None  # [batch * heads, capacity, head_dim] each
        self.fd: int | None = None  # the disk file: keys' rows, then values'
        self.shape: tuple[int, int, int] | None = None  # batch, heads, head_dim
        self.fetched_into: int | None = None  # the device buffer holding its tokens for its next update
        self.last_write: concurrent.futures.Future | None = None  # its rows' last write to the file, queued

    def get_seq_length(self) -> int:
        return self.length

    def row_bytes(self, element_bytes: int) -> int:
        """Bytes of one (batch, head) row of keys at full capacity, in the file."""
        return self.capacity_tokens * self.shape[2] * element_bytes

    def offset(self, value: bool, row: int, token: int, element_bytes: int) -> int:
        """Where (batch, head) row `row`'s token `token` of keys (or values) starts in the file."""
        batch, heads, head_dim = self.shape
        region = batch * heads * self.row_bytes(element_bytes) if value else 0
        return region + row * self.row_bytes(element_bytes) + token * head_dim * element_bytes

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _rows(tensor: torch.Tensor, start: int, end: int) -> Iterator[torch.Tensor]:
    """Each (batch, head) row's tokens `start:end` of a [batch, heads, tokens, head_dim] buffer: contiguous blocks."""
    flat = tensor.flatten(0, 1)
    for row in range(flat.shape[0]):
        yield flat[row, start:end]


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, for os.pwrite/os.preadv (any dtype, bfloat16 included)."""
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B")


class TieredKVCache(DynamicCache):
    """transformers' DynamicCache for `config` whose full-attention layers live where `tiers` says (one of
    "device", "host", "disk" per layer), with room for `capacity_tokens` per sequence; disk files in `disk_dir`."""

    def __init__(self, config: Any, tiers: tuple[str, ...], capacity_tokens: int, device: torch.device,
                 disk_dir: str | None = None) -> None:
        super().__init__(config=config)
        self.device = device
        self.capacity_tokens = capacity_tokens
        self.disk_dir = disk_dir
        self.order: list[int] = []  # the offloaded layers in the order a pass uses them
        for index, layer in enumerate(self.layers):
            if type(layer) is not DynamicLayer:
                continue
            tier = tiers[index] if index < len(tiers) else "device"
            if tier == "device":
                self.layers[index] = ReservedLayer(capacity_tokens)
            else:
                self.layers[index] = OffloadedLayer(tier, capacity_tokens)
                self.order.append(index)
        self._position = {index: position for position, index in enumerate(self.order)}
        on_disk = any(self.layers[index].tier == "disk" for index in self.order)
        if on_disk and disk_dir is None:
            raise InputError("a KV cache on disk needs a directory (runtime.kv_dir)")
        self.traffic = KVTraffic()
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.reader = concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="tierstore-kv-read") \
            if on_disk and self.cuda else None
        self.writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tierstore-kv-write") \
            if on_disk and self.cuda else None
        self._buffers: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._bounce: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # pinned, for disk reads
        self._bounce_free: list[torch.cuda.Event | None] = [None] * DEVICE_BUFFERS
        self._reads: dict[int, tuple[int, list[concurrent.futures.Future]]] = {}  # layer -> bounce buffer, reads
        self._staging: list[tuple[torch.Tensor, concurrent.futures.Future | None]] = []  # pinned rows for writes
        self._next_buffer = 0
        self._finalizer = weakref.finalize(self, _close, [self.layers[index] for index in self.order],
                                           [self.reader, self.writer])

    # the pass ------------------------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if not isinstance(layer, OffloadedLayer):
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == self.order[0]:
            self.traffic.passes += 1
        if not layer.is_initialized:
            self._open(layer, key_states)
        buffer = self._next_buffer
        self._next_buffer = 1 - buffer
        if layer.fetched_into != buffer:  # not fetched ahead (the first pass, or a pass begun elsewhere)
            self._fetch(layer_idx, buffer)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        keys, values = self._buffer(buffer, key_states)
        start, end = layer.length, layer.length + key_states.shape[-2]
        if end > layer.capacity_tokens:
            raise InputError(f"the KV cache was placed for {layer.capacity_tokens} tokens and this pass reaches {end}")
        keys[..., start:end, :].copy_(key_states)
        values[..., start:end, :].copy_(value_states)
        layer.length, layer.fetched_into = end, None
        self._write_back(layer, buffer, keys, values, start, end)
        position = self._position[layer_idx]
        following, after = (self.order[(position + step) % len(self.order)] for step in (1, 2))
        if following != layer_idx:
            if self.layers[after].tier == "disk" and after not in (following, layer_idx):
                self._start_read(after, buffer)  # before waiting on the next
            self._fetch(following, 1 - buffer)
        layer.keys, layer.values = keys[..., :end, :], values[..., :end, :]
        return layer.keys, layer.values

    def _open(self, layer: OffloadedLayer, key_states: torch.Tensor) -> None:
        """A layer's host buffers or disk file, made at its first update (when the batch and heads are known)."""
        batch, heads, _, head_dim = key_states.shape
        layer.shape = (batch, heads, head_dim)
        layer.is_initialized, layer.device = True, self.device
        layer.keys = layer.values = key_states.new_empty((batch, heads, 0, head_dim))
        if layer.tier == "host":
            layer.host = tuple(torch.empty((batch * heads, layer.capacity_tokens, head_dim), dtype=key_states.dtype,
                                           pin_memory=self.cuda) for _ in range(2))
            return
        os.makedirs(self.disk_dir, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=self.disk_dir, prefix=".tierstore-kv-")
        os.unlink(path)  # gone when closed, or when the process dies
        os.ftruncate(fd, 2 * batch * heads * layer.row_bytes(key_states.element_size()))
        layer.fd = fd

    def _buffer(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Device buffer `index` for layers shaped like `like` (made once, at full capacity)."""
        key = (*like.shape[:2], like.shape[3], like.dtype)
        if key not in self._buffers:
            shape = (*like.shape[:2], self.capacity_tokens, like.shape[3])
            self._buffers[key] = [(like.new_empty(shape), like.new_empty(shape)) for _ in range(DEVICE_BUFFERS)]
        return self._buffers[key][index]

    def _fetch(self, layer_idx: int, index: int) -> None:
        """Queue layer `layer_idx`'s tokens into device buffer `index` (on the cache's stream, after the compute
        queued so far has read that buffer)."""
        layer = self.layers[layer_idx]
        layer.fetched_into = index
        if not layer.length:
            return
        batch, heads, head_dim = layer.shape
        keys, values = self._buffer(index, layer.keys)
        bounce = None
        if layer.tier == "host":
            sources = layer.host
        elif self.cuda:
            bounce = self._read_result(layer_idx, index)
            sources = self._bounce_for(layer, bounce)
        else:  # on a CPU the file is read straight into the buffer
            self._read(layer, (keys.flatten(0, 1), values.flatten(0, 1)), layer.length)
            return
        with self._on_stream():
            for source, target in zip(sources, (keys, values)):
                for src, dst in zip(source, _rows(target, 0, layer.length)):
                    dst.copy_(src[:layer.length], non_blocking=True)
            self.traffic.h2d_bytes += 2 * batch * heads * layer.length * head_dim * keys.element_size()
            if bounce is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
                self._bounce_free[bounce] = event

    def _start_read(self, layer_idx: int, index: int) -> None:
        """Read a disk layer into bounce buffer `index` in pieces on the read threads, once the layer's last write
        and that buffer's last copy to the device are done."""
        layer = self.layers[layer_idx]
        if not self.cuda or not layer.length or layer_idx in self._reads:
            return
        bounce = self._bounce_for(layer, index)
        wrote, busy = layer.last_write, self._bounce_free[index]

        def read(view: memoryview, offset: int) -> None:
            if wrote is not None:
                wrote.result()
            if busy is not None:
                busy.synchronize()
            _read_piece(layer.fd, view, offset)

        pieces = _pieces(layer, bounce, layer.length)
        self._reads[layer_idx] = (index, [self.reader.submit(read, view, offset) for view, offset in pieces])
        self.traffic.disk_read_bytes += sum(len(view) for view, _ in pieces)

    def _read_result(self, layer_idx: int, index: int) -> int:
        """The bounce buffer holding layer `layer_idx`'s tokens (read into `index` now, if no read was started
        ahead)."""
        if layer_idx not in self._reads:
            self._start_read(layer_idx, index)
        bounce, reads = self._reads.pop(layer_idx)
        for read in reads:
            read.result()
        return bounce

    def _bounce_for(self, layer: OffloadedLayer, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, head_dim = layer.shape
        key = (batch, heads, head_dim, layer.keys.dtype)
        if key not in self._bounce:
            shape = (batch * heads, self.capacity_tokens, head_dim)
            self._bounce[key] = [tuple(torch.empty(shape, dtype=layer.keys.dtype, pin_memory=True) for _ in range(2))
                                 for _ in range(DEVICE_BUFFERS)]
        return self._bounce[key][index]

    def _read(self, layer: OffloadedLayer, targets: tuple[torch.Tensor, torch.Tensor], length: int) -> None:
        """Read `length` tokens of every row of `layer`'s file into `targets` ([rows, capacity, head_dim] each),
        here and now (a CPU's path)."""
        for view, offset in _pieces(layer, targets, length):
            _read_piece(layer.fd, view, offset)
            self.traffic.disk_read_bytes += len(view)

    def _write_back(self, layer: OffloadedLayer, index: int, keys: torch.Tensor, values: torch.Tensor,
                    start: int, end: int) -> None:
        """Queue this pass's new rows `start:end` from device buffer `index` to the layer's RAM or file."""
        if layer.tier == "host":
            with self._on_stream():
                for source, target in zip((keys, values), layer.host):
                    for src, dst in zip(_rows(source, start, end), target):
                        dst[start:end].copy_(src, non_blocking=True)
            self.traffic.d2h_bytes += 2 * keys.shape[0] * keys.shape[1] * (end - start) * keys.shape[3] * \
                keys.element_size()
            return
        if not self.cuda:
            self._write(layer, (keys.flatten(0, 1)[:, start:end], values.flatten(0, 1)[:, start:end]), start)
            return
        staging = self._staging_for(index, keys, end - start)
        with self._on_stream():
            for source, target in zip((keys, values), staging):
                for src, dst in zip(_rows(source, start, end), target):
                    dst[:end - start].copy_(src, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        self.traffic.d2h_bytes += 2 * staging[0].shape[0] * (end - start) * keys.shape[3] * keys.element_size()
        rows = tuple(part[:, :end - start] for part in staging)

        def write() -> None:
            copied.synchronize()
            self._write(layer, rows, start)

        layer.last_write = self.writer.submit(write)
        self._staging[index] = (self._staging[index][0], layer.last_write)

    def _staging_for(self, index: int, like: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pinned staging buffer `index` with room for `tokens` rows, once its last write has finished."""
        while len(self._staging) <= index:
            self._staging.append((None, None))
        buffers, pending = self._staging[index]
        if pending is not None:
            pending.result()
        rows = like.shape[0] * like.shape[1]
        if buffers is None or buffers[0].shape[1] < tokens or buffers[0].shape[0] != rows:
            shape = (rows, max(tokens, 1), like.shape[3])
            buffers = tuple(torch.empty(shape, dtype=like.dtype, pin_memory=True) for _ in range(2))
        self._staging[index] = (buffers, None)
        return buffers

    def _write(self, layer: OffloadedLayer, rows: tuple[torch.Tensor, torch.Tensor], start: int) -> None:
        """Write each (batch, head) row's tokens from `start` into `layer`'s file."""
        size = rows[0].element_size()
        for value, part in enumerate(rows):
            for row in range(part.shape[0]):
                view = _bytes_of(part[row].contiguous())
                offset = layer.offset(bool(value), row, start, size)
                done = 0
                while done < len(view):
                    done += os.pwrite(layer.fd, view[done:], offset + done)
        written = 2 * rows[0].numel() * size
        if written >= DROP_AFTER_BYTES:  # a prompt's rows: on the disk, out of the page cache, so reads are the disk's
            os.fdatasync(layer.fd)
            os.posix_fadvise(layer.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.traffic.disk_write_bytes += written

    def _on_stream(self) -> Any:
        """The cache's copy stream, after the compute queued so far (a no-op context on a CPU)."""
        if not self.cuda:
            return contextlib.nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.stream)

    # what transformers asks of a cache ----------------------------------------------------------------------

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a KV cache with layers in host RAM or on disk is not cropped")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a KV cache with layers in host RAM or on disk keeps its rows")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a KV cache with layers in host RAM or on disk keeps its rows")

    def settle(self) -> None:
        """Wait for every copy and write in flight."""
        if self.cuda:
            self.stream.synchronize()
        for _, pending in self._staging:
            if pending is not None:
                pending.result()

    def close(self) -> None:
        """Close the disk files and the I/O thread (also done when the cache is collected)."""
        self._finalizer()

    def tier_bytes(self) -> dict[str, int]:
        """Bytes each tier holds for this cache, at its full capacity."""
        held: dict[str, int] = {}
        for layer in self.layers:
            tier = getattr(layer, "tier", "device")
            keys = layer.keys if getattr(layer, "is_initialized", False) else None
            if keys is not None:
                per_token = 2 * keys.shape[0] * keys.shape[1] * keys.shape[3] * keys.element_size()
                held[tier] = held.get(tier, 0) + per_token * self.capacity_tokens
        return held


def _pieces(layer: OffloadedLayer, targets: tuple[torch.Tensor, torch.Tensor],
            length: int) -> list[tuple[memoryview, int]]:
    """The reads that bring `length` tokens of each row of `layer`'s file into `targets`: (buffer, file offset)
    pieces of at most READ_PIECE_BYTES."""
    size = targets[0].element_size()
    pieces = []
    for value, target in enumerate(targets):
        for row in range(target.shape[0]):
            view, offset = _bytes_of(target[row, :length]), layer.offset(bool(value), row, 0, size)
            pieces += [(view[begin:begin + READ_PIECE_BYTES], offset + begin)
                       for begin in range(0, len(view), READ_PIECE_BYTES)]
    return pieces


def _read_piece(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from the file at `offset`, then drop those pages from the page cache."""
    pread_exact(fd, view, offset, "a KV cache file")
    os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)


def _close(layers: list[OffloadedLayer], pools: list[concurrent.futures.ThreadPoolExecutor | None]) -> None:
    for pool in pools:
        if pool is not None:
            pool.shutdown(wait=True)
    for layer in layers:
        layer.close()
