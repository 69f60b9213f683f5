"""Moving bytes between host and device: buffers, the copy, and the fences that order it against compute.

On a CPU the device tier is the compute's working set in RAM and a copy is a memcpy. On CUDA the host tier is
pinned, copies run on a dedicated stream, compute waits on an event (never a device-wide synchronize), and a
device buffer is overwritten only after the compute that read it has finished.
"""
from __future__ import annotations

import torch

Fence = "torch.cuda.Event | None"


class CPUTransfer:
    """Host and device are both RAM; copies are synchronous memcpys."""

    pinned = False

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def allocate_host(self, nbytes: int) -> torch.Tensor:
        """A host buffer of `nbytes`."""
        return torch.empty(nbytes, dtype=torch.uint8)

    def allocate_device(self, nbytes: int) -> torch.Tensor:
        """A device buffer of `nbytes`."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, dst_free_after: object) -> object:
        """Copy `src` into `dst` (once `dst_free_after` has passed); returns a fence that marks it done."""
        dst.copy_(src)
        return None

    def wait_on_compute(self, fence: object) -> None:
        """Make the compute stream wait for `fence` before it reads the copied bytes."""

    def wait_on_host(self, fence: object) -> None:
        """Block this (background) thread until `fence` has passed."""

    def compute_fence(self) -> object:
        """A fence after everything the compute stream has queued so far."""
        return None


class CUDATransfer:
    """Pinned host buffers, a copy stream, and events in both directions."""

    def __init__(self, device: torch.device, pinned: bool = True) -> None:
        self.device = device
        self.pinned = pinned
        self.stream = torch.cuda.Stream(device=device)

    def allocate_host(self, nbytes: int) -> torch.Tensor:
        """A host buffer, pinned when configured (allocated rarely: the store reuses buffers)."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def allocate_device(self, nbytes: int) -> torch.Tensor:
        """A device buffer of `nbytes`."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, dst_free_after: object) -> object:
        """Queue the copy on the copy stream after `dst_free_after`; returns its completion event."""
        with torch.cuda.stream(self.stream):
            if dst_free_after is not None:
                self.stream.wait_event(dst_free_after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def wait_on_compute(self, fence: object) -> None:
        """Make the current (compute) stream wait for the copy, without blocking the host."""
        if fence is not None:
            torch.cuda.current_stream(self.device).wait_event(fence)

    def wait_on_host(self, fence: object) -> None:
        """Block this (background) thread until `fence` has passed; used before reusing a host buffer."""
        if fence is not None:
            fence.synchronize()

    def compute_fence(self) -> object:
        """An event after the work queued so far on the compute stream."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


def make_transfer(device: torch.device, pinned: bool) -> CPUTransfer | CUDATransfer:
    """The transfer backend for a compute device."""
    return CUDATransfer(device, pinned) if device.type == "cuda" else CPUTransfer()
