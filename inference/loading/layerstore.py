"""The converted layer store: one file per unit, holding exactly the unit's aligned buffer, plus a manifest.

Layout of a store directory:
    manifest.json      format version, model config, dtype, and per unit: file, bytes, xxh3-128, tensor layout;
                       a compressed store adds its codec, and per unit where each packed matrix sits
    units/<key>.bin    the unit's buffer as the store holds it in memory: one aligned read fills it
    tokenizer files    as transformers saves them
Every file is written atomically (temporary name, fsync, rename); the manifest is written last, so a store
without one is an unfinished conversion.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
from collections.abc import Hashable, Mapping

import torch
import xxhash

from ...compression import ABSMAX, Codec, PackedMatrices
from ...errors import CheckpointError
from ...files import PAGE_BYTES
from ...units import TensorSlot, UnitLayout
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
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{where}: unit {key!r} has a malformed layout") from exc
    if any(s.offset < 0 or s.offset + s.nbytes > nbytes for s in slots.values()):
        raise CheckpointError(f"{where}: unit {key!r} has a tensor outside its {nbytes} bytes")
    return UnitLayout(key, slots, nbytes)


def read_manifest(directory: str) -> dict[str, object]:
    """The manifest of a finished store; CheckpointError if absent or malformed."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{directory}: not a finished tierstore layer store (no {MANIFEST})") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "units" not in manifest:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    return manifest


def hold_shared(directory: str) -> int | None:
    """A shared lock on the store's manifest while the store is in use (read-only files take it too), which
    `tierstore cache --remove` asks for exclusively; the descriptor to close, or None where it cannot be had."""
    try:
        fd = os.open(os.path.join(directory, MANIFEST), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # being removed, or a filesystem without locks: reading does not need it
        os.close(fd)
        return None
    return fd


def in_use(directory: str) -> bool:
    """Whether a process reads the store (a shared lock on its manifest) or writes it (its writer's lock)."""
    for name in (MANIFEST, ".lock"):
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing releases the lock if it was taken
    return False


class LayerStoreSource:
    """Reads units of a converted store: one read per unit, verified against the manifest checksum. Holds a shared
    lock on the manifest until `close`, so that the store is not removed while in use."""

    def __init__(self, directory: str, manifest: Mapping[str, object], dtype: torch.dtype,
                 verify: bool = True, drop_page_cache: bool = False) -> None:
        self.directory = directory
        self.verify = verify
        self.drop_page_cache = drop_page_cache
        # Bypassing the page cache: O_DIRECT where the filesystem allows it, else each file's pages are dropped.
        self.direct_io = drop_page_cache and direct_io_works(directory)
        self.read_mode = "O_DIRECT" if self.direct_io else \
            ("posix_fadvise(DONTNEED)" if drop_page_cache else "page cache")
        where = os.path.join(directory, MANIFEST)
        units = manifest["units"]
        if not isinstance(units, dict):
            raise CheckpointError(f"{where}: 'units' is not a table")
        self._stored = {key: layout_from_dict(key, info, where) for key, info in units.items()}
        self.codec = Codec.from_dict(manifest["compression"], where) if manifest.get("compression") else None
        self.packed = {key: PackedMatrices.from_dict(info["packed"], f"{where}: unit {key!r}")
                       for key, info in units.items() if self.codec is not None and info.get("packed")}

        def served(name: str, dtype_stored: torch.dtype) -> torch.dtype:
            return dtype if dtype_stored.is_floating_point and name != ABSMAX else dtype_stored

        # Served in the compute dtype; a unit stored in another dtype is cast after its verified read.
        self._layouts = {key: layout if all(served(name, s.dtype) == s.dtype for name, s in layout.slots.items())
                         else UnitLayout.pack(key, {name: (served(name, s.dtype), s.shape)
                                                    for name, s in layout.slots.items()})
                         for key, layout in self._stored.items()}
        self._files = {key: os.path.join(directory, info["file"]) for key, info in units.items()}
        self._checksums = {key: info["checksum"] for key, info in units.items()}
        self._held = hold_shared(directory)

    def layout(self, key: Hashable) -> UnitLayout:
        """The unit's layout, from the manifest."""
        return self._layouts[key]

    def close(self) -> None:
        """Let go of the store (its shared lock)."""
        if self._held is not None:
            os.close(self._held)
            self._held = None

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
        direct = self.direct_io and out.data_ptr() % PAGE_BYTES == 0
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        try:
            size = os.fstat(fd).st_size
            if size != nbytes:
                raise CheckpointError(f"{path}: {size} bytes, the manifest says {nbytes} (truncated or replaced)")
            # O_DIRECT: whole blocks straight into the (page-aligned) buffer; the tail through the page cache.
            got = pread_exact(fd, view[:nbytes - nbytes % PAGE_BYTES], 0, path) if direct else 0
            if got < nbytes:
                if direct:
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                pread_exact(fd, view[got:], got, path)
            if self.drop_page_cache:  # the host tier holds these bytes; the page cache must not as well
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        if self.verify and checksum(out[:nbytes]) != self._checksums[key]:
            raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt; delete the layer store "
                                  f"{self.directory} and convert again (one in tierstore's cache is rebuilt by the "
                                  f"next run)")


def pread_exact(fd: int, view: memoryview, offset: int, path: str) -> int:
    """Fill `view` from file offset `offset`; returns the offset reached. CheckpointError if the file ends first."""
    done = 0
    while done < len(view):
        step = os.preadv(fd, [view[done:]], offset + done)
        if step == 0:
            raise CheckpointError(f"{path}: ended at byte {offset + done}, expected {offset + len(view)} "
                                  f"(truncated since it was opened)")
        done += step
    return offset + done


def direct_io_works(directory: str) -> bool:
    """Whether this filesystem lets the store's unit files be opened with O_DIRECT (tmpfs, for one, does not)."""
    units = os.path.join(directory, "units")
    name = next((n for n in sorted(os.listdir(units)) if n.endswith(".bin")), None) if os.path.isdir(units) else None
    if name is None or not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(os.path.join(units, name), os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        buffer = mmap.mmap(-1, PAGE_BYTES)  # page-aligned
        try:
            os.preadv(fd, [buffer], 0)
            return True
        except OSError:
            return False
        finally:
            buffer.close()
    finally:
        os.close(fd)
