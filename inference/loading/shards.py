"""Tensor parallelism's shards: one process per device, each holding and streaming its shard of every unit, so
that each host-to-device link carries 1/N of a pass's bytes (runtime/collectives.py joins the ranks and combines
their outputs).

How a model is split is splits.py's (transformers' own tensor-parallel plan for the architecture). Each rank's
shards are written once, as a layer store of their own in the cache (`rank_store`): read whole from the checkpoint
(checked against their checksums there), sliced, and stored with checksums of their own; every read after that is
the rank's 1/N. A rank of a model known only by its config.json reads shards written beforehand by
`write_store(..., shard=)` (random weights for a benchmark at a size no disk here holds whole).

A compressed model is sharded before it is compressed: each rank quantizes its own shards (on its own device) and
writes them once, so no rank ever holds or writes the whole compressed model. Quantization blocks run over each
matrix's flattened elements; where a shard's cut falls on the whole matrix's block boundaries (`cut_blocks` finds
the matrices where it does not), the rank's blocks are the one-process model's, bit for bit.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable
from typing import Any

import torch
from torch import nn

from ...compression import Codec
from ...config import Config
from ...errors import CheckpointError, ModelError
from ...units import UnitLayout
from .layerstore import MANIFEST
from .resolve import Checkpoint
from .sources import Units, as_compressed, close_source, drops_page_cache, store_source
from .splits import Group, Split, check_world, plan_splits, split_layouts
from .store_writer import compress, copy_units, default_store_dir


def rank_note(group: Group, codec: Codec | None = None) -> str:
    """The plan's note on a rank's share."""
    share = f"its shard of every unit, quantized to {codec.name} by the rank itself" if codec else \
        "its shard of every unit"
    return f"tensor parallel: rank {group.rank} of {group.world}, holding {share} (every rank's budget is its own " \
           f"device's)"


def blocks_note(cut: list[str]) -> str:
    """The plan's note on whether the ranks' quantization blocks are the one-process model's."""
    if not cut:
        return "tensor parallel: every shard starts and ends on a quantization block of its whole matrix, so the " \
               "ranks' weights are a one-process compressed model's, bit for bit"
    return (f"tensor parallel: {len(cut)} matrices (first {cut[0]}) are cut inside a quantization block, so their "
            f"shards are quantized afresh: the same format, not bit-equal to a one-process compressed model")


def shard_units(units: Units, group: Group) -> tuple[Units, dict[nn.Module, str]]:
    """`units` (uncompressed) as this rank holds them, and the modules that run split with their plan styles (for
    `Collectives`)."""
    check_world(units.hf_config, group.world)
    if units.codec is not None:
        raise ModelError(f"{units.checkpoint.path} is stored compressed ({units.codec.name}); tensor parallelism "
                         f"compresses each rank's shard itself: give the uncompressed model (or its GGUF) and set "
                         f"compression.format")
    splits, styles = plan_splits(units.skeleton, units.layouts, group)
    layouts = split_layouts(units.layouts, splits)
    source = ShardSource(units.source, units.layouts, layouts, splits)
    return dataclasses.replace(units, source=source, layouts=layouts), styles


def rank_store(units: Units, group: Group, cfg: Config, device: torch.device, progress: bool,
               trust_remote_code: bool = False) -> Units:
    """`units` (a rank's, from `shard_units`) read from a layer store of this rank's shards in the cache, written
    on first use (a killed write resumes) and compressed there, on `device`, when `cfg.compression` asks: later opens
    and every pass read 1/N of each unit, each shard checked against its own checksum. The whole units' files are
    closed once the shards are written."""
    codec = Codec.wanted(cfg.compression)
    store_dir = rank_store_dir(units.checkpoint, cfg, units.dtype, group)
    if units.checkpoint.kind == "config" and not os.path.isfile(os.path.join(store_dir, MANIFEST)):
        raise CheckpointError(f"{units.checkpoint.path}: has config.json but no weights, and rank {group.rank}'s "
                              f"shards are not in {store_dir} (write_store(..., shard=) writes them)")
    expected = units.layouts
    if codec is None:
        copy_units(store_dir, units.source, units.layouts, units.dtype, units.hf_config,
                   origin=units.checkpoint.path, disk_budget_bytes=cfg.budget.disk, progress=progress)
    else:
        compress(units.source, units.skeleton, units.checkpoint, store_dir, codec, device, trust_remote_code,
                 progress, disk_budget_bytes=cfg.budget.disk)
        expected = as_compressed(units, codec).layouts
    source = store_source(store_dir, cfg.io.verify_checksums, units.dtype, drops_page_cache(cfg, device))
    stale = next((key for key, layout in expected.items() if _layout_or_none(source, key) != layout), None)
    if stale is not None:
        close_source(source)
        raise CheckpointError(f"{store_dir}: unit {stale!r} was sharded another way (another transformers "
                              f"release's plan?); delete that folder and the next run writes it again")
    units.close()
    return dataclasses.replace(units, source=source, layouts=expected, codec=getattr(source, "codec", None),
                               packed=dict(getattr(source, "packed", {})))


def rank_store_dir(checkpoint: Checkpoint, cfg: Config, dtype: torch.dtype, group: Group) -> str:
    """Where a rank's shards of `checkpoint` are kept in the cache, in `dtype` and compressed as `cfg.compression`
    asks."""
    codec = Codec.wanted(cfg.compression)
    variant = f"tp{group.world}-rank{group.rank}" + (f"-{codec.name}" if codec else "")
    return default_store_dir(checkpoint, cfg.runtime.cache_dir, dtype, variant=variant)


def whole_model_config(cfg: Config) -> Config:
    """The config ranks read the whole model with before they shard it: uncompressed (each rank compresses its own
    shards) and a GGUF's matrices dequantized (a rank's cut need not fall on their blocks)."""
    return dataclasses.replace(cfg, compression=dataclasses.replace(cfg.compression, format="none",
                                                                    gguf="dequantized"))


def _layout_or_none(source: Any, key: str) -> UnitLayout | None:
    try:
        return source.layout(key)
    except KeyError:
        return None


class ShardSource:
    """A unit source giving this rank's shard of each unit: the unit is read whole from `source` (verified there)
    into a scratch buffer, and each tensor's part copied into the rank's buffer."""

    def __init__(self, source: Any, whole: dict[str, UnitLayout], layouts: dict[str, UnitLayout],
                 splits: dict[str, dict[str, Split]]) -> None:
        self.source, self.whole, self.layouts, self.splits = source, whole, layouts, splits
        self.read_mode = getattr(source, "read_mode", "page cache")

    def layout(self, key: Hashable) -> UnitLayout:
        return self.layouts[key]  # type: ignore[index]

    def read_into(self, key: Hashable, out: torch.Tensor) -> None:
        mine = self.splits.get(key)  # type: ignore[call-overload]
        if not mine:
            self.source.read_into(key, out)
            return
        whole = self.whole[key]  # type: ignore[index]
        scratch = torch.empty(whole.nbytes, dtype=torch.uint8)
        self.source.read_into(key, scratch)
        full = whole.views(scratch)
        for name, tensor in self.layouts[key].views(out).items():  # type: ignore[index]
            split = mine.get(name)
            if split is None:
                tensor.copy_(full[name])
            elif split.zero:
                tensor.zero_()
            else:
                tensor.copy_(full[name].narrow(split.dim, split.start, split.length))

    def close(self) -> None:
        close_source(self.source)
