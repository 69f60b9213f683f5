"""Leaf helpers: the compute device a config names, and compute dtypes as users write them. Imports nothing from
tierstore but its errors, so that every wing may use it."""
from __future__ import annotations

import os

import torch

from ..errors import InputError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # what --dtype takes


def compute_device(setting: str) -> torch.device:
    """The compute device a config asks for; auto = the first GPU if there is one."""
    if setting == "auto":
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(setting)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"runtime.device = {setting!r} but this machine has no usable CUDA GPU")
        device = torch.device("cuda", device.index or 0) if device.type == "cuda" else device
    if device.type == "cuda":
        expandable_segments()
    return device


def expandable_segments() -> None:
    """Let PyTorch's CUDA allocator grow its segments in place, unless the user configured the allocator
    (PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF). A budget bounds what the process takes from the GPU, cache
    included, and fixed segments keep blocks of every size a long prompt's chunks and KV cache pass through: on an
    H200, a 7B model's 32,000-token prompt reserved 4.09 GB of a 4 GB budget with them and 3.82 GB without."""
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return
    # torch has no public call for it; this one (torch 2.9 on) is what the deprecated
    # torch.cuda.memory._set_allocator_settings calls
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is not None:
        setter("expandable_segments:True")


def give_back_cache(device: torch.device, budget_bytes: int, wanted_bytes: int) -> bool:
    """Before work that will allocate about `wanted_bytes` on `device`: when what the allocator holds plus that
    would pass `budget_bytes`, give its cached free blocks back first (a budget bounds what the process holds; the
    blocks an earlier, differently sized pass freed stay cached otherwise). Whether it did. Pages shared with live
    tensors stay held (benchmarks/RESULTS.md, twelfth session)."""
    if device.type != "cuda" or torch.cuda.memory_reserved(device) + wanted_bytes <= budget_bytes:
        return False
    torch.cuda.empty_cache()
    return True


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as users write it: "float16"."""
    return str(dtype).removeprefix("torch.")


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A compute dtype as users give it: a torch dtype, its name ("float16", "torch.float16"), or None."""
    if dtype is None or dtype in DTYPES.values():
        return dtype  # type: ignore[return-value]
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else dtype_name(dtype)
    if name not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; use {', '.join(DTYPES)}")
    return DTYPES[name]
