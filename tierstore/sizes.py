"""Byte sizes as people write them: "4GB", "4 GiB", "512MB", "0.5GB", or plain integers (bytes)."""
from __future__ import annotations

import math
import re

from .errors import BudgetError

_UNIT_BYTES = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: object, field: str, error: type[Exception] = BudgetError) -> int:
    """Parse `value` into a whole number of bytes; `field` names it in the error."""
    if isinstance(value, bool) or value is None:
        raise error(f"{field}: {value!r} is not a size; write e.g. 4GB, 512MiB or a number of bytes")
    if isinstance(value, int):
        nbytes = value
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise error(f"{field}: {value!r} is not a whole, finite number of bytes")
        nbytes = int(value)
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None and _SIZE_RE.match(value.strip().removeprefix("-")):
            raise error(f"{field}: {value!r} is negative")
        if match is None:
            raise error(f"{field}: {value!r} is not a size; write e.g. 4GB, 512MiB or a number of bytes")
        number, unit = match.group(1), match.group(2).lower() or "b"
        if unit not in _UNIT_BYTES:
            raise error(f"{field}: unknown unit {match.group(2)!r} in {value!r}; "
                        f"use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
        nbytes = int(float(number) * _UNIT_BYTES[unit])
    else:
        raise error(f"{field}: {value!r} ({type(value).__name__}) is not a size")
    if nbytes < 0:
        raise error(f"{field}: {value!r} is negative")
    return nbytes


def format_size(nbytes: int | None, binary: bool = False) -> str:
    """Render bytes in decimal units, as the README defines them: 4GB, 300MB, 1.23GB, 17B; one system in every
    table and message. `binary`: a size that is a whole number of GiB or MiB is written so (4GiB), to echo a budget
    as the user wrote it."""
    if nbytes is None:
        return "unlimited"
    for unit in ("TB", "GB", "MB", *(("TiB", "GiB", "MiB", "KiB") if binary else ()), "KB"):
        step = _UNIT_BYTES[unit.lower()]
        if nbytes >= step and nbytes % step == 0 and nbytes // step < 10_000:  # exact, and short
            return f"{nbytes // step}{unit}"
    for unit in ("TB", "GB", "MB", "KB"):
        step = _UNIT_BYTES[unit.lower()]
        if nbytes >= step:
            text = f"{nbytes / step:.2f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{nbytes}B"
