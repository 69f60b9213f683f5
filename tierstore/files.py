"""Files on disk: the page size, atomic writes, and the check that a path can be written before a run starts."""
from __future__ import annotations

import os
import tempfile

from .errors import InputError

PAGE_BYTES = 4096  # the page and O_DIRECT block: buffer addresses, file offsets and lengths come in whole pages


def _process_umask() -> int:
    mask = os.umask(0)  # reading the umask sets it: put it straight back
    os.umask(mask)
    return mask


# Files are made with the mode an ordinary open() would give them: 0644 under the usual umask 022, so that a store
# one user converted can be read by others. (mkstemp alone makes them 0600.) Read once, at import.
FILE_MODE = 0o666 & ~_process_umask()


def write_atomic(path: str, data: bytes | memoryview) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), FILE_MODE)
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


def check_writable(path: str, what: str) -> None:
    """Refuse (InputError naming `what`) a file path that `write_atomic` could not write; creates nothing."""
    if os.path.isdir(path):
        raise InputError(f"{what} {path!r} is a directory; give a file path")
    directory = os.path.dirname(os.path.abspath(path))
    existing = directory
    while not os.path.isdir(existing):  # the folders write_atomic would create start from here
        parent = os.path.dirname(existing)
        if parent == existing or os.path.exists(existing):
            raise InputError(f"{what} {path!r} cannot be written: {existing!r} is not a directory")
        existing = parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path!r} cannot be written: no permission to write in {existing!r}")
    if os.path.exists(path) and not os.access(path, os.W_OK) and not os.access(directory, os.W_OK):
        raise InputError(f"{what} {path!r} cannot be written: the file is read-only")
