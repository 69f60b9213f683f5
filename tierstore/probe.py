"""Measuring this machine: host-to-device GB/s (pinned and pageable), disk GB/s past the page cache, free memory.

Results are cached as JSON in the cache directory; the planner reads them to predict time per pass.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import torch

from .budget import Budget
from .files import write_atomic

PROBE_FILE = "probe.json"


def load_probe(cache_dir: str) -> dict[str, float] | None:
    """The cached probe of this machine, if one was run."""
    try:
        with open(os.path.join(cache_dir, PROBE_FILE), encoding="utf-8") as handle:
            data = json.load(handle)
        return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}
    except (OSError, ValueError):
        return None


def _h2d_gbps(device: torch.device, pinned: bool, nbytes: int, repeats: int = 5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned and device.type == "cuda")
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src, non_blocking=pinned)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return nbytes / sorted(times)[len(times) // 2] / 1e9


def _disk_gbps(directory: str, nbytes: int) -> float:
    """Write a file, drop it from the page cache, time reading it back."""
    os.makedirs(directory, exist_ok=True)
    block = os.urandom(1 << 20) * 16
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-") as handle:
        for _ in range(max(1, nbytes // len(block))):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
        size = os.fstat(handle.fileno()).st_size
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buffer = bytearray(16 << 20)
        view = memoryview(buffer)
        start = time.perf_counter()
        with open(handle.name, "rb", buffering=0) as reader:
            while reader.readinto(view):
                pass
        return size / (time.perf_counter() - start) / 1e9


def run_probe(cache_dir: str, device: torch.device, nbytes: int = 256 * 2**20,
              disk_nbytes: int = 512 * 2**20) -> dict[str, float]:
    """Measure, cache under `cache_dir`, and return the numbers."""
    measured = Budget.measure(cache_dir)
    result: dict[str, float] = {
        "free_vram_bytes": float(measured.vram or 0),
        "free_ram_bytes": float(measured.ram or 0),
        "free_disk_bytes": float(measured.disk or 0),
        "h2d_pinned_gbps": _h2d_gbps(device, True, nbytes),
        "h2d_gbps": _h2d_gbps(device, False, nbytes),
        "disk_gbps": _disk_gbps(cache_dir, disk_nbytes),
    }
    os.makedirs(cache_dir, exist_ok=True)
    write_atomic(os.path.join(cache_dir, PROBE_FILE), json.dumps(result, indent=1).encode())
    return result
