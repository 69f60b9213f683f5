"""The cache of converted layer stores (`runtime.cache_dir`): what is there, and removing what is not in use.

Each store is a folder of the cache holding a manifest (finished) or units only (a conversion that was stopped,
which the next run resumes). A store is in use while a process reads it (a shared lock on its manifest) or
writes it (its writer's lock); such a store is never removed.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any

from ...errors import InputError
from .layerstore import MANIFEST, in_use, read_manifest

DAY_S = 86400


@dataclasses.dataclass(frozen=True)
class CachedStore:
    """One folder of the cache: its bytes on disk, what it was converted from, its format, when a file of it was
    last read (the filesystem's access time), and whether it is finished and in use."""

    name: str
    path: str
    nbytes: int
    source: str
    format: str
    last_read_s: float
    finished: bool
    in_use: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def list_stores(cache_dir: str) -> list[CachedStore]:
    """The stores in `cache_dir`, least recently read first (none when the folder does not exist)."""
    if not os.path.isdir(cache_dir):
        return []
    stores = [_describe(os.path.join(cache_dir, name)) for name in sorted(os.listdir(cache_dir))
              if os.path.isdir(os.path.join(cache_dir, name, "units"))]
    return sorted(stores, key=lambda store: store.last_read_s)


def remove_stores(cache_dir: str, names: list[str] | None = None, older_than_days: float | None = None,
                  now_s: float | None = None) -> list[CachedStore]:
    """Remove the stores `names` names, or those not read for `older_than_days`; returns them. A name not in the
    cache, or a named store in use, is refused (InputError) before anything is removed; a store in use is kept
    when chosen by age."""
    stores = {store.name: store for store in list_stores(cache_dir)}
    if names:
        unknown = [name for name in names if name not in stores]
        if unknown:
            raise InputError(f"{unknown[0]!r} is not a store in the cache {cache_dir} (tierstore cache lists them)")
        busy = [name for name in names if stores[name].in_use]
        if busy:
            raise InputError(f"{busy[0]!r} is in use by a running process; stop it first")
        chosen = [stores[name] for name in names]
    elif older_than_days is not None:
        if older_than_days < 0:
            raise InputError(f"--older-than must be at least 0 days, got {older_than_days}")
        cutoff_s = (now_s if now_s is not None else time.time()) - older_than_days * DAY_S
        chosen = [store for store in stores.values() if store.last_read_s < cutoff_s and not store.in_use]
    else:
        raise InputError("say which stores to remove: --remove NAME, or --older-than DAYS")
    for store in chosen:
        shutil.rmtree(store.path)
    return chosen


def _describe(path: str) -> CachedStore:
    finished = os.path.isfile(os.path.join(path, MANIFEST))
    manifest: dict[str, Any] = {}
    if finished:
        try:
            manifest = read_manifest(path)
        except Exception:  # noqa: BLE001 - a damaged manifest is listed as such, never fatal to the listing
            manifest = {}
    nbytes, last_read_s = 0, 0.0
    for root, _, files in os.walk(path):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            nbytes += stat.st_blocks * 512
            last_read_s = max(last_read_s, stat.st_atime)
    return CachedStore(os.path.basename(path), path, nbytes, str(manifest.get("source", "?")), _format(manifest),
                       last_read_s, finished, in_use(path))


def _format(manifest: dict[str, Any]) -> str:
    """How the store holds its weights: compressed, a dtype, or as the checkpoint stored them."""
    if not manifest:
        return "unfinished"
    compression = manifest.get("compression")
    if compression:  # a GGML recipe by its name ("q4_k_m"); a GGUF's own blocks as "ggml"
        return str(compression.get("recipe") or compression.get("format", "compressed"))
    units = manifest.get("units", {})
    dtypes = sorted({tensor.get("dtype", "?") for unit in units.values()
                     for tensor in unit.get("tensors", {}).values()})
    kind = manifest.get("dtype") or "/".join(dtypes) or "?"
    return f"{kind}, experts as units" if any(".experts." in key for key in units) else str(kind)
