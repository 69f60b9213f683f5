"""Moving bytes between host and device: buffers, the copy, and the fences that order it against compute.

On a CPU the device tier is the compute's working set in RAM and a copy is a memcpy. On CUDA the host tier is
pinned, copies run on a dedicated stream, compute waits on an event (never a device-wide synchronize), and a
device buffer is overwritten only after the compute that read it has finished. Pinned RAM can also be read in
place by the GPU's kernels (`mapped_view`).
"""
from __future__ import annotations

import ctypes
import logging
import time

import numpy
import torch

from .files import PAGE_BYTES
from .units import align

log = logging.getLogger(__name__)


class CPUTransfer:
    """Host and device are both RAM; copies are synchronous memcpys."""

    pinned = False
    setup_s = 0.0

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def allocate_host(self, nbytes: int) -> torch.Tensor:
        """A page-aligned host buffer of `nbytes` (so that O_DIRECT can read into it)."""
        return page_aligned(nbytes)

    def free_host(self, buffer: torch.Tensor) -> None:
        """A host buffer the store no longer keeps (freed with its last reference)."""

    def free_device(self, buffer: torch.Tensor) -> None:
        """A device buffer the store no longer keeps (freed with its last reference)."""

    def allocate_device(self, nbytes: int) -> torch.Tensor:
        """A device buffer of `nbytes`."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, dst_free_after: object) -> tuple[object, object]:
        """Copy `src` into `dst` (once `dst_free_after` has passed); returns (fence marking it done, timer): the
        timer is the copy's (start, end) in `perf_counter` seconds."""
        start_s = time.perf_counter()
        dst.copy_(src)
        return None, (start_s, time.perf_counter())

    def done(self, fence: object) -> bool:
        """Whether the copy behind `fence` has finished (CPU copies finish before `copy` returns)."""
        return True

    def elapsed_s(self, timer: object) -> float:
        """Seconds the copy took."""
        start_s, end_s = timer  # type: ignore[misc]
        return end_s - start_s

    def wait_on_compute(self, fence: object) -> None:
        """Make the compute stream wait for `fence` before it reads the copied bytes."""

    def wait_on_host(self, fence: object) -> None:
        """Block the calling thread until `fence` has passed (CPU copies are done when they return)."""

    def compute_fence(self) -> object:
        """A fence after everything the compute stream has queued so far."""
        return None


class FirstFit:
    """Free byte ranges of one allocation: `take` carves the first range a request fits, `give` returns a range
    and merges it with its free neighbours, so that buffers let go of are used again, by units of any size. Each
    change is one assignment, so an interrupt between two bytecodes leaves the ranges whole."""

    def __init__(self, capacity_bytes: int) -> None:
        self._free: list[tuple[int, int]] = [(0, capacity_bytes)] if capacity_bytes > 0 else []  # (start, size)

    def take(self, nbytes: int) -> int | None:
        """The start of `nbytes` taken from the first free range that holds them, or None."""
        for index, (start, size) in enumerate(self._free):
            if size >= nbytes:
                rest = [(start + nbytes, size - nbytes)] if size > nbytes else []
                self._free = self._free[:index] + rest + self._free[index + 1:]
                return start
        return None

    def give(self, start: int, nbytes: int) -> None:
        """Return `nbytes` at `start`, taken before."""
        merged: list[tuple[int, int]] = []
        for begin, size in sorted([*self._free, (start, nbytes)]):
            if merged and merged[-1][0] + merged[-1][1] == begin:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((begin, size))
        self._free = merged

    @property
    def free_bytes(self) -> int:
        return sum(size for _, size in self._free)


class Arena:
    """One page-aligned host allocation carved into unit buffers; a buffer the store's pool lets go of comes back
    here, so the host tier never takes more than the arena."""

    def __init__(self, capacity_bytes: int) -> None:
        capacity_bytes = align(capacity_bytes, PAGE_BYTES)
        self.buffer = page_aligned(capacity_bytes)
        self._ranges = FirstFit(capacity_bytes)

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A page-aligned piece of `nbytes`, or None when no free range holds it."""
        start = self._ranges.take(align(nbytes, PAGE_BYTES))
        return None if start is None else self.buffer[start:start + nbytes]

    def give(self, piece: torch.Tensor) -> None:
        """Take back a piece `take` gave; a buffer that is not part of this arena (pinned on its own) is ignored."""
        start = piece.data_ptr() - self.buffer.data_ptr()
        if 0 <= start < self.buffer.numel():
            self._ranges.give(start, align(piece.numel(), PAGE_BYTES))

    def release(self) -> None:
        """Before the buffer is freed (a pinned arena unpins it)."""


class PinnedArena(Arena):
    """The arena page-locked once with cudaHostRegister (~0.06 s/GiB, against ~0.76 s/GiB for `pin_memory()`)."""

    def __init__(self, capacity_bytes: int) -> None:
        start_s = time.perf_counter()
        super().__init__(capacity_bytes)
        self.registered = capacity_bytes > 0 and host_register(self.buffer)
        self.pin_s = time.perf_counter() - start_s

    def release(self) -> None:
        """Unpin (before the buffer is freed)."""
        if self.registered:
            host_unregister(self.buffer)
            self.registered = False


def page_aligned(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of `nbytes` starting on a page boundary."""
    raw = torch.empty(nbytes + PAGE_BYTES, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE_BYTES
    return raw[start:start + nbytes]


def host_register(buffer: torch.Tensor) -> bool:
    """Page-lock a CPU buffer for the GPU (and map it into its address space); False, logged, when refused."""
    result = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    code = getattr(result, "value", result)
    if code != 0:
        log.warning("cudaHostRegister of %d bytes failed (error %s); host tier falls back to per-buffer pinning",
                    buffer.numel(), code)
        return False
    return True


def host_unregister(buffer: torch.Tensor) -> None:
    """Undo `host_register` (before the buffer is freed)."""
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


_WORDS = {1: ("|u1", ctypes.c_uint8), 2: ("<i2", ctypes.c_int16), 4: ("<i4", ctypes.c_int32),
          8: ("<i8", ctypes.c_int64)}  # an integer type of each item size, as array interfaces spell them


class _DeviceArray:
    """`__cuda_array_interface__` for memory at an address: how torch makes a CUDA tensor of it."""

    def __init__(self, address: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (address, False),
                                         "version": 2, "strides": None}


def mapped_view(address: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The memory at `address` (page-locked RAM or the device's own) as a contiguous tensor of `shape` and `dtype`
    on `device`, owning nothing: whatever lives there must outlive it. On a GPU, unified addressing maps
    page-locked RAM into the device's address space, so its kernels read those bytes in place, over the link, at
    about the copy engine's rate (benchmarks/mapped_read.py)."""
    typestr, word = _WORDS[dtype.itemsize]
    if device.type == "cuda":
        raw = torch.as_tensor(_DeviceArray(address, shape, typestr), device=device)
    else:
        raw = torch.from_numpy(numpy.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(word)), shape=shape))
    return raw.view(dtype)


class CUDATransfer:
    """Pinned host buffers, a copy stream, and events in both directions."""

    def __init__(self, device: torch.device, pinned: bool = True, host_capacity_bytes: int = 0) -> None:
        self.device = device
        self.pinned = pinned
        self.stream = torch.cuda.Stream(device=device)
        self.arena = PinnedArena(host_capacity_bytes) if pinned and host_capacity_bytes else None
        self.setup_s = self.arena.pin_s if self.arena else 0.0
        self._let_go = False  # the device pool let buffers go since the last allocation
        self._waited: object = None  # the last fence the copy stream was made to wait for

    def allocate_host(self, nbytes: int) -> torch.Tensor:
        """A host buffer: a piece of the pinned arena, or (arena used up) a buffer pinned on its own."""
        if self.arena is not None and self.arena.registered:
            piece = self.arena.take(nbytes)
            if piece is not None:
                return piece
            log.warning("the pinned arena has no free range of %d bytes; pinning a buffer on its own", nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def free_host(self, buffer: torch.Tensor) -> None:
        """A host buffer the store no longer keeps: a piece goes back to the arena (one pinned on its own is
        freed with its last reference)."""
        if self.arena is not None:
            self.arena.give(buffer)

    def free_device(self, buffer: torch.Tensor) -> None:
        """A device buffer the store's pool let go of, to make room for one of another size (a 72B model's 2.5 GB
        output layer after its 0.5 GB layers, and back): PyTorch's allocator would keep its bytes cached for that
        size, so they go back to the device before the next allocation."""
        self._let_go = True

    def allocate_device(self, nbytes: int) -> torch.Tensor:
        """A device buffer of `nbytes`; after the pool let buffers go, the device holds the budget, not the budget
        plus a cache of the wrong sizes (one device synchronisation, at most a few times a pass)."""
        if self._let_go:
            torch.cuda.empty_cache()
            self._let_go = False
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, dst_free_after: object) -> tuple[object, object]:
        """Queue the copy on the copy stream after `dst_free_after`, without waiting for it.

        Copies queue back to back on the stream, so the link never idles between units while Python runs.
        Returns (completion event, (start, end) timing events).
        """
        with torch.cuda.stream(self.stream):
            if dst_free_after is not None and dst_free_after is not self._waited:  # the stream runs in order:
                self.stream.wait_event(dst_free_after)  # once it has waited for a fence, every later copy has
                self._waited = dst_free_after
            start = torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event(enable_timing=True)
            done.record(self.stream)
        return done, (start, done)

    def done(self, fence: object) -> bool:
        """Whether the copy behind `fence` has finished; never blocks."""
        return fence is None or fence.query()  # type: ignore[attr-defined]

    def elapsed_s(self, timer: object) -> float:
        """Seconds the copy occupied the copy stream (both events have completed)."""
        start, end = timer  # type: ignore[misc]
        return start.elapsed_time(end) / 1e3

    def wait_on_compute(self, fence: object) -> None:
        """Make the current (compute) stream wait for the copy, without blocking the host."""
        if fence is not None:
            torch.cuda.current_stream(self.device).wait_event(fence)

    def wait_on_host(self, fence: object) -> None:
        """Block the calling thread until `fence` has passed; used before a host buffer may be reused."""
        if fence is not None:
            fence.synchronize()

    def compute_fence(self) -> object:
        """An event after the work queued so far on the compute stream."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


def make_transfer(device: torch.device, pinned: bool, host_capacity_bytes: int = 0) -> CPUTransfer | CUDATransfer:
    """The transfer backend for a compute device; on CUDA the host tier's arena is pinned here, once."""
    return CUDATransfer(device, pinned, host_capacity_bytes) if device.type == "cuda" else CPUTransfer()
