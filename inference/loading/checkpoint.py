"""Reading a located checkpoint: its config, dtype, tokenizer and safetensors headers; refusing remote code."""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any

import torch

from ...errors import CheckpointError, ModelError, first_line
from .resolve import Checkpoint
from .safetensors_header import TensorEntry, read_header

log = logging.getLogger(__name__)


def load_config(checkpoint: Checkpoint, trust_remote_code: bool = False) -> Any:
    """The transformers config of a checkpoint, refusing remote code unless asked for."""
    from transformers import AutoConfig

    try:
        if checkpoint.kind == "gguf":
            return AutoConfig.from_pretrained(os.path.dirname(checkpoint.path),
                                              gguf_file=os.path.basename(checkpoint.path))
        config_path = os.path.join(checkpoint.path, "config.json")
        try:
            with open(config_path, encoding="utf-8") as handle:
                raw = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{config_path}: unreadable config ({exc})") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{config_path}: not a JSON object")
        _check_raw_config(raw, config_path, trust_remote_code)
        return AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=trust_remote_code)
    except (CheckpointError, ModelError):
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise their own types too
        if checkpoint.kind == "gguf" and cut_short(exc):
            raise CheckpointError(gguf_cut_short(checkpoint.path)) from exc
        raise CheckpointError(f"{checkpoint.path}: transformers cannot read the config: {first_line(exc)}") from exc


def cut_short(exc: BaseException) -> bool:
    """Whether the GGUF reader's error is numpy's on a file that ends before its tensors do."""
    return isinstance(exc, ValueError) and any(words in str(exc) for words in ("cannot reshape", "buffer is smaller",
                                                                               "is not a multiple"))


def gguf_cut_short(path: str) -> str:
    """The error for a GGUF file whose tensors run past its end."""
    return (f"{path}: the GGUF file ends before its tensors do ({os.path.getsize(path)} bytes): truncated or "
            f"corrupt; copy or download it again")


def _check_raw_config(raw: dict[str, Any], where: str, trust_remote_code: bool) -> None:
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type")
    name = (raw.get("architectures") or [model_type])[0]
    if model_type in CONFIG_MAPPING:
        return
    if not check_remote_code(raw.get("auto_map"), f"{name} ({where})", trust_remote_code):
        raise ModelError(f"architecture {name} (model_type {model_type!r}) is not known to transformers")


def check_remote_code(auto_map: Any, name: str, trust_remote_code: bool) -> bool:
    """Whether the model comes with its own code (an `auto_map`); ModelError naming it when it does and running
    that code was not allowed."""
    if auto_map and not trust_remote_code:
        raise ModelError(f"{name} needs the checkpoint's own code; pass trust_remote_code=True "
                         f"(--trust-remote-code) only if you trust its author")
    return bool(auto_map)


def load_tokenizer(checkpoint: Checkpoint, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer, or None (with a warning) when it ships none."""
    from transformers import AutoTokenizer

    try:
        if checkpoint.kind == "gguf":
            return AutoTokenizer.from_pretrained(os.path.dirname(checkpoint.path),
                                                 gguf_file=os.path.basename(checkpoint.path))
        return AutoTokenizer.from_pretrained(checkpoint.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, ImportError) as exc:  # ImportError: a tokenizer's missing package
        log.warning("%s: no usable tokenizer (%s); pass token ids", checkpoint.path, first_line(exc))
        return None


def checkpoint_dtype(config: Any, fallback: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype the checkpoint was saved in, from its config."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else fallback


def safetensors_entries(directory: str) -> dict[str, TensorEntry]:
    """Every tensor of every safetensors shard in `directory`, headers validated."""
    entries: dict[str, TensorEntry] = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        for name, entry in read_header(path).items():
            if name in entries:
                raise CheckpointError(f"{path}: tensor {name!r} also appears in {entries[name].path}")
            entries[name] = entry
    return entries


__all__ = ["check_remote_code", "checkpoint_dtype", "cut_short", "gguf_cut_short", "load_config", "load_tokenizer",
           "safetensors_entries"]
