"""Budget: how many bytes each tier may hold. Data only; the planner decides what to do with it."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Mapping

from .errors import BudgetError
from .sizes import format_size, parse_size

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Bytes per tier. `None` for a tier means: whatever the machine has free when the plan is made."""

    vram: int | None = None
    ram: int | None = None
    disk: int | None = None

    def __init__(self, vram: object = None, ram: object = None, disk: object = None) -> None:
        for field, value in (("vram", vram), ("ram", ram), ("disk", disk)):
            object.__setattr__(self, field, None if value is None else parse_size(value, f"budget.{field}"))

    @classmethod
    def coerce(cls, budget: object) -> "Budget | None":
        """What users pass as a budget: None, a Budget, or a dict such as {"vram": "4GB", "ram": "16GB"}."""
        if budget is None or isinstance(budget, Budget):
            return budget
        if isinstance(budget, Mapping):
            unknown = set(budget) - {"vram", "ram", "disk"}
            if unknown:
                raise BudgetError(f"budget: unknown tier {sorted(unknown)[0]!r}; use vram, ram and disk")
            return cls(**budget)
        raise BudgetError(f"budget: expected tierstore.Budget(vram=..., ram=...) or a dict, got "
                          f"{type(budget).__name__}")

    def __str__(self) -> str:
        parts = [f"{name}={format_size(getattr(self, name), binary=True)}" for name in ("vram", "ram", "disk")
                 if getattr(self, name) is not None]
        return f"Budget({', '.join(parts) or 'measured'})"

    def to_dict(self) -> dict[str, int | None]:
        """Bytes per tier, JSON-serialisable."""
        return {"vram": self.vram, "ram": self.ram, "disk": self.disk}

    @classmethod
    def measure(cls, path: str | os.PathLike[str] = ".", device_index: int = 0) -> "Budget":
        """What this machine has free right now: VRAM from NVML (0 without a GPU), available RAM, free disk."""
        import psutil

        return cls(vram=free_vram_bytes(device_index), ram=psutil.virtual_memory().available,
                   disk=shutil.disk_usage(_existing_parent(path)).free)


def free_vram_bytes(device_index: int = 0) -> int:
    """Free memory of one GPU according to NVML; 0 where there is no NVIDIA GPU or driver."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[device_index:device_index + 1]
        if visible and visible[0].strip().isdigit():
            device_index = int(visible[0])
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    except pynvml.NVMLError as exc:
        log.warning("NVML could not read GPU %d memory: %s", device_index, exc)
        return 0
    finally:
        pynvml.nvmlShutdown()


def _existing_parent(path: str | os.PathLike[str]) -> str:
    path = os.path.abspath(os.fspath(path))
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path
