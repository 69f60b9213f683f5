"""Writing a layer store (the format layerstore.py reads): every unit's file and checksum written atomically, a
killed run resumed without redoing finished units, a finished store of another kind refused, the disk budget
checked before anything is written, and two writers of one directory serialised on a lock file.

- `write_store`: units made elsewhere (generated on a GPU, read from anywhere), plain or quantized;
- `compress`: the units a source serves, quantized;
- `copy_units`: the units a source serves as they are (a tensor-parallel rank's shards);
- convert.py turns foreign checkpoints (GGUF, .bin, renamed safetensors) into units through the same writer.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import fcntl
import functools
import glob
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ...allocation import SENSITIVITY, allocate, candidates, matrix_errors
from ...compression import MIXED, PACKED, Codec, codec_identity, compress_unit, compressed_layout, ggml_layout
from ...errors import BudgetError, CheckpointError, ConfigError, InputError, TierstoreError
from ...files import write_atomic
from ...gptq import error_key
from ...sizes import format_size
from ...units import UnitLayout, UnitSource, require_tensors
from ..devices import as_dtype, dtype_name
from .checkpoint import load_config, load_tokenizer
from .gguf_packed import PackedMatrix
from .layerstore import FORMAT, MANIFEST, checksum, layout_to_dict, read_manifest, unit_filename
from .resolve import Checkpoint
from .skeleton import Skeleton, build_skeleton, parse_slice
from .splits import Group, check_world, plan_splits, split_layouts

log = logging.getLogger(__name__)

_LOCK = ".lock"
PARKED = ".parked"  # a compressed store's measured calibration (GPTQ's blocks) while its units are written


def compress(source: UnitSource, skeleton: Skeleton, base: Checkpoint, out_dir: str, codec: Codec,
             device: torch.device, trust_remote_code: bool = False, progress: bool = True,
             disk_budget_bytes: int | None = None,
             importance: Callable[[str], Mapping[str, torch.Tensor]] | None = None) -> str:
    """Write a compressed layer store of the units `source` serves (the model `base`), one unit at a time,
    quantizing on `device`; resumable, locked and refused like `convert`. A calibrated codec's importance matrix
    (with GPTQ rounding, also each matrix's blocks and their errors: gptq.blocks_key) comes from
    `importance(folder)`, called only when units are left to write; what it parks in `folder` (inside `out_dir`)
    is removed once the store is whole. Returns `out_dir`."""
    if codec.calibration and importance is None:
        raise ConfigError(f"{codec.name}: a calibrated compression needs its importance matrix measured")
    parked = os.path.join(out_dir, PARKED)
    # measured once, and only if units are left
    measured = functools.cache(lambda: importance(parked)) if importance and codec.calibration else None
    with store_writer(out_dir, None, codec.identity()) as finished:
        if finished:
            log.info("%s store of %s already in %s", codec.name, base.path, out_dir)
            shutil.rmtree(parked, ignore_errors=True)  # a run killed after its last unit
            return out_dir
        log.info("compressing %s to %s into %s", base.path, codec.name, out_dir)
        layouts = {key: source.layout(key) for key in skeleton.units}
        if codec.recipe == MIXED and not codec.allocation:
            codec = _allocated(codec, source, skeleton, layouts, device, measured() if measured else {})

        def write_unit(key: str) -> dict[str, Any]:
            buffer = torch.empty(layouts[key].nbytes, dtype=torch.uint8)
            source.read_into(key, buffer)
            packed_layout, packed_buffer, packed = compress_unit(layouts[key], buffer, skeleton.matrices, codec,
                                                                 device, measured() if measured else None)
            extra = {"packed": packed.to_dict()} if packed is not None else {}
            return _write_buffer(out_dir, key, packed_layout, packed_buffer, extra)

        sizes = {key: compressed_layout(layout, skeleton.matrices, codec)[0].nbytes for key, layout in layouts.items()}
        records = _write_missing(out_dir, sizes, write_unit, disk_budget_bytes, progress,
                                 f"compressing to {codec.name}")
        write_metadata(out_dir, os.path.abspath(base.path), load_config(base, trust_remote_code), records,
                        load_tokenizer(base, trust_remote_code),
                        compression=codec.to_dict())
        shutil.rmtree(parked, ignore_errors=True)
    return out_dir


def _allocated(codec: Codec, source: UnitSource, skeleton: Skeleton, layouts: Mapping[str, UnitLayout],
               device: torch.device, importance: Mapping[str, torch.Tensor]) -> Codec:
    """`codec` ("mixed") with its formats allocated (allocation.py) from each matrix's error in every candidate
    format, times its sensitivity where measured: GPTQ's measured output errors where the calibration rounded the
    matrix, else its unit read once and each matrix quantized to nearest on `device`, weighed by `importance`."""
    errors: dict[str, dict[str, float]] = {}
    numel: dict[str, int] = {}
    for key, layout in layouts.items():
        names = [name for name in layout.slots if name in skeleton.matrices]
        tensors = None
        for name in names:
            numel[name] = math.prod(layout.slots[name].shape)
            measured = _gptq_errors(name, numel[name], importance, codec.bits)
            if not measured:
                if tensors is None:  # the unit's bytes, once
                    buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
                    source.read_into(key, buffer)
                    tensors = layout.views(buffer)
                measured = matrix_errors(tensors[name].to(device), importance.get(name), codec.bits)
            weight = float(importance.get(f"{name}{SENSITIVITY}", 1.0))  # KL per relative error, when measured
            errors[name] = {format: error * weight for format, error in measured.items()}
    allocation = allocate(errors, numel, codec.bits)
    counts = collections.Counter(allocation.values())
    log.info("%s: formats by measured error: %s", codec.name, ", ".join(f"{f} x{n}" for f, n in sorted(counts.items())))
    return dataclasses.replace(codec, allocation=tuple(sorted(allocation.items())))


def _gptq_errors(name: str, numel: int, importance: Mapping[str, torch.Tensor], bits: float) -> dict[str, float]:
    """Matrix `name`'s relative output error in each candidate format for `bits` as GPTQ measured it while the
    calibration text ran ({} where it did not round the matrix)."""
    return {format: float(importance[error_key(name, format)]) for format in candidates(numel, bits)
            if error_key(name, format) in importance}


def write_store(out_dir: str, config: Any, unit_tensors: Callable[[str, list[str]], Mapping[str, torch.Tensor]],
                dtype: torch.dtype, codec: Codec | None = None, device: torch.device | str = "cpu",
                tokenizer: Any = None, progress: bool = True, disk_budget_bytes: int | None = None,
                shard: Group | None = None) -> str:
    """Write a layer store for a transformers `config` whose weights come one unit at a time from
    `unit_tensors(key, names)` (the unit's tensors by name, e.g. generated on the GPU or read from elsewhere),
    stored in `dtype` and, with a `codec`, quantized on `device` before they are written: no full-precision copy of
    a compressed model ever reaches the disk. Like `convert`: every unit's file and checksum written atomically, a
    killed run resumed without asking for finished units again, a finished store of another kind refused, and the
    disk budget checked before anything is written. Each routed expert of a mixture-of-experts layer is a unit of
    its own, plain or compressed, as `compress` and `convert` store them (so that experts stream): `unit_tensors`
    is asked for its slice of each fused experts tensor as `name[e]`. With `shard`, the store is that
    tensor-parallel rank's (`shards.rank_store_dir` says where a run looks for it): `unit_tensors` gives whole
    tensors, and the rank's part of each (`splits.plan_splits`) is stored. Returns `out_dir`."""
    dtype = as_dtype(dtype)
    if codec is not None and (codec.calibration or codec.recipe == MIXED):
        raise InputError("write_store quantizes data-free, one format for all: give a codec without a calibration "
                         "text, not mixed")
    requested = dtype_name(dtype) if codec is None else None
    with store_writer(out_dir, requested, codec.identity() if codec else None) as finished:
        if finished:
            log.info("layer store already in %s", out_dir)
            return out_dir
        skeleton = build_skeleton(config, dtype, split_experts=True)
        layouts = planned_layouts(skeleton, dtype)
        whole, splits = layouts, {}
        if shard is not None:
            check_world(config, shard.world)
            splits = plan_splits(skeleton, layouts, shard)[0]
            layouts = split_layouts(layouts, splits)
        # a compressed unit is packed where it is quantized: tensors made on a GPU never cross the link twice
        pack_device = torch.device(device) if codec else torch.device("cpu")

        def write_unit(key: str) -> dict[str, Any]:
            layout = layouts[key]
            tensors = unit_tensors(key, list(layout.slots))
            require_tensors(key, layout.slots, tensors, "unit_tensors")
            buffer = torch.zeros(layout.nbytes, dtype=torch.uint8, device=pack_device)
            for name, view in layout.views(buffer).items():
                want = whole[key].slots[name].shape
                if tuple(tensors[name].shape) != tuple(want):
                    raise InputError(f"unit_tensors: {name!r} of unit {key!r} has shape "
                                     f"{tuple(tensors[name].shape)}, the model's is {tuple(want)}")
                split = splits.get(key, {}).get(name)
                if split is None:
                    view.copy_(tensors[name])
                elif not split.zero:  # a rowwise bias stays zeros after rank 0
                    view.copy_(tensors[name].narrow(split.dim, split.start, split.length))
            extra: dict[str, Any] = {}
            if codec is not None:
                layout, buffer, packed = compress_unit(layout, buffer, skeleton.matrices, codec, pack_device)
                extra = {"packed": packed.to_dict()} if packed is not None else {}
            return _write_buffer(out_dir, key, layout, buffer.cpu(), extra)

        sizes = {key: (compressed_layout(layout, skeleton.matrices, codec)[0] if codec else layout).nbytes
                 for key, layout in layouts.items()}
        records = _write_missing(out_dir, sizes, write_unit, disk_budget_bytes, progress, "writing units")
        kind = {"compression": codec.to_dict()} if codec else {"dtype": requested}
        write_metadata(out_dir, "write_store", config, records, tokenizer, **kind)
    return out_dir


def copy_units(out_dir: str, source: UnitSource, layouts: Mapping[str, UnitLayout], dtype: torch.dtype, config: Any,
               origin: str, disk_budget_bytes: int | None = None, progress: bool = False) -> str:
    """Write a layer store of the units `source` serves as `layouts` (in `dtype`), e.g. one rank's shards read
    from the whole units: each unit's file and checksum written atomically, a killed run resumed, the disk budget
    checked first; a finished store is kept. `origin` names what it was read from. Returns `out_dir`."""
    with store_writer(out_dir, dtype_name(dtype), None) as finished:
        if finished:
            return out_dir

        def write_unit(key: str) -> dict[str, Any]:
            buffer = torch.zeros(layouts[key].nbytes, dtype=torch.uint8)  # padding between tensors: zeros
            source.read_into(key, buffer)
            return _write_buffer(out_dir, key, layouts[key], buffer, {})

        sizes = {key: layout.nbytes for key, layout in layouts.items()}
        records = _write_missing(out_dir, sizes, write_unit, disk_budget_bytes, progress, "writing units")
        write_metadata(out_dir, origin, config, records, None, dtype=dtype_name(dtype))
    return out_dir


def planned_layouts(skeleton: Skeleton, dtype: torch.dtype) -> dict[str, UnitLayout]:
    """Every unit's layout as the model's parameters give it (no bytes read), floating point in `dtype`."""
    shapes = parameter_shapes(skeleton)
    return {key: UnitLayout.pack(key, {name: planned_tensor(shapes, name, dtype) for name in names})
            for key, names in skeleton.units.items()}


def parameter_shapes(skeleton: Skeleton) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {name: (param.dtype, tuple(param.shape)) for name, param in skeleton.model.named_parameters()}


def planned_tensor(shapes: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], name: str,
             dtype: torch.dtype | None) -> tuple[torch.dtype, tuple[int, ...]]:
    """A unit tensor's stored dtype and shape: floating point in `dtype` (None: as the model's); an expert's slice
    without the expert axis."""
    tensor, expert = parse_slice(name)
    kind, shape = shapes[tensor]
    return (dtype if dtype is not None and kind.is_floating_point else kind), (shape[1:] if expert is not None
                                                                              else shape)


def write_tensors(out_dir: str, key: str, tensors: Mapping[str, torch.Tensor | PackedMatrix], order: list[str],
                  dtype: torch.dtype | None) -> dict[str, Any]:
    """Pack one unit into its aligned buffer, write it and its sidecar atomically; returns its manifest record.
    Matrices given as PackedMatrix keep their ggml blocks (the unit's PACKED tensor)."""
    matrices = {name: (tensors[name].format, tensors[name].shape) for name in order
                if isinstance(tensors[name], PackedMatrix)}
    plain = {name: (dtype if dtype is not None and tensors[name].is_floating_point() else tensors[name].dtype,
                    tuple(tensors[name].shape)) for name in order if name not in matrices}
    if matrices:
        layout, packed = ggml_layout(key, plain, matrices)
    else:
        layout, packed = UnitLayout.pack(key, plain), None
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = layout.views(buffer)
    for name in plain:
        views[name].copy_(tensors[name])
    for name in matrices:
        start, end = packed.ggml_bytes(name)
        views[PACKED][start:end].copy_(tensors[name].data)
    return _write_buffer(out_dir, key, layout, buffer, {"packed": packed.to_dict()} if packed else {})


def _write_buffer(out_dir: str, key: str, layout: UnitLayout, buffer: torch.Tensor,
                  extra: dict[str, Any]) -> dict[str, Any]:
    """Write a unit's buffer, then its sidecar, atomically; returns its manifest record."""
    write_atomic(os.path.join(out_dir, unit_filename(key)), memoryview(buffer.numpy()))
    record = {"file": unit_filename(key), "checksum": checksum(buffer), **layout_to_dict(layout), **extra}
    write_atomic(os.path.join(out_dir, unit_filename(key) + ".json"), json.dumps(record).encode())
    return record


def _write_missing(out_dir: str, sizes: Mapping[str, int], write_unit: Callable[[str], dict[str, Any]],
                   disk_budget_bytes: int | None, progress: bool, what: str) -> dict[str, dict[str, Any]]:
    """The records of every unit in `sizes` (its bytes in the store): those an earlier run finished kept, the
    rest written in order by `write_unit(key)`, once the disk is known to have room for them."""
    records = finished_units(out_dir)
    require_room(out_dir, sum(nbytes for key, nbytes in sizes.items() if key not in records), disk_budget_bytes)
    done_bytes = sum(nbytes for key, nbytes in sizes.items() if key in records)
    with progress_bar(progress, sum(sizes.values()), done_bytes, what) as advance:
        for key in sizes:
            if key not in records:
                records[key] = write_unit(key)
                advance(sizes[key])
    return records


def finished_units(out_dir: str) -> dict[str, dict[str, Any]]:
    """Units a previous, interrupted run finished: sidecar present and data file of the recorded size."""
    done = {}
    for sidecar in glob.glob(os.path.join(out_dir, "units", "*.bin.json")):
        try:
            with open(sidecar, encoding="utf-8") as handle:
                record = json.load(handle)
            if os.path.getsize(os.path.join(out_dir, record["file"])) == record["nbytes"]:
                done[os.path.basename(sidecar)[:-len(".bin.json")]] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue  # redo that unit
    return done


def require_room(out_dir: str, needed: int, disk_budget_bytes: int | None) -> None:
    """Refuse, before any unit is written, a store larger than the disk budget or the free disk."""
    if disk_budget_bytes is not None and needed > disk_budget_bytes:
        raise BudgetError(f"budget.disk is {format_size(disk_budget_bytes)}, but the layer store {out_dir} needs "
                          f"{format_size(needed)} ({needed} bytes); raise budget.disk")
    free = shutil.disk_usage(out_dir).free
    if needed > free:
        raise CheckpointError(f"{out_dir}: conversion needs {format_size(needed)}, only {format_size(free)} free")


def write_metadata(out_dir: str, source: str, config: Any, records: dict[str, Any], tokenizer: Any,
                    **extra: Any) -> None:
    """The store's tokenizer, config and (last, atomically) manifest; then the per-unit sidecars go."""
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    config.save_pretrained(out_dir)
    manifest = {"format": FORMAT, "source": source, "model_type": config.model_type, **extra, "units": records}
    write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
    for sidecar in glob.glob(os.path.join(out_dir, "units", "*.bin.json")):
        os.unlink(sidecar)
    for leftover in glob.glob(os.path.join(out_dir, "**", ".tmp-*"), recursive=True):
        os.unlink(leftover)


@contextlib.contextmanager
def store_writer(out_dir: str, dtype: str | None, compression: dict[str, Any] | None) -> Iterator[bool]:
    """Create `out_dir` and hold its lock; yields True when a finished store of this `dtype` and `compression` is
    already there (one of another kind is refused). Bad input (a TierstoreError) leaves nothing behind: the folder
    is removed if this run made it. An interrupted run keeps the units it finished, for the next run to resume.
    A finished store is only read: nothing is created or locked, so read-only caches and stores work."""
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):  # written last: the store is whole
        _check_same_kind(out_dir, read_manifest(out_dir), dtype, compression)
        yield True
        return
    created = [path for path in (out_dir, os.path.join(out_dir, "units")) if not os.path.isdir(path)]
    try:
        os.makedirs(os.path.join(out_dir, "units"), exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"{out_dir}: cannot write the layer store there ({exc.strerror})") from exc
    try:
        with _locked(out_dir):
            finished = os.path.isfile(os.path.join(out_dir, MANIFEST))
            if finished:
                _check_same_kind(out_dir, read_manifest(out_dir), dtype, compression)
            yield finished
    except TierstoreError:  # bad input: nothing of this run is worth resuming
        if out_dir in created:
            shutil.rmtree(out_dir, ignore_errors=True)
        elif not glob.glob(os.path.join(out_dir, "units", "*.bin")):
            _remove_created(out_dir, created)
        raise
    except BaseException:  # interrupted: keep finished units for the next run to resume
        if not glob.glob(os.path.join(out_dir, "units", "*.bin")):
            _remove_created(out_dir, created)
        raise


def _check_same_kind(out_dir: str, manifest: dict[str, Any], dtype: str | None,
                     compression: dict[str, Any] | None) -> None:
    """A finished store is reused only for the conversion that wrote it."""
    def kind(dtype: str | None, compression: dict[str, Any] | None) -> str:
        if compression:
            return f"{compression.get('format')}-compressed"
        return f"in {dtype}" if dtype else "in the checkpoint's dtypes"

    have = codec_identity(manifest.get("compression") or {})
    differs = (have or None) != (compression or None) or (
        compression is None and "dtype" in manifest and manifest["dtype"] != dtype)
    if differs:
        raise InputError(f"{out_dir} already holds a layer store {kind(manifest.get('dtype'), have)}, not "
                         f"{kind(dtype, compression)}: choose another directory, or delete that one first")


def _remove_created(out_dir: str, created: list[str]) -> None:
    """Undo `store_writer`'s set-up: the lock, leftover temporary files, a measured calibration parked there, and
    the folders it made."""
    for leftover in (os.path.join(out_dir, _LOCK), *glob.glob(os.path.join(out_dir, "units", ".tmp-*"))):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    shutil.rmtree(os.path.join(out_dir, PARKED), ignore_errors=True)
    for directory in reversed(created):
        with contextlib.suppress(OSError):  # not empty: something else is in there, keep it
            os.rmdir(directory)


@contextlib.contextmanager
def _locked(out_dir: str) -> Iterator[None]:
    """Exclusive lock on the store directory; a second converter waits for the first."""
    path = os.path.join(out_dir, _LOCK)
    try:
        handle = open(path, "a+")
    except OSError as exc:
        raise CheckpointError(f"{out_dir}: cannot write the layer store there ({exc.strerror})") from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            log.warning("%s: another process is converting into this directory; waiting for it", out_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def progress_bar(enabled: bool, total_bytes: int, done_bytes: int, what: str,
                 announce: str | None = None) -> Iterator[Callable[..., None]]:
    """A bar of bytes written on stderr, when it is a terminal, after `announce` as a line of its own (it stays
    when the bar goes); yields `advance(nbytes, what=None)`, which may also change the bar's text."""
    if not enabled:
        yield lambda nbytes=0, what=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if announce and console.is_terminal:
        console.print(f"tierstore: {announce}", markup=False, highlight=False)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=False),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(what, total=total_bytes, completed=done_bytes)

        def advance(nbytes: int = 0, what: str | None = None) -> None:
            bar.update(task, advance=nbytes, **({"description": what} if what else {}))
        yield advance


def default_store_dir(checkpoint: Checkpoint, cache_dir: str, dtype: torch.dtype | None, variant: str = "") -> str:
    """Where `from_pretrained` keeps the conversion of `checkpoint`: keyed by path, size, mtime, dtype and variant
    (a codec name for compressed stores)."""
    stat = os.stat(checkpoint.path)
    ident = f"{os.path.abspath(checkpoint.path)}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|{variant}"
    name = f"{checkpoint.name}-{variant}" if variant else checkpoint.name
    return os.path.join(cache_dir, f"{name}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}")
