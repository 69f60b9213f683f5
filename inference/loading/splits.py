"""How tensor parallelism splits a model, computed from its skeleton and unit layouts alone (no bytes): each rank's
part of every tensor (`plan_splits`), the units' layouts as a rank holds them, and where a rank's cut falls inside
a quantization block. shards.py serves and stores the shards.

The splits are transformers' own tensor-parallel plan for the architecture (`model.tp_plan`, built from the
config's `base_model_tp_plan` and the head's `_tp_plan`):
- `colwise`: a weight's output rows (and its bias) are split; the output stays split, as the next op expects.
- `rowwise`: a weight's input columns are split; the partial outputs are summed over the ranks (all-reduce), and
  only rank 0 keeps the bias. `rowwise_split_input`: the same, for a module given its whole input (after a
  gathered one), which each rank first cuts to its columns.
- `colwise_gather_output` (the LM head) and `embedding_rowwise` (the input embedding): the vocabulary is split;
  the head's logits are gathered, the embedding's rows summed (each rank embeds the ids in its slice).
- `replicated...` and modules the plan does not name: every rank holds the whole tensor.
Attention then runs on each rank's own heads, and the KV cache holds only them.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from ...compression import GGML, GGML_BLOCKS, Codec, recipe_formats
from ...errors import InputError, ModelError
from ...units import UnitLayout
from .skeleton import Skeleton

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


def cut_blocks(skeleton: Skeleton, layouts: dict[str, UnitLayout], group: Group, codec: Codec) -> list[str]:
    """The matrices whose shards (under `group`) do not start and end on the whole matrix's quantization blocks
    (blocks run over a matrix's flattened elements: `compression.compress_unit`), from the whole units' `layouts`."""
    splits = plan_splits(skeleton, layouts, group)[0]
    cut = []
    for key, mine in splits.items():
        shapes = {name: layouts[key].slots[name].shape for name in mine if name in skeleton.matrices}
        formats = recipe_formats(codec, shapes, skeleton.matrices) if codec.format == GGML else {}
        for name, shape in shapes.items():
            split = mine[name]
            block = GGML_BLOCKS[formats[name]][0] if formats else codec.blocksize
            columns = shape[-1]
            whole_rows = split.dim == 0 and (split.length * columns) % block == 0
            whole_columns = split.dim == 1 and columns % block == 0 and split.length % block == 0
            if not split.zero and not (whole_rows or whole_columns):
                cut.append(name)
    return cut
