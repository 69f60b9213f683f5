"""Finished prompts' KV caches kept for reuse, keyed by their tokens: a later prompt that starts the same way (a
system prompt, the earlier turns of a chat) skips that part of its prefill.

Entries live in host RAM (an LRU bounded in bytes, cachetools') and, with a directory, on disk (bounded in bytes,
the least recently used removed first). In RAM every entry is a piece of one arena of the cache's RAM bytes, made
when the cache opens and, on a GPU, page-locked then, once (`transfer.PinnedArena`): pinning memory as entries come
took 0.62 s a GiB on an H200, and it held up the model's own CUDA calls meanwhile. A hit then crosses the link at
full speed. On disk an entry is one safetensors file: its tokens, each layer's keys and values for one sequence, the
model it was made by and an xxh3-128 checksum of its tensors. Files are written whole or not at all
(`write_atomic`). Copies to RAM and writes to disk run on threads of their own (a lookup waits for the copies
queued before it). A file that fails to parse, whose checksum differs or that another model made is ignored (and a
corrupt one removed), never served.

A lookup takes the entry sharing the longest common prefix with the prompt, at most all but the prompt's last
token (whose logits the caller needs), and at least `MIN_PREFIX_TOKENS`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any

import cachetools
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ...files import PAGE_BYTES, write_atomic
from ...transfer import Arena, PinnedArena
from ...units import align
from .host_copy import Layers, copy_to_host, host_bytes, to_device

log = logging.getLogger(__name__)

MIN_PREFIX_TOKENS = 16
SUFFIX = ".kv.safetensors"


@dataclasses.dataclass
class PrefixStats:
    """What the cache did: prompts served from it (`on_device` of them from the sequence kept on the device),
    tokens they did not prefill, prompts not found, entries stored, entries refused as corrupt or stale."""

    hits: int = 0
    on_device: int = 0
    tokens_saved: int = 0
    misses: int = 0
    stored: int = 0
    refused: int = 0


@dataclasses.dataclass(frozen=True)
class _Held:
    """An entry's layers in RAM: views of `piece`, its part of the arena."""

    layers: Layers
    piece: torch.Tensor

    @property
    def nbytes(self) -> int:
        return align(self.piece.numel(), PAGE_BYTES)  # what the arena counts


class _HeldEntries(cachetools.LRUCache):
    """The entries in RAM, least recently used first out; an entry that leaves gives its piece back to `arena`."""

    def __init__(self, arena: Arena, capacity_bytes: int) -> None:
        super().__init__(maxsize=capacity_bytes, getsizeof=lambda held: held.nbytes)
        self.arena = arena

    def popitem(self) -> tuple[str, _Held]:
        name, held = super().popitem()
        self.arena.give(held.piece)
        return name, held

    def piece(self, nbytes: int) -> torch.Tensor | None:
        """A piece of `nbytes`, the least recently used entries let go until one is free; None when the arena
        could not hold it even empty."""
        if align(nbytes, PAGE_BYTES) > self.maxsize:
            return None
        while (piece := self.arena.take(nbytes)) is None and len(self):
            self.popitem()
        return piece


@dataclasses.dataclass
class _Entry:
    tokens: torch.Tensor  # int64, the sequence whose KV the entry holds
    nbytes: int
    last_used: float


def model_key(config: Any, dtype: torch.dtype, layouts: Any, codec: Any) -> str:
    """What makes one model's KV cache another's: its config, compute dtype, compression and units' sizes."""
    text = json.dumps({"config": config.to_json_string(use_diff=False), "dtype": str(dtype), "codec": repr(codec),
                       "units": sorted((key, layout.nbytes) for key, layout in layouts.items())}, sort_keys=True)
    return xxhash.xxh3_128_hexdigest(text.encode())


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = xxhash.xxh3_128()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(memoryview(tensors[name].contiguous().view(torch.uint8).numpy()))
    return digest.hexdigest()


class PrefixCache:
    """KV caches of earlier sequences for `model` (its `model_key`), up to `ram_bytes` in RAM and `disk_bytes` in
    `directory` (None: RAM only). `pinned`: the RAM is page-locked (the model runs on a GPU). Thread-safe; `close`
    waits for the work in flight."""

    def __init__(self, key: str, ram_bytes: int, directory: str | None = None, disk_bytes: int = 0,
                 pinned: bool = False) -> None:
        self.key = key
        self.directory = directory
        self.disk_bytes = disk_bytes
        self.stats = PrefixStats()
        ram_bytes = align(ram_bytes, PAGE_BYTES)
        self._pinned = pinned
        self._arena = PinnedArena(ram_bytes) if pinned and ram_bytes else Arena(ram_bytes)
        self._ram = _HeldEntries(self._arena, ram_bytes)
        self._index: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._stream: torch.cuda.Stream | None = None  # the copies' own, made at the first copy from a GPU
        self._on_device: tuple[torch.Tensor, Layers] | None = None  # see keep_on_device
        self._copier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tierstore-prefix-ram")
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tierstore-prefix-disk")
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            self._scan()

    def _scan(self) -> None:
        """Index the directory's entries by their tokens (read lazily below), leftovers of killed writes removed."""
        for item in os.scandir(self.directory):
            if item.name.startswith(".tmp-"):
                os.unlink(item.path)  # write_atomic's temporary file of a killed run: never an entry
            elif item.name.endswith(SUFFIX):
                tokens = self._read_tokens(item.path)
                if tokens is not None:
                    stat = item.stat()
                    self._index[item.name[:-len(SUFFIX)]] = _Entry(tokens, stat.st_size, stat.st_mtime)

    def lookup(self, tokens: list[int]) -> tuple[int, Layers] | None:
        """The longest stored prefix of `tokens` (all but the last at most) and its layers cropped to it, on the
        CPU, or on the device when the sequence kept there (`keep_on_device`) is the longest; None (counted a miss)
        when none is at least MIN_PREFIX_TOKENS long. The sequence kept on the device is let go either way."""
        query = torch.tensor(tokens, dtype=torch.long)
        # the sequences being kept count (a turn may follow at once), and until copied they hold their device
        # memory: waiting for all of them keeps a new cache from being made beside them (measured on an H200, a
        # server waiting only for related ones peaked at 4.37 GB of a 4 GB budget)
        self._copier.submit(lambda: None).result()
        on_device, self._on_device = self._on_device, None
        with self._lock:
            best, best_length = None, 0
            for name, entry in self._index.items():
                length = common_prefix(entry.tokens, query)
                if length > best_length:
                    best, best_length = name, length
        device_length = common_prefix(on_device[0], query) if on_device is not None else 0
        usable = min(max(best_length, device_length), len(tokens) - 1)
        layers = None
        if usable >= MIN_PREFIX_TOKENS:
            if on_device is not None and device_length >= best_length:
                layers = on_device[1]
                self.stats.on_device += 1
            else:
                layers = self._load(best)
        if layers is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.tokens_saved += usable
        return usable, [(k[..., :usable, :], v[..., :usable, :]) for k, v in layers]

    def keep_on_device(self, tokens: list[int], layers: Layers) -> None:
        """Hold on to the KV cache of the sequence that just finished (`tokens`, which `store` keeps too) where
        it is, for the next lookup only: a next turn that continues it starts without a copy. The caller keeps
        room for it on the device until then (a server between requests)."""
        self._on_device = (torch.tensor(tokens, dtype=torch.long), layers)

    def store(self, tokens: list[int], layers: Layers) -> None:
        """Keep `layers` (one sequence's KV cache, any device; tensors no one writes to again) as the entry for
        `tokens`. The copy to RAM and the write to disk run on the cache's own threads: a server's next request
        does not wait for them, only a lookup for the copies."""
        if len(tokens) < MIN_PREFIX_TOKENS:
            return
        ready = None
        if layers and layers[0][0].is_cuda:  # the copy waits for the work that wrote them, and nothing after
            ready = torch.cuda.Event()
            ready.record()
        self._copier.submit(self._keep, torch.tensor(tokens, dtype=torch.long), layers, ready)

    def _keep(self, tokens: torch.Tensor, layers: Layers, ready: torch.cuda.Event | None) -> None:
        name = xxhash.xxh3_128_hexdigest(self.key.encode() + tokens.numpy().tobytes())
        held = self._hold(name, layers, ready)
        if held is None:  # larger than the RAM the cache may take: on disk only, or not at all
            if self.directory is None:
                return
            layers = [(keys.cpu(), values.cpu()) for keys, values in layers]
        with self._lock:
            self._index[name] = _Entry(tokens, held.nbytes if held else host_bytes(layers), time.time())
            self.stats.stored += 1
        if self.directory is not None:
            self._writer.submit(self._write, name, tokens, held.layers if held else layers)

    def _hold(self, name: str, layers: Layers, ready: torch.cuda.Event | None = None) -> _Held | None:
        """`layers` copied into a piece of the arena and kept in RAM as `name`; None when they are larger than
        the cache's RAM. A copy from a GPU runs on the cache's stream after `ready`. (A piece that an entry gave
        back may still be the source of a hit's copy to the device: that copy was queued on the compute stream
        before `ready` was recorded there, so the new copy waits for it.)"""
        with self._lock:
            piece = self._ram.piece(host_bytes(layers))
        if piece is None:
            return None
        if ready is not None and self._stream is None:
            self._stream = torch.cuda.Stream(layers[0][0].device)
        held = _Held(copy_to_host(layers, piece, ready, self._stream if ready is not None else None), piece)
        with self._lock:
            self._ram[name] = held
        return held

    def settle(self) -> None:
        """Wait for the entries being kept, in RAM and on disk."""
        self._copier.submit(lambda: None).result()
        self._writer.submit(lambda: None).result()

    def _write(self, name: str, tokens: torch.Tensor, layers: Layers) -> None:
        tensors = {"tokens": tokens}
        for index, (keys, values) in enumerate(layers):
            tensors[f"k.{index}"], tensors[f"v.{index}"] = keys.contiguous(), values.contiguous()
        data = save_safetensors(tensors, metadata={"model": self.key, "checksum": _checksum(tensors)})
        try:
            write_atomic(self._path(name), data)
        except OSError:
            log.warning("could not write a prefix cache entry to %s", self.directory, exc_info=True)
            return
        with self._lock:
            if name in self._index:
                self._index[name].nbytes = len(data)
            self._evict_disk()

    def _evict_disk(self) -> None:
        """Called under the lock: the least recently used entries' files removed while the directory holds more
        than its bytes."""
        on_disk = sorted((entry.last_used, name) for name, entry in self._index.items()
                         if os.path.exists(self._path(name)))
        total = sum(self._index[name].nbytes for _, name in on_disk)
        for _, name in on_disk:
            if total <= self.disk_bytes:
                break
            total -= self._index[name].nbytes
            os.unlink(self._path(name))
            if name not in self._ram:
                del self._index[name]

    def _load(self, name: str) -> Layers | None:
        """An entry's layers from RAM, else from disk (verified, then kept in RAM); None when refused."""
        with self._lock:
            held = self._ram.get(name)
            self._index[name].last_used = time.time()
            if held is None and (self.directory is None or not os.path.exists(self._path(name))):
                del self._index[name]  # left RAM, and no file (yet, or any more)
                return None
        if held is not None:
            return held.layers
        layers = self._read(name)
        if layers is None:
            with self._lock:
                self._index.pop(name, None)
            return None
        if self._pinned:  # the piece it takes may be an earlier hit's, which may still be crossing to the device
            torch.cuda.current_stream().synchronize()
        held = self._hold(name, layers)  # None: larger than the cache's RAM, served from the file each time
        return held.layers if held is not None else layers

    def _read_tokens(self, path: str) -> torch.Tensor | None:
        """An entry file's tokens, read without its layers; None when the file is refused."""
        try:
            with safe_open(path, "pt") as opened:
                if (opened.metadata() or {}).get("model") != self.key:
                    self.stats.refused += 1  # another model's: left for it
                    return None
                return opened.get_tensor("tokens")
        except Exception as exc:  # noqa: BLE001 - a file that does not parse is corrupt, whatever the parser says
            self._refuse(path, f"does not parse ({exc})")
            return None

    def _read(self, name: str) -> Layers | None:
        """An entry file's layers, checked against its checksum; None (the file removed) when it is corrupt."""
        path = self._path(name)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            tensors = load_safetensors(data)
            header_bytes = int.from_bytes(data[:8], "little")
            metadata = json.loads(data[8:8 + header_bytes]).get("__metadata__", {})
        except Exception as exc:  # noqa: BLE001 - as above
            self._refuse(path, f"does not parse ({exc})")
            return None
        if metadata.get("model") != self.key or _checksum(tensors) != metadata.get("checksum"):
            self._refuse(path, "checksum mismatch")
            return None
        return [(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in range(sum(1 for n in tensors if n[0] == "k"))]

    def _refuse(self, path: str, why: str) -> None:
        """A corrupt entry file: counted, logged and removed."""
        log.warning("prefix cache entry %s %s; removed", path, why)
        self.stats.refused += 1
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _path(self, name: str) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, name + SUFFIX)

    def close(self) -> None:
        self._copier.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self._on_device = None
        with self._lock:
            self._ram.clear()
            self._arena.release()


def common_prefix(stored: torch.Tensor, query: torch.Tensor) -> int:
    """How many tokens two sequences share from their start."""
    length = min(len(stored), len(query))
    differs = (stored[:length] != query[:length]).nonzero()
    return int(differs[0]) if differs.numel() else length


def cache_layers(cache: Any) -> Layers | None:
    """A one-sequence cache's keys and values per layer, when every layer is plain full attention (None otherwise:
    a window's or a recurrent state cannot be cut to a prefix)."""
    from transformers.cache_utils import DynamicLayer

    if any(not isinstance(layer, DynamicLayer) or type(layer).__name__ not in ("DynamicLayer", "ReservedLayer")
           for layer in getattr(cache, "layers", [None])):
        return None
    return [(layer.keys, layer.values) for layer in cache.layers]


def restore(cache: Any, layers: Layers, device: torch.device) -> None:
    """Fill an empty cache with a prefix's `layers` (from `PrefixCache.lookup`), moved to `device`. The list is
    emptied as its layers are copied, so that a prefix kept on the device lets its memory go a layer at a time."""
    for index, (keys, values) in enumerate(layers):
        layers[index] = None  # type: ignore[call-overload]
        cache.layers[index].update(to_device(keys, device), to_device(values, device))
        del keys, values
