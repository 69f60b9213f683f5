"""Reading a safetensors header and checking that it tells the truth before any tensor byte is used."""
from __future__ import annotations

import dataclasses
import json
import os
import struct

import torch

from ...errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: absolute byte range, dtype and shape."""

    path: str
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: str) -> dict[str, TensorEntry]:
    """Parse and validate the header of `path`; CheckpointError naming the file on any lie or truncation."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: safetensors header claims {header_bytes} bytes, "
                                      f"the file has {size} (truncated or not safetensors)")
            raw = handle.read(header_bytes)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + header_bytes
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, size)
    _check_no_overlap(path, entries)
    return entries


def _entry(path: str, name: str, info: object, data_start: int, file_bytes: int) -> TensorEntry:
    try:
        dtype = DTYPES[info["dtype"]]  # type: ignore[index]
        shape = tuple(int(d) for d in info["shape"])  # type: ignore[index]
        begin, end = (int(o) for o in info["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry: {info!r}") from exc
    expected = dtype.itemsize * int(torch.Size(shape).numel()) if all(d >= 0 for d in shape) else -1
    if begin < 0 or end < begin or end - begin != expected:
        raise CheckpointError(f"{path}: tensor {name!r} offsets {begin}..{end} do not match its "
                              f"shape {list(shape)} and dtype {info['dtype']}")  # type: ignore[index]
    if data_start + end > file_bytes:
        raise CheckpointError(f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has "
                              f"{file_bytes} bytes (truncated)")
    return TensorEntry(path, data_start + begin, data_start + end, dtype, shape)


def _check_no_overlap(path: str, entries: dict[str, TensorEntry]) -> None:
    previous: TensorEntry | None = None
    previous_name = ""
    for name, entry in sorted(entries.items(), key=lambda item: item[1].start):
        if previous is not None and entry.start < previous.end and entry.end > entry.start:
            raise CheckpointError(f"{path}: tensors {previous_name!r} and {name!r} overlap in the header")
        previous, previous_name = entry, name
