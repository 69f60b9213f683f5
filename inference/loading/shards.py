"""Tensor parallelism's shards: one process per device, each holding and streaming its shard of every unit, so
that each host-to-device link carries 1/N of a pass's bytes (runtime/collectives.py joins the ranks and combines
their outputs).

The sharding is transformers' own tensor-parallel plan for the architecture (`model.tp_plan`, built from the
config's `base_model_tp_plan` and the head's `_tp_plan`):
- `colwise`: a weight's output rows (and its bias) are split; the output stays split, as the next op expects.
- `rowwise`: a weight's input columns are split; the partial outputs are summed over the ranks (all-reduce), and
  only rank 0 keeps the bias. `rowwise_split_input`: the same, for a module given its whole input (after a
  gathered one), which each rank first cuts to its columns.
- `colwise_gather_output` (the LM head) and `embedding_rowwise` (the input embedding): the vocabulary is split;
  the head's logits are gathered, the embedding's rows summed (each rank embeds the ids in its slice).
- `replicated...` and modules the plan does not name: every rank holds the whole tensor.
Attention then runs on each rank's own heads, and the KV cache holds only them. Each rank's shards are written
once, as a layer store of their own in the cache (`rank_store`): read whole from the checkpoint (checked against
their checksums there), sliced, and stored with checksums of their own; every read after that is the rank's 1/N.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Hashable
from typing import Any

import torch
from torch import nn

from ...config import Config
from ...errors import CheckpointError, InputError, ModelError
from ...units import UnitLayout
from .skeleton import Skeleton
from .sources import Units, close_source, drops_page_cache, store_source
from .store_writer import copy_units, default_store_dir

SPLIT_DIM = {"colwise": 0, "colwise_gather_output": 0, "embedding_rowwise": 0, "rowwise": 1, "rowwise_split_input": 1}
VOCAB_STYLES = ("colwise_gather_output", "embedding_rowwise")  # whole on every rank when N does not divide it


@dataclasses.dataclass(frozen=True)
class Group:
    """This process's place among the ranks; `owned`: this process set up the process group (and ends it)."""

    rank: int
    world: int
    owned: bool = False


@dataclasses.dataclass(frozen=True)
class Split:
    """A rank's part of one tensor: `length` entries from `start` along `dim`; `zero`: none of it (a rowwise
    bias, which only rank 0 adds)."""

    dim: int
    start: int
    length: int
    zero: bool = False


def check_world(hf_config: Any, world: int) -> None:
    """Refuse N that cannot split the attention heads, naming both."""
    text = hf_config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    if heads is None:
        raise InputError(f"--tp {world}: this model ({text.model_type}) has no attention heads to split")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    for count, what in ((heads, "attention heads"), (kv_heads, "key-value heads")):
        if count % world:
            raise InputError(f"--tp {world} does not divide the model's {count} {what}; use a divisor of {count}")


def rank_note(group: Group) -> str:
    """The plan's note on a rank's share."""
    return (f"tensor parallel: rank {group.rank} of {group.world}, holding its shard of every unit (every rank's "
            f"budget is its own device's)")


def shard_units(units: Units, group: Group) -> tuple[Units, dict[nn.Module, str]]:
    """`units` as this rank holds them, and the modules that run split with their plan styles (for
    `Collectives`)."""
    check_world(units.hf_config, group.world)
    if units.codec is not None:
        raise ModelError("tensor parallelism runs uncompressed models; compressed units are not split yet")
    splits, styles = plan_splits(units.skeleton, units.layouts, group)
    layouts = split_layouts(units.layouts, splits)
    source = ShardSource(units.source, units.layouts, layouts, splits)
    return dataclasses.replace(units, source=source, layouts=layouts), styles


def rank_store(units: Units, group: Group, cfg: Config, device: torch.device, progress: bool) -> Units:
    """`units` (a rank's, from `shard_units`) read from a layer store of this rank's shards in the cache, written
    on first use (a killed write resumes): later opens and every pass read 1/N of each unit, each shard checked
    against its own checksum. The whole units' files are closed once the shards are written."""
    store_dir = default_store_dir(units.checkpoint, cfg.runtime.cache_dir, units.dtype,
                                  variant=f"tp{group.world}-rank{group.rank}")
    copy_units(store_dir, units.source, units.layouts, units.dtype, units.hf_config, origin=units.checkpoint.path,
               disk_budget_bytes=cfg.budget.disk, progress=progress)
    source = store_source(store_dir, cfg.io.verify_checksums, units.dtype, drops_page_cache(cfg, device))
    stale = next((key for key, layout in units.layouts.items() if _layout_or_none(source, key) != layout), None)
    if stale is not None:
        close_source(source)
        raise CheckpointError(f"{store_dir}: unit {stale!r} was sharded another way (another transformers "
                              f"release's plan?); delete that folder and the next run writes it again")
    units.close()
    return dataclasses.replace(units, source=source)


def _layout_or_none(source: Any, key: str) -> UnitLayout | None:
    try:
        return source.layout(key)
    except KeyError:
        return None


def plan_splits(skeleton: Skeleton, layouts: dict[str, UnitLayout],
                group: Group) -> tuple[dict[str, dict[str, Split]], dict[nn.Module, str]]:
    """Each unit's tensors' splits on this rank (tensors not named are whole), and the modules that run split
    with their plan style (which says what their outputs need)."""
    if skeleton.experts:
        raise ModelError("tensor parallelism does not split mixture-of-experts layers yet; run it with one rank")
    plan = dict(getattr(skeleton.model, "tp_plan", None) or {})
    if not plan:
        raise ModelError(f"transformers has no tensor-parallel plan for {type(skeleton.model).__name__}; run it "
                         f"with one rank")
    patterns = [(re.compile(re.escape(name).replace(r"\*", r"\d+") + "$"), style) for name, style in plan.items()]
    names = {module: name for name, module in skeleton.model.named_modules()}
    splits: dict[str, dict[str, Split]] = {}
    styles: dict[nn.Module, str] = {}
    for site in skeleton.sites:
        for binding in site.bindings:
            module_name = names[binding.module]
            style = next((style for pattern, style in patterns if pattern.match(module_name)), None)
            if style is None or style.startswith("replicated"):
                continue
            if style not in SPLIT_DIM:
                raise ModelError(f"tensor parallelism: transformers' plan splits {module_name} as {style!r}, "
                                 f"which tierstore does not run yet; run this model with one rank")
            shape = layouts[site.key].slots[binding.tensor].shape
            split = _split(style, binding.attr, shape, group)
            if split is None:
                continue
            known = splits.setdefault(site.key, {}).get(binding.tensor)
            if known is not None and known != split:
                raise ModelError(f"tensor parallelism: {binding.tensor} is split two ways (tied to two modules)")
            splits[site.key][binding.tensor] = split
            styles[binding.module] = style
    return splits, styles


def _split(style: str, attr: str, shape: tuple[int, ...], group: Group) -> Split | None:
    dim = SPLIT_DIM[style] if attr == "weight" else 0
    if style.startswith("rowwise") and attr != "weight":  # a bias: added once, after the sum
        return None if group.rank == 0 else Split(0, 0, shape[0], zero=True)
    if shape[dim] % group.world:
        if style in VOCAB_STYLES:
            return None  # a vocabulary N does not divide: whole on every rank
        raise InputError(f"--tp {group.world} does not divide dimension {dim} ({shape[dim]}) of a {style} {attr}")
    length = shape[dim] // group.world
    return Split(dim, group.rank * length, length)


def split_layouts(layouts: dict[str, UnitLayout], splits: dict[str, dict[str, Split]]) -> dict[str, UnitLayout]:
    """The units as this rank holds them: split tensors at their shard's shape."""
    result = {}
    for key, layout in layouts.items():
        mine = splits.get(key)
        if not mine:
            result[key] = layout
            continue
        tensors = {}
        for name, slot in layout.slots.items():
            shape = list(slot.shape)
            if name in mine and not mine[name].zero:
                shape[mine[name].dim] = mine[name].length
            tensors[name] = (slot.dtype, tuple(shape))
        result[key] = UnitLayout.pack(key, tensors)
    return result


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
