"""tierstore: a tiered-storage memory manager for layer weights, and a thin layer-by-layer inference loop."""
from __future__ import annotations

__version__ = "0.2.0"  # the one definition: pyproject.toml reads it from here

import importlib.util
import os
import sys
from typing import Any


def _map_checkout_subpackages() -> None:
    """Installed, `policies/` and `inference/` are subpackages of tierstore (pyproject maps them). Run from a
    source checkout without installing, they sit beside this folder: register those two, and nothing else of the
    checkout, as `tierstore.policies` and `tierstore.inference`."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("policies", "inference"):
        folder = os.path.join(checkout, name)
        if f"{__name__}.{name}" in sys.modules or os.path.isdir(os.path.join(os.path.dirname(__file__), name)) \
                or not os.path.isfile(os.path.join(folder, "__init__.py")):
            continue
        spec = importlib.util.spec_from_file_location(f"{__name__}.{name}", os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        globals()[name] = module  # as the import system would bind a subpackage on its parent


_map_checkout_subpackages()

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

__all__ = [
    "__version__", "AutoModel", "Budget", "BudgetError", "CheckpointError", "Config", "ConfigError", "InputError",
    "ModelError", "TierstoreError", "TieredStore", "format_size", "parse_size"
]


def __getattr__(name: str) -> Any:
    # torch-heavy parts load on first use, so `tierstore.policies` and budget parsing stay light.
    if name == "AutoModel":
        from .inference.compose import AutoModel
        return AutoModel
    if name == "TieredStore":
        from .store import TieredStore
        return TieredStore
    raise AttributeError(f"module 'tierstore' has no attribute {name!r}")
