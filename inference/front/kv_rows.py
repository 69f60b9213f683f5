"""Row surgery on a batch's ragged KV cache (the batcher's): rows aligned on the right, `mask` [rows, columns]
marking the columns that hold each row's real tokens. Rows are appended (`merge_rows`), dropped (`keep_rows`),
and the columns no row uses dropped or the rows repacked (`compact`). Only plain full-attention layers
(`plain_layers`) can be reshaped this way."""
from __future__ import annotations

from typing import Any

import torch

from ..placement.kv import COLUMN_SLACK


def plain_layers(cache: Any) -> bool:
    """Whether every layer of `cache` is a plain full-attention DynamicLayer (which `merge_rows` and `compact` can
    reshape)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def _layer_kv(cache: Any) -> list[Any]:
    """The layers of `cache` that hold tensors."""
    return [layer for layer in cache.layers if layer.keys is not None and layer.keys.numel()]


def merge_rows(cache: Any, mask: torch.Tensor, other: Any, other_mask: torch.Tensor) -> torch.Tensor:
    """Append the rows of `other` (None: rows with nothing cached) to `cache`, right-aligned to a common number of
    columns (the shorter side gets masked zero columns on the left); returns the joint mask. A host cache's layers
    lie in RAM between passes, all but the first, fetched ahead for the next pass: each pair joins where `cache`'s
    layer is."""
    columns = max(mask.shape[1], other_mask.shape[1])
    for index, layer in enumerate(cache.layers):
        if layer.keys is None or not layer.keys.numel():
            continue
        for name in ("keys", "values"):
            mine = getattr(layer, name)
            theirs = getattr(other.layers[index], name).to(mine.device) if other is not None else \
                mine.new_zeros((other_mask.shape[0], *mine.shape[1:-2], 0, mine.shape[-1]))
            setattr(layer, name, torch.cat([_pad_left(mine, columns, dim=-2), _pad_left(theirs, columns, dim=-2)]))
    return torch.cat([_pad_left(mask, columns), _pad_left(other_mask, columns)])


def _pad_left(tensor: torch.Tensor, columns: int, dim: int = 1) -> torch.Tensor:
    missing = columns - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def compact(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Drop the columns no row uses on the left; when the columns outgrow COLUMN_SLACK times the longest row's
    real tokens, repack each row's real tokens to the right (a gather per layer). Returns the new mask."""
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if used.numel() else mask.shape[1]
    real = int(mask.sum(dim=1).max())
    if mask.shape[1] - first > COLUMN_SLACK * real + 16:
        order = torch.sort(mask, dim=1, stable=True).indices[:, -real:]  # each row's real columns, in order
        for layer in _layer_kv(cache):
            index = order.to(layer.keys.device)[:, None, :, None].expand(-1, layer.keys.shape[1], -1,
                                                                          layer.keys.shape[-1])
            layer.keys, layer.values = torch.gather(layer.keys, 2, index), torch.gather(layer.values, 2, index)
        return torch.gather(mask, 1, order)
    if first:
        for layer in _layer_kv(cache):
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
    return mask[:, first:]


def keep_rows(cache: Any, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep only `rows` of `cache`, in that order (the others' memory freed); returns their mask."""
    cache.batch_select_indices(torch.tensor(rows))
    return mask[rows]
