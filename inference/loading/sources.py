"""Where a model's units come from, opened in one straight line: the checkpoint converted if it must be, its
config, the model skeleton, and the source of the units' bytes: safetensors shards read in place (no second copy
on disk) or a converted layer store, compressed on first use when the config asks for it. A directory holding only
a config.json is planned from it (`ConfigSource`), never run."""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch

from ...compression import Codec, PackedMatrices, compressed_layout
from ...config import Config
from ...errors import CheckpointError, ConfigError, ModelError
from ...units import UnitLayout, UnitSource, require_tensors
from .checkpoint import checkpoint_dtype, load_config, safetensors_entries
from .convert import convert_if_needed, convert_into_cache, has_routed_experts
from .layerstore import LayerStoreSource, pread_exact, read_manifest
from .resolve import Checkpoint
from .safetensors_header import TensorEntry
from .skeleton import Skeleton, build_skeleton, parse_slice
from .store_writer import compress, default_store_dir, planned_layouts

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Units:
    """A model ready to place: its skeleton, where its units' bytes come from and their layouts, the checkpoint
    they are read from (after any conversion), its transformers config, the compute dtype, the dtype it was
    stored in, and for a compressed store the codec and where each unit's matrices are packed."""

    skeleton: Skeleton
    source: UnitSource
    layouts: dict[str, UnitLayout]
    checkpoint: Checkpoint
    hf_config: Any
    dtype: torch.dtype
    stored_dtype: torch.dtype
    codec: Codec | None = None
    packed: dict[str, PackedMatrices] = dataclasses.field(default_factory=dict)

    @property
    def dense_packed(self) -> dict[str, PackedMatrices]:
        """Where the matrices sit of the compressed units other than routed experts (those are dequantized into
        a window of their own: runtime/packed_experts.py)."""
        experts = self.skeleton.expert_keys
        return {key: packed for key, packed in self.packed.items() if key not in experts}

    def close(self) -> None:
        """Close the source's files."""
        close_source(self.source)


def open_units(checkpoint: Checkpoint, cfg: Config, device: torch.device, dtype: torch.dtype | None,
               trust_remote_code: bool, progress: bool, write: bool = True,
               importance: Callable[[], Mapping[str, torch.Tensor]] | None = None) -> Units:
    """The units of the checkpoint the user named, step by step. With `write` False (planning only) no compressed
    store is written: one that does not exist yet is described by the layouts it would have. `importance` measures
    the importance matrix a calibrated compression needs, if one is written."""
    _check_attention(cfg.runtime.attention)  # before anything is converted
    checkpoint = convert_if_needed(checkpoint, cfg, trust_remote_code, progress)  # GGUF, .bin: a layer store, once
    hf_config = load_config(checkpoint, trust_remote_code)
    stored = checkpoint_dtype(hf_config)  # before building the model, which sets the config's dtype to `dtype`
    dtype = dtype or (stored if device.type == "cuda" else torch.float32)
    skeleton = build_skeleton(hf_config, dtype, trust_remote_code, attn_implementation=cfg.runtime.attention,
                              split_experts=_splits_experts(checkpoint, cfg, trust_remote_code),
                              experts_implementation=_experts_kernel(cfg))
    drop_cache = drops_page_cache(cfg, device)
    source, checkpoint = _open_source(checkpoint, skeleton, cfg, dtype, drop_cache, trust_remote_code, progress)
    codec, packed = getattr(source, "codec", None), dict(getattr(source, "packed", {}))
    wanted = Codec.wanted(cfg.compression)
    if codec is not None and wanted is not None and wanted.name != codec.name:
        close_source(source)
        raise ConfigError(f"{checkpoint.path} is stored as {codec.name}; compression asks for {wanted.name}: "
                          f"use the uncompressed model, or compression.format = \"none\"")
    if codec is None and wanted is not None and write:  # compressed on first use, into the cache
        # experts as units of their own is another store than experts whole inside their layers
        variant = wanted.name + ("-experts" if skeleton.experts else "")
        store_dir = default_store_dir(checkpoint, cfg.runtime.cache_dir, None, variant=variant)
        try:
            compress(source, skeleton, checkpoint, store_dir, wanted, device, trust_remote_code, progress,
                     disk_budget_bytes=cfg.budget.disk, importance=importance)
        finally:
            close_source(source)
        source = store_source(store_dir, cfg.io.verify_checksums, dtype, drop_cache)
        checkpoint, codec, packed = Checkpoint("store", store_dir, checkpoint.name), source.codec, source.packed
    missing = [key for key in skeleton.units if not _has_unit(source, key)]
    if missing:
        close_source(source)
        raise CheckpointError(f"{checkpoint.path}: no unit {missing[0]!r} ({len(missing)} missing); it was "
                              f"written for another layout of this model: convert it again")
    layouts = {key: source.layout(key) for key in skeleton.units}
    units = Units(skeleton, source, layouts, checkpoint, hf_config, dtype, stored, codec, packed)
    if codec is None and wanted is not None:  # planning only: the layouts compression would give
        units = as_compressed(units, wanted)
    try:
        for key, names in skeleton.units.items():
            held = set(units.layouts[key].slots) | set(units.packed[key].matrices if key in units.packed else ())
            require_tensors(key, names, held, checkpoint.path)
    except CheckpointError:
        close_source(source)
        raise
    return units


def as_compressed(units: Units, codec: Codec) -> Units:
    """`units` (uncompressed) as `codec` would store them, computed without their data: for a plan, and for the
    layouts a compressed store written from them must have."""
    layouts, packed = {}, {}
    for key, layout in units.layouts.items():
        layouts[key], unit_packed = compressed_layout(layout, units.skeleton.matrices, codec)
        if unit_packed is not None:
            packed[key] = unit_packed
    return dataclasses.replace(units, layouts=layouts, codec=codec, packed=packed)


def drops_page_cache(cfg: Config, device: torch.device) -> bool:
    """Whether unit reads bypass the page cache: `io.direct_io`, by default on a GPU (whose RAM tier holds them)."""
    return device.type == "cuda" if cfg.io.direct_io is None else cfg.io.direct_io


def _check_attention(attention: str) -> None:
    """A flash kernel asked for by name needs its package installed (and, for flash-attn-4, a CUDA GPU)."""
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelError("runtime.attention = \"flash_attention_2\" needs the flash-attn package "
                         "(pip install 'tierstore[flash]'); or use \"sdpa\"")
    if attention == "flash_attention_4":
        import transformers
        import transformers.utils

        available = getattr(transformers.utils, "is_flash_attn_4_available", None)
        if available is None:
            raise ModelError(f"runtime.attention = \"flash_attention_4\" needs transformers with flash-attn-4 "
                             f"support; this is transformers {transformers.__version__}")
        if not available():
            raise ModelError("runtime.attention = \"flash_attention_4\" needs the flash-attn-4 package and a CUDA "
                             "GPU (pip install 'tierstore[flash4]'); or use \"sdpa\"")


def _open_source(checkpoint: Checkpoint, skeleton: Skeleton, cfg: Config, dtype: torch.dtype, drop_cache: bool,
                 trust_remote_code: bool, progress: bool) -> tuple[UnitSource, Checkpoint]:
    """The unit source of a safetensors directory (read in place) or a layer store, converting safetensors whose
    names need transformers' conversion rules once; returns it with the checkpoint it reads."""
    if checkpoint.kind == "config":
        return ConfigSource(checkpoint.path, skeleton, dtype), checkpoint
    if checkpoint.kind == "safetensors":
        source = in_place_source(checkpoint, skeleton.units, dtype, drop_cache)
        if source is not None:
            return source, checkpoint
        checkpoint = convert_into_cache(checkpoint, cfg, trust_remote_code, progress)
    return store_source(checkpoint.path, cfg.io.verify_checksums, dtype, drop_cache), checkpoint


def _splits_experts(checkpoint: Checkpoint, cfg: Config, trust_remote_code: bool) -> bool:
    """Whether experts are units: as the config asks, except that a layer store keeps the layout it was written
    with (one from before experts were units runs them inside its layers; one with expert units cannot)."""
    if checkpoint.kind != "store":
        return cfg.splits_experts
    split = any(".experts." in key for key in read_manifest(checkpoint.path).get("units", {}))
    if split and not cfg.splits_experts:
        raise ConfigError(f"{checkpoint.path} holds each expert as a unit; experts.streaming = false needs the "
                          f"original checkpoint, or a store converted without expert streaming")
    # the model is built once more on meta to see whether it has experts at all: only when the note is shown (-v)
    if cfg.splits_experts and not split and log.isEnabledFor(logging.INFO) \
            and has_routed_experts(checkpoint.path, trust_remote_code):
        log.info("%s keeps experts inside their layers (converted without expert streaming); convert it again to "
                 "stream experts", checkpoint.path)
    return split


def _experts_kernel(cfg: Config) -> str | None:
    """transformers' experts kernel: the configured one, or grouped_mm under expert streaming (exact there, and
    the fastest on GPUs); None leaves transformers' default."""
    if cfg.experts.implementation != "auto":
        return cfg.experts.implementation
    return "grouped_mm" if cfg.splits_experts else None


def _has_unit(source: UnitSource, key: str) -> bool:
    try:
        source.layout(key)
    except KeyError:
        return False
    return True


def in_place_source(checkpoint: Checkpoint, units: dict[str, list[str]], dtype: torch.dtype,
                    drop_page_cache: bool = False) -> SafetensorsSource | None:
    """A source reading the safetensors shards in place, or None when names need transformers' conversion. An
    expert's slice of a fused experts tensor is one contiguous byte range of it, read in place too."""
    entries = safetensors_entries(checkpoint.path)
    wanted = {name for names in units.values() for name in names}
    entries = {**entries, **_slice_entries(entries, wanted)}
    if not wanted <= set(entries):
        return None
    return SafetensorsSource(entries, units, dtype, drop_page_cache)


def _slice_entries(entries: Mapping[str, TensorEntry], names: set[str]) -> dict[str, TensorEntry]:
    """Entries for the expert slices among `names` (see `skeleton.expert_slice`) whose fused tensor is there."""
    sliced = {}
    for name in names:
        tensor, expert = parse_slice(name)
        entry = entries.get(tensor)
        if expert is None or entry is None or not entry.shape or expert >= entry.shape[0]:
            continue
        row_bytes = (entry.end - entry.start) // entry.shape[0]
        start = entry.start + expert * row_bytes
        sliced[name] = TensorEntry(entry.path, start, start + row_bytes, entry.dtype, tuple(entry.shape[1:]))
    return sliced


def store_source(directory: str, verify: bool, dtype: torch.dtype, drop_page_cache: bool = False) -> LayerStoreSource:
    """The source of a converted layer store, served in `dtype`."""
    return LayerStoreSource(directory, read_manifest(directory), dtype, verify=verify, drop_page_cache=drop_page_cache)


def close_source(source: Any) -> None:
    """Close a unit source's files, if it keeps any open."""
    closer = getattr(source, "close", None)
    if closer is not None:
        closer()


class ConfigSource:
    """The units of a model known from its config.json alone, for a plan: their layouts are the model's parameters
    on the meta device, in `dtype`; there are no bytes to read."""

    read_mode = "unknown (no weights: the plan is made from config.json alone)"

    def __init__(self, path: str, skeleton: Skeleton, dtype: torch.dtype) -> None:
        self.path = path
        self._layouts = planned_layouts(skeleton, dtype)

    def layout(self, key: Hashable) -> UnitLayout:
        return self._layouts[key]  # type: ignore[index]

    def read_into(self, key: Hashable, out: torch.Tensor) -> None:
        raise CheckpointError(f"{self.path}: has config.json but no weights to read unit {key!r}")


class SafetensorsSource:
    """Units gathered from tensors of one or more safetensors files, converted to the compute dtype on read."""

    def __init__(self, entries: Mapping[str, TensorEntry], units: Mapping[str, Sequence[str]],
                 dtype: torch.dtype, drop_page_cache: bool = False) -> None:
        self._entries = entries
        self.drop_page_cache = drop_page_cache
        # O_DIRECT needs block-aligned offsets, and a safetensors tensor starts wherever its header says.
        self.read_mode = "posix_fadvise(DONTNEED); in-place safetensors are not block-aligned for O_DIRECT" \
            if drop_page_cache else "page cache"
        self._layouts: dict[str, UnitLayout] = {}
        for key, names in units.items():
            require_tensors(key, names, entries, "the checkpoint")
            self._layouts[key] = UnitLayout.pack(key, {
                name: (dtype if entries[name].dtype.is_floating_point else entries[name].dtype, entries[name].shape)
                for name in names})
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()

    def layout(self, key: Hashable) -> UnitLayout:
        """The unit's layout in the compute dtype."""
        return self._layouts[key]

    def read_into(self, key: Hashable, out: torch.Tensor) -> None:
        """Read each tensor of the unit straight into its slot (converting dtype where the file differs)."""
        layout = self._layouts[key]
        for name, slot in layout.slots.items():
            entry = self._entries[name]
            target = out[slot.offset:slot.offset + slot.nbytes]
            if entry.dtype == slot.dtype:
                self._pread(entry, target)
            else:
                raw = torch.empty(entry.end - entry.start, dtype=torch.uint8)
                self._pread(entry, raw)
                target.view(slot.dtype).copy_(raw.view(entry.dtype).view(-1))

    def _pread(self, entry: TensorEntry, out: torch.Tensor) -> None:
        fd = self._fd(entry.path)
        try:
            pread_exact(fd, memoryview(out.numpy()), entry.start, entry.path)
            if self.drop_page_cache:  # the host tier holds these bytes; the page cache must not as well
                os.posix_fadvise(fd, entry.start, entry.end - entry.start, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise CheckpointError(f"{entry.path}: cannot read: {exc.strerror or exc}") from exc

    def _fd(self, path: str) -> int:
        with self._fd_lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        """Close the shard files."""
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
