"""The converted layer store: one file per unit, holding exactly the unit's aligned buffer, plus a manifest.

Layout of a store directory:
    manifest.json      format version, model config, dtype, and per unit: file, bytes, xxh3-128, tensor layout
    units/<key>.bin    the unit's buffer as the store holds it in memory: one aligned read fills it
    tokenizer files    as transformers saves them
Every file is written atomically (temporary name, fsync, rename); the manifest is written last, so a store
without one is an unfinished conversion.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Hashable, Mapping

import torch
import xxhash

from ..errors import CheckpointError
from ..units import TensorSlot, UnitLayout
from .safetensors_header import DTYPES

FORMAT = "tierstore-layerstore/1"
MANIFEST = "manifest.json"
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def checksum(buffer: torch.Tensor) -> str:
    """xxh3-128 of a uint8 CPU buffer: ~20 GB/s, far above disk bandwidth."""
    return xxhash.xxh3_128_hexdigest(memoryview(buffer.numpy()))


def unit_filename(key: str) -> str:
    """Relative path of a unit's file."""
    return os.path.join("units", f"{key}.bin")


def write_atomic(path: str, data: bytes | memoryview) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def layout_to_dict(layout: UnitLayout) -> dict[str, object]:
    """A layout as manifest JSON."""
    return {"nbytes": layout.nbytes,
            "tensors": {name: {"offset": s.offset, "dtype": _DTYPE_NAMES[s.dtype], "shape": list(s.shape)}
                        for name, s in layout.slots.items()}}


def layout_from_dict(key: str, data: Mapping[str, object], where: str) -> UnitLayout:
    """Parse a manifest layout; CheckpointError naming the manifest if it is malformed."""
    try:
        slots = {name: TensorSlot(int(t["offset"]), DTYPES[t["dtype"]], tuple(int(d) for d in t["shape"]))
                 for name, t in data["tensors"].items()}  # type: ignore[union-attr]
        nbytes = int(data["nbytes"])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{where}: unit {key!r} has a malformed layout") from None
    if any(s.offset < 0 or s.offset + s.nbytes > nbytes for s in slots.values()):
        raise CheckpointError(f"{where}: unit {key!r} has a tensor outside its {nbytes} bytes")
    return UnitLayout(key, slots, nbytes)


def read_manifest(directory: str) -> dict[str, object]:
    """The manifest of a finished store; CheckpointError if absent or malformed."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not a finished tierstore layer store (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "units" not in manifest:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    return manifest


class LayerStoreSource:
    """Reads units of a converted store: one read per unit, verified against the manifest checksum."""

    def __init__(self, directory: str, manifest: Mapping[str, object], dtype: torch.dtype,
                 verify: bool = True, drop_page_cache: bool = False) -> None:
        self.directory = directory
        self.verify = verify
        self.drop_page_cache = drop_page_cache
        where = os.path.join(directory, MANIFEST)
        units = manifest["units"]
        if not isinstance(units, dict):
            raise CheckpointError(f"{where}: 'units' is not a table")
        self._stored = {key: layout_from_dict(key, info, where) for key, info in units.items()}
        # Served in the compute dtype; a unit stored in another dtype is cast after its verified read.
        self._layouts = {key: layout if all(s.dtype == dtype or not s.dtype.is_floating_point
                                            for s in layout.slots.values())
                         else UnitLayout.pack(key, {name: (dtype if s.dtype.is_floating_point else s.dtype, s.shape)
                                                    for name, s in layout.slots.items()})
                         for key, layout in self._stored.items()}
        self._files = {key: os.path.join(directory, info["file"]) for key, info in units.items()}
        self._checksums = {key: info["checksum"] for key, info in units.items()}

    def layout(self, key: Hashable) -> UnitLayout:
        """The unit's layout, from the manifest."""
        return self._layouts[key]

    def read_into(self, key: Hashable, out: torch.Tensor) -> None:
        """Fill `out` with the unit file; CheckpointError naming the file if it is short, long or corrupt."""
        stored, served = self._stored[key], self._layouts[key]
        if stored is served:
            self._read_file(key, out)
            return
        raw = torch.empty(stored.nbytes, dtype=torch.uint8)
        self._read_file(key, raw)
        targets = served.views(out)
        for name, tensor in stored.views(raw).items():
            targets[name].copy_(tensor)

    def _read_file(self, key: Hashable, out: torch.Tensor) -> None:
        path = self._files[key]
        nbytes = self._stored[key].nbytes
        view = memoryview(out.numpy())[:nbytes]
        try:
            with open(path, "rb", buffering=0) as handle:
                size = os.fstat(handle.fileno()).st_size
                if size != nbytes:
                    raise CheckpointError(f"{path}: {size} bytes, the manifest says {nbytes} (truncated or replaced)")
                got = 0
                while got < nbytes:
                    step = handle.readinto(view[got:])
                    if not step:
                        raise CheckpointError(f"{path}: ended after {got} of {nbytes} bytes")
                    got += step
                if self.drop_page_cache:  # the host tier holds these bytes; the page cache must not as well
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if self.verify and checksum(out[:nbytes]) != self._checksums[key]:
            raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt; convert the model again")
