"""Measuring this machine: host-to-device GB/s (pinned and pageable), the GPU memory's GB/s, disk GB/s past the
page cache as the store's parallel readers see it, the CPU's rate at an expert's linear layers (weight bytes per
second, at 1 and 32 tokens), free memory.

Results are cached as JSON in the cache directory; the planner reads them to predict time per pass.
"""
from __future__ import annotations

import json
import mmap
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .budget import Budget
from .files import PAGE_BYTES, write_atomic

PROBE_FILE = "probe.json"
DISK_UNIT_BYTES = 200 * 2**20  # about a 7B model's decoder layer in fp16


def load_probe(cache_dir: str) -> dict[str, float] | None:
    """The cached probe of this machine, if one was run."""
    try:
        with open(os.path.join(cache_dir, PROBE_FILE), encoding="utf-8") as handle:
            data = json.load(handle)
        return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}
    except (OSError, ValueError):
        return None


def h2d_gbps(device: torch.device, pinned: bool, nbytes: int, repeats: int = 5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned and device.type == "cuda")
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / _copy_s(dst, src, device, pinned, repeats) / 1e9


def hbm_gbps(device: torch.device, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """The device memory's GB/s as a copy within it sees it (each byte read once and written once): what a pass
    whose weights stay on the device is bound by."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    return 2 * nbytes / _copy_s(torch.empty_like(src), src, device, False, repeats) / 1e9


def _copy_s(dst: torch.Tensor, src: torch.Tensor, device: torch.device, non_blocking: bool, repeats: int) -> float:
    """The median seconds of `repeats` copies of `src` into `dst`, each waited for, after one to warm up."""
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src, non_blocking=non_blocking)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def cpu_linear_gbps(tokens: int, dtype: torch.dtype, rows: int = 4096, cols: int = 1024,
                    total_bytes: int = 512 * 2**20) -> float:
    """Weight bytes per second of torch's CPU `linear` over `tokens` tokens and (rows, cols) matrices of `dtype`
    (8 MB in bf16, about an expert's matrix), with torch's threads: what computing an expert on the host costs.
    Each call reads another matrix of `total_bytes` of them, more than a CPU cache holds, as experts come from
    RAM (a matrix read again from the cache would run several times faster than any expert does)."""
    matrix_bytes = rows * cols * dtype.itemsize
    weights = torch.full((max(2, total_bytes // matrix_bytes), rows, cols), 0.01, dtype=dtype)
    inputs = torch.full((tokens, cols), 0.5, dtype=dtype)
    torch.nn.functional.linear(inputs, weights[0])
    start = time.perf_counter()
    for weight in weights:
        torch.nn.functional.linear(inputs, weight)
    return weights.numel() * dtype.itemsize / (time.perf_counter() - start) / 1e9


def _disk_gbps(directory: str, nbytes: int, threads: int, unit_bytes: int) -> float:
    """What the store's readers get: `threads` threads reading `unit_bytes` units in parallel, past the page cache
    (O_DIRECT where the file system takes it, as layer stores are read on a GPU; else after dropping the pages)."""
    os.makedirs(directory, exist_ok=True)
    unit_bytes = max(PAGE_BYTES, unit_bytes // PAGE_BYTES * PAGE_BYTES)
    units = max(threads, nbytes // unit_bytes)
    block = os.urandom(1 << 20) * 16
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-") as handle:
        written = 0
        while written < units * unit_bytes:
            written += handle.write(block[:units * unit_bytes - written])
        handle.flush()
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            fd = os.open(handle.name, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:  # no O_DIRECT on this file system: the pages were dropped above
            fd = os.open(handle.name, os.O_RDONLY)
        buffers: list[mmap.mmap] = []
        local = threading.local()

        def read(index: int) -> None:
            if not hasattr(local, "buffer"):  # one page-aligned buffer per reader, as O_DIRECT needs
                local.buffer = mmap.mmap(-1, unit_bytes)
                buffers.append(local.buffer)
            view = memoryview(local.buffer)
            offset = index * unit_bytes
            while view:
                got = os.preadv(fd, [view], offset)
                if got <= 0:
                    raise OSError(f"probe file ended at byte {offset}")
                view, offset = view[got:], offset + got

        try:
            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(read, range(units)))
            elapsed = time.perf_counter() - start
        finally:
            os.close(fd)
            for buffer in buffers:
                buffer.close()
        return units * unit_bytes / elapsed / 1e9


def run_probe(cache_dir: str, device: torch.device, nbytes: int = 256 * 2**20, disk_nbytes: int = 1024 * 2**20,
              reader_threads: int = 4, unit_bytes: int = DISK_UNIT_BYTES) -> dict[str, float]:
    """Measure, cache under `cache_dir`, and return the numbers. The disk is read as the store reads it:
    `reader_threads` (io.reader_threads) in parallel, `unit_bytes` at a time."""
    measured = Budget.measure(cache_dir)
    result: dict[str, float] = {
        "free_vram_bytes": float(measured.vram or 0),
        "free_ram_bytes": float(measured.ram or 0),
        "free_disk_bytes": float(measured.disk or 0),
        "h2d_pinned_gbps": h2d_gbps(device, True, nbytes),
        "h2d_gbps": h2d_gbps(device, False, nbytes),
        "cpu_linear_gbps": cpu_linear_gbps(1, torch.bfloat16),
        "cpu_linear_gbps_32": cpu_linear_gbps(32, torch.bfloat16),
        "disk_gbps": _disk_gbps(cache_dir, disk_nbytes, reader_threads, unit_bytes),
        "disk_reader_threads": float(reader_threads),
        "disk_unit_bytes": float(unit_bytes),
    }
    if device.type == "cuda":
        result["hbm_gbps"] = hbm_gbps(device, nbytes)  # several times a GPU's L2 (H100: 50 MB)
    os.makedirs(cache_dir, exist_ok=True)
    write_atomic(os.path.join(cache_dir, PROBE_FILE), json.dumps(result, indent=1).encode())
    return result
