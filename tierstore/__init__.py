"""tierstore: a tiered-storage memory manager for layer weights, and a thin layer-by-layer inference loop."""
from __future__ import annotations

__version__ = "0.2.0"  # the one definition: pyproject.toml reads it from here

import os
from typing import Any

# Installed, `policies/` and `inference/` are subpackages of tierstore (pyproject maps them). Run from a source
# checkout without installing, they sit beside this folder: let the import system find them there too.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(os.path.dirname(__file__), "policies")) and \
        os.path.isfile(os.path.join(_checkout, "policies", "planner.py")):
    __path__.append(_checkout)  # type: ignore[name-defined]

from .budget import Budget
from .config import Config
from .errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    InputError,
    ModelError,
    TierstoreError,
)
from .sizes import format_size, parse_size

__all__ = ["__version__", "AutoModel", "Budget", "BudgetError", "CheckpointError", "Config", "ConfigError", "InputError",
           "ModelError", "TierstoreError", "TieredStore", "format_size", "parse_size"]


def __getattr__(name: str) -> Any:
    # torch-heavy parts load on first use, so `tierstore.policies` and budget parsing stay light.
    if name == "AutoModel":
        from .inference.model import AutoModel
        return AutoModel
    if name == "TieredStore":
        from .store import TieredStore
        return TieredStore
    raise AttributeError(f"module 'tierstore' has no attribute {name!r}")
