"""The input embedding looked up in host RAM.

A pass needs only the embedding rows of the tokens it carries, yet streaming the table would copy all of it: a
72B model's 152k x 8192 table is 2.5 GB per pass over the link, and a 2.5 GB slot out of a 4 GB device budget.
So the table stays in RAM (charged to the RAM budget), the embedding's forward gathers the rows there and copies
only them. On a GPU the table is page-locked and mapped into the device's address space, so the lookup is the
device's own kernel reading its tokens' rows over the link: no wait for the host, and a decode step that can be
captured as a CUDA graph. Its weight, as the model sees it, is a one-element tensor on the compute device
expanded to the table's shape (right device, dtype and shape for code that asks) and NaN, so that any other use
of it shows.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...sizes import format_size
from ...transfer import host_register, host_unregister, mapped_view, page_aligned
from ..loading.skeleton import Skeleton
from ..loading.sources import Units


def lookup_key(skeleton: Skeleton) -> str | None:
    """The input embedding's unit when it can stay in RAM: a plain `nn.Embedding` (no max_norm, which writes
    to its weight), alone in its unit, used once a pass (not tied to the output layer)."""
    embedding = skeleton.model.get_input_embeddings()
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        return None
    sites = [site for site in skeleton.sites if site.module is embedding]
    if len(sites) != 1 or len(sites[0].bindings) != 1 or sites[0].bindings[0].attr != "weight":
        return None
    key = sites[0].key
    return key if skeleton.schedule.count(key) == 1 and len(skeleton.units[key]) == 1 else None


def without_lookup(units: Units, keys: tuple[str, ...]) -> Units:
    """`units` as the store and its hooks see them: without the units in `keys`, their sites dropped and the
    others renumbered to their places in the shorter schedule."""
    if not keys:
        return units
    kept = [site for site in units.skeleton.sites if site.key not in keys]
    sites = tuple(dataclasses.replace(site, position=position) for position, site in enumerate(kept))
    layouts = {key: layout for key, layout in units.layouts.items() if key not in keys}
    return dataclasses.replace(units, skeleton=dataclasses.replace(units.skeleton, sites=sites), layouts=layouts)


class HostLookup:
    """The embedding of unit `key` answered from RAM until `detach` (a module adapter, see adapters.py)."""

    def __init__(self, units: Units, key: str, device: torch.device, pinned: bool = True) -> None:
        """`pinned`: on a GPU, page-lock the table and read it in place (else rows are gathered by the CPU)."""
        site = next(site for site in units.skeleton.sites if site.key == key)
        self.module: nn.Module = site.module
        self.original = site.bindings[0].original
        layout = units.layouts[key]
        self._buffer = page_aligned(layout.nbytes)
        units.source.read_into(key, self._buffer)  # verified bytes, or CheckpointError
        self.table = layout.views(self._buffer)[site.bindings[0].tensor]
        self.device = device
        self.mapped: torch.Tensor | None = None  # the table as the GPU reads it in place
        if device.type == "cuda" and pinned and host_register(self._buffer):
            self.mapped = mapped_view(self.table.data_ptr(), tuple(self.table.shape), self.table.dtype, device)
        shown = torch.full((), float("nan"), dtype=self.table.dtype, device=device).expand(self.table.shape)
        self.module._parameters["weight"] = shown  # type: ignore[assignment]
        self.module.forward = self._forward  # type: ignore[method-assign]

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        padding = self.module.padding_idx
        if self.mapped is not None:
            return nn.functional.embedding(input_ids.to(self.device), self.mapped, padding)  # type: ignore[arg-type]
        rows = nn.functional.embedding(input_ids.cpu(), self.table, padding)  # type: ignore[arg-type]
        return rows.to(self.device)

    def detach(self) -> None:
        """The module as it was: its meta weight and its class's forward (the table unpinned)."""
        self.module._parameters["weight"] = self.original
        vars(self.module).pop("forward", None)
        if self.mapped is not None:
            torch.cuda.synchronize(self.device)  # no queued lookup may still read it
            self.mapped = None
            host_unregister(self._buffer)


def lookup_note(key: str, nbytes: int) -> str:
    """The plan's note for a table kept in RAM."""
    return (f"{key} ({format_size(nbytes)}) stays in RAM, out of the RAM budget: each pass looks up its tokens' "
            f"rows there and copies only them")
