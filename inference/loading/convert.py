"""Converting a checkpoint (GGUF, .bin shards, safetensors that need renaming) into a layer store, once.

Streams: one source shard (or one unit) in memory at a time. Resumable: each finished unit is recorded by a
small sidecar written atomically after its data file, and skipped when the conversion runs again. Two processes
converting into the same directory serialise on a lock file; the second finds the work done.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ...compression import Codec
from ...config import Config
from ...errors import CheckpointError
from ...sizes import format_size
from ..devices import compute_device, dtype_name
from .checkpoint import cut_short, gguf_cut_short, load_config, load_tokenizer, safetensors_entries
from .gguf_packed import GGUFTensors, PackedMatrix, has_quantized_stacks
from .layerstore import MANIFEST
from .resolve import Checkpoint
from .skeleton import Skeleton, build_skeleton, parse_slice
from .store_writer import (
    default_store_dir,
    finished_units,
    parameter_shapes,
    planned_tensor,
    progress_bar,
    require_room,
    store_writer,
    write_metadata,
    write_tensors,
)

log = logging.getLogger(__name__)


def convert_if_needed(checkpoint: Checkpoint, cfg: Config, trust_remote_code: bool, progress: bool) -> Checkpoint:
    """The checkpoint to read units from: a GGUF file or .bin shards become a layer store in the cache, once;
    safetensors and layer stores are read as they are."""
    if checkpoint.kind not in ("gguf", "bin"):
        return checkpoint
    return convert_into_cache(checkpoint, cfg, trust_remote_code, progress)


def convert_into_cache(checkpoint: Checkpoint, cfg: Config, trust_remote_code: bool, progress: bool) -> Checkpoint:
    """The layer store of `checkpoint` in the cache, converted on first use. A GGUF's quantized matrices stay in
    their file's formats unless the config compresses the model itself or asks for them dequantized. Experts kept
    whole inside their layers is another store than experts as units of their own; for a model without routed
    experts the two hold the same bytes, so a finished one of either serves both (one copy in the cache, not two)."""
    keep_ggml = keeps_ggml(checkpoint, cfg)
    with _gguf_errors(checkpoint):
        stacks = keep_ggml and cfg.splits_experts and has_quantized_stacks(checkpoint.path)
    store_dir = default_store_dir(checkpoint, cfg.runtime.cache_dir, None,
                                  variant=_variant(cfg.splits_experts, keep_ggml, stacks))
    other = default_store_dir(checkpoint, cfg.runtime.cache_dir, None,
                              variant=_variant(not cfg.splits_experts, keep_ggml))
    if not _finished(store_dir) and _finished(other) and not has_routed_experts(other, trust_remote_code):
        log.info("%s: the layer store %s serves both expert layouts (the model has no routed experts)",
                 checkpoint.path, other)
        return Checkpoint("store", other, checkpoint.name)
    convert(checkpoint, store_dir, trust_remote_code=trust_remote_code, progress=progress,
            disk_budget_bytes=cfg.budget.disk, split_experts=cfg.splits_experts, keep_ggml=keep_ggml)
    return Checkpoint("store", store_dir, checkpoint.name)


def keeps_ggml(checkpoint: Checkpoint, cfg: Config) -> bool:
    """Whether a GGUF's matrices stay in their own formats: not when the model is to be compressed by tierstore,
    and as `compression.gguf` says (auto: where the model computes on a GPU)."""
    if checkpoint.kind != "gguf" or cfg.compression.format != "none":
        return False
    if cfg.compression.gguf == "auto":
        return compute_device(cfg.runtime.device).type == "cuda"
    return cfg.compression.gguf == "packed"


def _variant(split_experts: bool, keep_ggml: bool, packed_experts: bool = False) -> str:
    """The cache key's variant of a plain conversion: experts kept whole inside their layers is another store, and
    so is a GGUF with its matrices kept packed, and one whose expert stacks are kept packed (a store of the same
    GGUF converted before tierstore kept them is not that one)."""
    parts = (["ggml"] if keep_ggml else []) + ([] if split_experts else ["whole-experts"]) \
        + (["packed-experts"] if packed_experts else [])
    return "-".join(parts)


def _finished(store_dir: str) -> bool:
    return os.path.isfile(os.path.join(store_dir, MANIFEST))


def has_routed_experts(checkpoint_dir: str, trust_remote_code: bool) -> bool:
    """Whether the model of a store or a directory has routed experts that could be units of their own (built on
    the meta device from its config: nothing is read)."""
    config = load_config(Checkpoint("store", checkpoint_dir, os.path.basename(checkpoint_dir)), trust_remote_code)
    return bool(build_skeleton(config, torch.float32, trust_remote_code, split_experts=True).experts)


def convert(checkpoint: Checkpoint, out_dir: str, dtype: torch.dtype | None = None,
            trust_remote_code: bool = False, progress: bool = True, disk_budget_bytes: int | None = None,
            split_experts: bool = True, keep_ggml: bool = False) -> str:
    """Write the layer store of `checkpoint` into `out_dir` (resuming a killed run); returns `out_dir`. Refuses
    a finished store of another dtype or format there, and a store larger than `disk_budget_bytes`. With
    `split_experts`, each routed expert of a mixture-of-experts layer is a unit: a file of its own. With
    `keep_ggml` (a GGUF, no `dtype`), the layers' quantized matrices keep their file's block formats."""
    keep_ggml = keep_ggml and checkpoint.kind == "gguf" and dtype is None
    requested = dtype_name(dtype) if dtype is not None else None  # None: each tensor as the checkpoint stores it
    compression = Codec.ggml().to_dict() if keep_ggml else None
    with store_writer(out_dir, requested, compression) as finished:
        if finished:
            log.info("layer store of %s already in %s", checkpoint.path, out_dir)
            return out_dir
        log.info("converting %s into the layer store %s", checkpoint.path, out_dir)
        config = load_config(checkpoint, trust_remote_code)
        skeleton = build_skeleton(config, torch.float32, trust_remote_code, split_experts=split_experts)
        gguf = _open_gguf(checkpoint, skeleton, keep_ggml) if checkpoint.kind == "gguf" else None
        packed = gguf.packed_bytes() if gguf is not None else {}
        done = finished_units(out_dir)
        total_bytes, left_bytes = _plain_bytes(skeleton, {}, dtype, packed), _plain_bytes(skeleton, done, dtype, packed)
        require_room(out_dir, left_bytes, disk_budget_bytes)
        name = os.path.basename(checkpoint.path)
        announce = (f"converting {name} into a layer store of {format_size(total_bytes)}, once: later runs read "
                    f"{out_dir}")
        with progress_bar(progress, total_bytes, total_bytes - left_bytes, f"reading {name}", announce) as advance:
            records = _convert_units(checkpoint, skeleton, out_dir, dict(done), dtype, advance, gguf)
            advance(0, "saving the tokenizer and config")
            kind = {"compression": compression} if compression else {"dtype": requested}
            write_metadata(out_dir, os.path.abspath(checkpoint.path), config, records,
                           load_tokenizer(checkpoint, trust_remote_code), **kind)
    return out_dir


def _convert_units(checkpoint: Checkpoint, skeleton: Skeleton, out_dir: str, records: dict[str, Any],
                   dtype: torch.dtype | None, advance: Callable[..., None],
                   gguf: GGUFTensors | None) -> dict[str, Any]:
    """Every unit not in `records` written from the checkpoint's shards, one shard in memory at a time; returns
    all the units' records. CheckpointError when the checkpoint lacks a unit's tensors."""
    owners: dict[str, list[tuple[str, str, int | None]]] = {}  # tensor -> (unit key, name there, expert)
    for key, names in skeleton.units.items():
        for name in names:
            tensor, expert = parse_slice(name)
            owners.setdefault(tensor, []).append((key, name, expert))
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for shard in _shards(checkpoint, skeleton, gguf):
        advance(0, "converting units")
        for tensor_name, tensor in shard.items():
            for key, name, expert in owners.get(tensor_name, ()):
                if key in records:
                    continue
                pending.setdefault(key, {})[name] = tensor if expert is None else tensor[expert]
                if len(pending[key]) == len(skeleton.units[key]):
                    records[key] = write_tensors(out_dir, key, pending.pop(key), skeleton.units[key], dtype)
                    advance(records[key]["nbytes"])
    missing = [key for key in skeleton.units if key not in records]
    if missing:
        raise CheckpointError(f"{checkpoint.path}: no weights for unit {missing[0]!r} ({len(missing)} units "
                              f"incomplete)")
    return records


def _open_gguf(checkpoint: Checkpoint, skeleton: Skeleton, keep_ggml: bool) -> GGUFTensors:
    with _gguf_errors(checkpoint):
        return GGUFTensors(checkpoint.path, skeleton, keep_ggml)


@contextlib.contextmanager
def _gguf_errors(checkpoint: Checkpoint) -> Iterator[None]:
    """A GGUF the reader cannot read, as one CheckpointError naming the file."""
    try:
        yield
    except (ValueError, KeyError, OSError) as exc:
        if cut_short(exc):
            raise CheckpointError(gguf_cut_short(checkpoint.path)) from exc
        raise CheckpointError(f"{checkpoint.path}: cannot read GGUF: {exc}") from exc


def _shards(checkpoint: Checkpoint, skeleton: Skeleton,
            gguf: GGUFTensors | None) -> Iterator[dict[str, torch.Tensor | PackedMatrix]]:
    with _no_transformers_bars():
        yield from _read_shards(checkpoint, skeleton, gguf)


@contextlib.contextmanager
def _no_transformers_bars() -> Iterator[None]:
    """transformers' own progress bars (GGUF de-quantization, "Loading weights") are noise beside tierstore's
    one bar; its GGUF reader imports tqdm directly, so that one is switched off where it is looked up."""
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    bar = gguf_reader.tqdm
    gguf_reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_reader.tqdm = bar
        if shown:
            hf_logging.enable_progress_bar()


def _read_shards(checkpoint: Checkpoint, skeleton: Skeleton,
                 gguf: GGUFTensors | None) -> Iterator[dict[str, torch.Tensor | PackedMatrix]]:
    if gguf is not None:
        with _gguf_errors(checkpoint):
            yield from gguf
    elif checkpoint.kind == "bin":
        for path in sorted(glob.glob(os.path.join(checkpoint.path, "*.bin"))):
            try:
                yield torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # torch raises many types for a bad pickle
                raise CheckpointError(f"{path}: cannot read PyTorch weights: {exc}") from exc
    elif checkpoint.kind == "safetensors":
        yield from _renamed_safetensors(checkpoint, skeleton)
    else:
        raise CheckpointError(f"{checkpoint.path}: a {checkpoint.kind} checkpoint needs no conversion")


def _renamed_safetensors(checkpoint: Checkpoint, skeleton: Skeleton) -> Iterator[dict[str, torch.Tensor]]:
    """Checkpoints whose names differ from the model's (e.g. per-expert MoE weights): transformers' own
    conversion rules, applied to one decoder layer's tensors at a time."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    model = skeleton.model
    entries = safetensors_entries(checkpoint.path)
    groups: dict[str, list[str]] = {}
    for name in entries:
        parts = name.split(".")
        layer = next((parts[i + 1] for i, part in enumerate(parts[:-1]) if part == "layers"), "rest")
        groups.setdefault(layer, []).append(name)
    mapping = get_model_conversion_mapping(model)
    for names in groups.values():
        state: dict[str, torch.Tensor] = {}
        for name in names:
            with safe_open(entries[name].path, "pt") as handle:
                state[name] = handle.get_tensor(name)
        convert_and_load_state_dict_in_model(
            model, state, LoadStateDictConfig(weight_mapping=mapping, device_map={"": "cpu"}))
        loaded = {}
        for module_name, module in model.named_modules():
            for attr, param in list(module._parameters.items()):
                if param is not None and param.device.type != "meta":
                    loaded[f"{module_name}.{attr}" if module_name else attr] = param.detach()
                    module._parameters[attr] = torch.nn.Parameter(param.detach().to("meta"), requires_grad=False)
        yield loaded


def _plain_bytes(skeleton: Skeleton, done: dict[str, Any], dtype: torch.dtype | None,
                 packed: dict[str, int]) -> int:
    """Bytes the units not yet written will take, floating-point tensors in `dtype` (None: as the model's), the
    matrices in `packed` at their packed bytes."""
    shapes = parameter_shapes(skeleton)
    return sum(packed[name] if name in packed else kind.itemsize * math.prod(shape)
               for key, names in skeleton.units.items() if key not in done
               for name in names for kind, shape in (planned_tensor(shapes, name, dtype),))
