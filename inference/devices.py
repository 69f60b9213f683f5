"""Leaf helpers: the compute device a config names, and compute dtypes as users write them. Imports nothing from
tierstore but its errors, so that every wing may use it."""
from __future__ import annotations

import torch

from ..errors import InputError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # what --dtype takes


def compute_device(setting: str) -> torch.device:
    """The compute device a config asks for; auto = the first GPU if there is one."""
    if setting == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"runtime.device = {setting!r} but this machine has no usable CUDA GPU")
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


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
