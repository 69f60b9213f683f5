"""`AutoModel.from_pretrained`: opening a model, as one line of steps.

Resolve what the user named, open its units (converting once if needed), place them (the plan), open the store,
attach the hooks. Each step is a function called once, from here; `tierstore plan` runs the first three.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import torch

from ..budget import Budget
from ..compression import Decompressor
from ..config import Config
from ..errors import InputError
from ..files import PAGE_BYTES, check_writable
from ..policies.planner import Plan
from ..probe import load_probe
from ..store import TieredStore
from ..trace import Tracer
from ..transfer import make_transfer
from ..units import align
from .loading.checkpoint import load_tokenizer
from .runtime.experts import open_experts
from .runtime.hooks import AttachedHooks
from .runtime.lookup import HostLookup, without_lookup
from .decoding.model import TierstoreModel
from .placement.plan import as_dtype, compute_device, per_matrix_units, place
from .loading.resolve import resolve
from .loading.sources import open_units
from .loading.shards import TIMEOUT_S, Collectives, join_group, rank_device, rank_note, rank_store, shard_units

log = logging.getLogger(__name__)


class AutoModel:
    """Entry point, named as transformers names its own."""

    @staticmethod
    def from_pretrained(model: str, budget: Budget | dict[str, Any] | None = None, config: Any = None,
                        dtype: torch.dtype | str | None = None, trust_remote_code: bool = False,
                        allow_download: bool = False, progress: bool = False,
                        draft: str | None = None, trace: str | None = None,
                        tensor_parallel: int = 1) -> TierstoreModel:
        """Open `model` (directory, GGUF, layer store, alias or cached Hub id) under `budget`. `draft`: "ngram"
        or a small model with the same tokenizer (anything `model` may be) for speculative decoding; a model
        draft is resident on the device and its bytes come out of the device budget. `trace`: a file to write
        the timeline to after each `generate` (overrides `runtime.trace`). `tensor_parallel`: N > 1 in each of
        N processes started by `torchrun --nproc-per-node N` (or `tierstore generate --tp N`): this process holds
        and streams its shard of every unit, under `budget` for its own device (see tensor_parallel.py)."""
        from .decoding.drafts import check_same_vocabulary, open_draft

        start_s = time.perf_counter()
        cfg = Config.load(config).with_budget(budget)
        device = compute_device(cfg.runtime.device)
        trace = trace or cfg.runtime.trace
        if trace is not None:
            check_writable(trace, "trace file")  # refused before anything is converted or read
        checkpoint = resolve(model, allow_download=allow_download)
        if draft is not None and draft != "ngram":
            resolve(draft, allow_download=allow_download)  # a missing draft is refused before anything is written
        log.info("%s: a %s checkpoint at %s; compute on %s", model, checkpoint.kind, checkpoint.path, device)
        if tensor_parallel < 1:
            raise InputError(f"tensor_parallel must be at least 1, got {tensor_parallel}")
        group = None
        if tensor_parallel > 1:
            if draft is not None:
                raise InputError("a draft speculates on one device; tensor parallelism runs without one")
            device = rank_device(device)
            group = join_group(tensor_parallel, device, TIMEOUT_S)
        units = open_units(checkpoint, cfg, device, as_dtype(dtype), trust_remote_code, progress)
        collectives = None
        if group is not None:
            try:
                units, styles = shard_units(units, group)
                units = rank_store(units, group, cfg, device, progress)
            except BaseException:
                units.close()
                raise
            collectives = Collectives(styles, group)
        drafter = store = experts = lookup = None
        try:
            drafter, draft_cost = (open_draft(draft, cfg, device, units.dtype, trust_remote_code, allow_download,
                                              progress) if draft is not None else (None, None))
            tokenizer = load_tokenizer(units.checkpoint, trust_remote_code)
            if isinstance(drafter, TierstoreModel):
                check_same_vocabulary(units.hf_config, tokenizer, drafter, draft)
            plan, planned_from = place(units, cfg, device, draft_cost, host_lookup=group is None)
            if plan.host_lookup:
                lookup = HostLookup(units, plan.host_lookup[0], device)
                units = without_lookup(units, plan.host_lookup)  # the store streams the rest
            expert_keys = units.skeleton.expert_keys
            dense = {key: layout for key, layout in units.layouts.items() if key not in expert_keys}
            tracer = Tracer(trace, device, _trace_meta(model, device, cfg, plan)) if trace is not None else None
            on_event = tracer.store_event if tracer is not None else None
            transfer = make_transfer(device, cfg.io.pinned_memory, _host_capacity(plan.host_budget_bytes, dense))
            store = TieredStore(units.source, dense, plan, transfer, reader_threads=cfg.io.reader_threads,
                                on_event=on_event)
            store.disk_stats.budget_bytes = cfg.budget.disk
            if plan.experts is not None:
                expert_layouts = {key: units.layouts[key] for key in expert_keys}
                expert_transfer = make_transfer(device, cfg.io.pinned_memory,
                                                _host_capacity(plan.experts.host_bytes, expert_layouts))
                experts = open_experts(units.skeleton.experts, units.source, expert_layouts, plan.experts, store,
                                       expert_transfer, cfg.io.reader_threads,
                                       functools.partial(tracer.store_event, prefix="experts ") if tracer else None)
            decompressor = Decompressor(units.codec, units.packed, units.dtype, device,
                                        per_matrix_units(units, plan.device_budget_bytes)) if units.codec else None
            hooks = AttachedHooks(units.skeleton, store, device, decompressor, tracer, lookup)
        except BaseException:  # give back what was opened: the draft, the store's threads and memory, the files
            if lookup is not None:
                lookup.detach()
            if collectives is not None:
                collectives.close()
            if isinstance(drafter, TierstoreModel):
                drafter.close()
            if experts is not None:
                experts.close()
            if store is not None:
                store.close()
            units.close()
            raise
        log.info("plan %s: %d units resident on %s, %d in host RAM, %d read from disk each pass; prefetch depth %d; "
                 "ready in %.1f s", plan.regime, len(plan.device_resident), device, len(plan.host_resident),
                 len(plan.streamed_from_disk), plan.prefetch_depth, time.perf_counter() - start_s)
        if group is not None:
            plan = dataclasses.replace(plan, notes=(*plan.notes, rank_note(group)))
        return TierstoreModel(units.skeleton.model, tokenizer, store, hooks, plan, planned_from, device, cfg,
                              time.perf_counter() - start_s, decompressor, drafter, draft_cost, tracer, experts,
                              collectives)


def _host_capacity(budget_bytes: int, layouts: dict[str, Any]) -> int:
    """The pinned arena for a store: its host budget, or all of its units when they take less."""
    return min(budget_bytes, sum(align(layout.nbytes, PAGE_BYTES) for layout in layouts.values()))


def _trace_meta(model: str, device: torch.device, cfg: Config, plan: Plan) -> dict[str, Any]:
    """What a trace's reader needs beside the events: the run, and each link's bound from the probe."""
    probe = load_probe(cfg.runtime.cache_dir) or {}
    pinned = device.type == "cuda" and cfg.io.pinned_memory
    link = probe.get("h2d_pinned_gbps" if pinned else "h2d_gbps") if device.type == "cuda" else None
    return {"tool": "tierstore", "model": model, "device": str(device),
            "device_budget_bytes": plan.device_budget_bytes, "host_budget_bytes": plan.host_budget_bytes,
            "prefetch_depth": plan.prefetch_depth, "device_resident": list(plan.device_resident),
            "bound_gb_per_s": {"disk": probe.get("disk_gbps"), "host->device": link}}
