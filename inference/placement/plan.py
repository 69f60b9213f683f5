"""Placing a model's units on this machine: the compute device and dtype, the budgets measured and capped, the
device reserve (KV cache, activations, a dequantization buffer, a draft), and the plan `policies/planner.py`
makes from them. `tierstore plan` runs the same steps without reading any weights."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from ...budget import Budget
from ...compression import GGML, Codec, bits_per_weight, describe_formats, multiplies_packed, scratch_bytes
from ...config import Config
from ...errors import BudgetError, InputError, ModelError
from ...policies.dense import AUTO
from ...policies.experts import ExpertCosts, ExpertsInput
from ...policies.planner import Plan, PlanInput, make_plan
from ...probe import cpu_linear_gbps, h2d_gbps, load_probe
from ...sizes import format_size
from ..devices import dtype_name
from ..loading.sources import Units
from ..runtime.fused_norms import is_llama_norm
from ..runtime import fused_rotary
from ..runtime.hooks import PACKED_MATVEC_TOKENS
from ..runtime.lookup import lookup_key, lookup_note
from ..runtime.packed_experts import window_bytes as unpacked_window_bytes
from ..runtime.packed_experts import stored_alike, window_size
from .budgets import DraftCost, device_reserve_bytes, effective_budgets, plan_input

PER_MATRIX_SHARE = 8  # a unit's dequantization buffer above 1/8 of the device budget is cut to one matrix


def place(units: Units, cfg: Config, device: torch.device, draft: DraftCost | None = None,
          host_lookup: bool = True) -> tuple[Plan, PlanInput]:
    """The plan for `units` (beside `draft`, when one is given) and what it was made from. With `host_lookup`,
    an input embedding that the RAM budget holds stays in RAM (runtime/lookup.py) when the model does not fit the
    device whole: the plan's `host_lookup`."""
    measured = Budget.measure(cfg.runtime.cache_dir)
    device_bytes, host_bytes, notes = effective_budgets(cfg.budget, measured, device)
    sizes = {key: layout.nbytes for key, layout in units.layouts.items()}
    schedule = units.skeleton.schedule
    reserve = device_reserve_bytes(units.hf_config, units.dtype, device, cfg.runtime.device_reserve)
    parts = []  # what the reserve holds besides activations and the KV cache
    if units.codec is not None:
        per_matrix = per_matrix_units(units, device_bytes)
        parts.append(("the dequantization buffer", scratch_bytes(units.dense_packed, units.dtype, per_matrix)))
        notes.append(_compression_note(units, units.codec, per_matrix, device))
    draft_bytes = draft.reserve_bytes(device.type == "cuda") if draft is not None else 0
    if draft is not None:
        parts.append((f"draft {draft.name}", draft_bytes))
        notes.append(draft.note(device.type == "cuda"))
        if device.type == "cpu":
            notes.append("on a CPU a pass is bound by compute, which grows with the tokens it verifies: a draft pays "
                         "only where a pass costs far more than a draft step (README, Speculative decoding)")
    reserve += sum(nbytes for _, nbytes in parts)
    # The table stays in RAM only when the model does not fit the device whole: there it saves device room, and
    # a resident model's lookup would only add a host round trip to each pass, which a CUDA graph cannot hold.
    lookup = lookup_key(units.skeleton) if host_lookup and sum(sizes.values()) + reserve > device_bytes else None
    if lookup is not None and sizes[lookup] + max((n for key, n in sizes.items() if key != lookup), default=0) \
            <= host_bytes:
        table_bytes = sizes.pop(lookup)
        host_bytes -= table_bytes
        schedule = [key for key in schedule if key != lookup]
        notes.append(lookup_note(lookup, table_bytes))
    else:
        lookup = None
    notes.extend(_kernel_notes(units, cfg, device))
    experts = experts_input(units, cfg, device)
    if experts is not None:
        notes.append(f"experts: {experts.total_experts} units of {format_size(experts.expert_bytes)} "
                     f"({experts.layers} layers x {experts.experts_per_layer}, {experts.top_k} per token), moved only "
                     f"when routed to; kernel {units.skeleton.model.config._experts_implementation}")
    predicting = experts is not None and experts.prefetch != "none"  # a router then runs twice per pass
    routers = {g.router: 1 for g in units.skeleton.experts if g.router} if predicting else None
    planned_from = plan_input(sizes, schedule, device_bytes, host_bytes, reserve, cfg.policy,
                              load_probe(cfg.runtime.cache_dir), notes, device, extra_uses=routers,
                              read_bytes=device_reads(units, device))
    planned_from = dataclasses.replace(planned_from, experts=experts, reserve_parts=tuple(parts),
                                       host_lookup=(lookup,) if lookup is not None else ())
    try:
        return make_plan(planned_from), planned_from
    except BudgetError as exc:
        if draft is None:
            raise
        make_plan(dataclasses.replace(planned_from, device_reserve_bytes=reserve - draft_bytes,
                                      reserve_parts=tuple(parts[:-1])))
        raise InputError(f"draft {draft.name} needs {format_size(draft_bytes)} ({draft_bytes} bytes) of the device "
                         f"budget, and the model cannot run in what is left: {exc}") from exc


def _kernel_notes(units: Units, cfg: Config, device: torch.device) -> list[str]:
    """The plan's notes on how the model's passes run: disk reads, attention, norms, the CPU's dtype."""
    notes = [f"disk reads: {getattr(units.source, 'read_mode', 'page cache')}",
             f"attention: {units.skeleton.model.config._attn_implementation}"]
    norms = sum(map(is_llama_norm, units.skeleton.model.modules())) if cfg.runtime.fused_norms != "off" else 0
    if norms:
        notes.append(f"norms: torch's fused rms_norm ({norms} RMSNorm modules)")
    rotary = fused_rotary.fusable(units.skeleton.model.modules()) \
        if cfg.runtime.fused_rotary != "off" and device.type in fused_rotary.DEVICES else []
    if rotary:
        notes.append(f"rotary embedding: one kernel a layer ({', '.join(name.rsplit('.', 1)[-1] for name in rotary)})")
    if device.type == "cpu" and units.dtype != units.stored_dtype:
        notes.append(f"weights stored in {dtype_name(units.stored_dtype)} run in {dtype_name(units.dtype)} on the "
                     f"CPU (--dtype, or dtype=, chooses)")
    return notes


def experts_input(units: Units, cfg: Config, device: torch.device) -> ExpertsInput | None:
    """The routed experts as the planner sees them, or None for a model without expert units."""
    groups = units.skeleton.experts
    if not groups:
        return None
    sizes = {units.layouts[key].nbytes for group in groups for key in group.keys}
    if len(sizes) != 1:
        raise ModelError(f"experts of different sizes ({sorted(sizes)} bytes) cannot share the device slots; set "
                         f"experts.streaming = false")
    compute, costs = cfg.experts.compute, None
    if compute == AUTO and device.type == "cpu":
        compute = "host"  # the device is the host: a copy into a slot would only add a memcpy
    elif compute == AUTO:
        costs = expert_costs(load_probe(cfg.runtime.cache_dir) or {}, device, units.dtype)
    window, window_bytes, mappable = 0, 0, True
    first = groups[0].keys[0]
    if first in units.packed:  # compressed experts: dequantized on the device into a window of them
        window = window_size(groups[0].num_experts, groups[0].top_k)
        window_bytes = unpacked_window_bytes(units.codec, units.packed[first], units.layouts[first],
                                             units.skeleton.units[first], window, units.dtype)
        keys = [key for group in groups for key in group.keys]
        mappable = stored_alike(units.codec, units.packed, keys)  # else auto never reads them in place
    return ExpertsInput(layers=len(groups), experts_per_layer=groups[0].num_experts, top_k=groups[0].top_k,
                        expert_bytes=sizes.pop(), device_policy=cfg.experts.device_policy,
                        host_policy=cfg.experts.host_policy, prefetch=cfg.experts.prefetch,
                        predictable=all(group.router for group in groups[1:]), compute=compute, costs=costs,
                        window=window, window_bytes=window_bytes, mappable=mappable)


def device_reads(units: Units, device: torch.device) -> dict[str, int]:
    """Device memory a decode step's use of a unit reads and writes, where it is not the unit's bytes: a packed
    unit is read packed, dequantized into the compute dtype and read again from there, unless its matrices are
    multiplied in their blocks (GGML formats on a GPU: Decompressor.matvec); an input embedding of its own
    (`lookup_key`) is looked up one row a token, wherever it lies."""
    embedding = lookup_key(units.skeleton)
    codec = units.codec
    reads = {key: units.layouts[key].nbytes
             + (0 if codec is not None and multiplies_packed(codec, packed, device)
                else 2 * packed.numel * units.dtype.itemsize)
             for key, packed in units.dense_packed.items()}
    if embedding is not None:
        reads[embedding] = 0
    return reads


def expert_costs(probe: Mapping[str, float], device: torch.device, dtype: torch.dtype) -> ExpertCosts:
    """The rates missed experts are split by: the probe's (`tierstore probe`), each one not there measured now
    (the CPU's two rates read 512 MB of matrices each: a fraction of a second on a server's cores, about two
    seconds on two slow ones)."""
    link = probe.get("h2d_pinned_gbps") or h2d_gbps(device, pinned=True, nbytes=64 * 2**20, repeats=3)
    one = probe.get("cpu_linear_gbps") or cpu_linear_gbps(1, dtype)
    many = probe.get("cpu_linear_gbps_32") or cpu_linear_gbps(32, dtype)
    return ExpertCosts(link_gbps=link, host_gbps=one, host_gbps_32=many)


def per_matrix_units(units: Units, device_budget_bytes: int) -> frozenset[str]:
    """The compressed units dequantized one matrix at a time, as each runs: those whose matrices together would
    take more than 1/PER_MATRIX_SHARE of the device budget (a 72B layer: 1.7 GB in bf16 against a 4 GB budget;
    its largest matrix 0.5 GB), when each of their matrices is the weight of an nn.Linear, which only that
    module's forward reads. The others keep one dequantization per unit, with fewer kernels and hooks."""
    linear_weights = {binding.tensor for site in units.skeleton.sites for binding in site.bindings
                      if isinstance(binding.module, nn.Linear) and binding.attr == "weight"
                      and binding.module is not site.module}
    return frozenset(key for key, packed in units.dense_packed.items()
                     if packed.numel * units.dtype.itemsize * PER_MATRIX_SHARE > device_budget_bytes
                     and set(packed.matrices) <= linear_weights)


def _compression_note(units: Units, codec: Codec, per_matrix: frozenset[str], device: torch.device) -> str:
    plain = sum(p.numel() for p in units.skeleton.model.parameters()) * units.dtype.itemsize
    stored = sum(layout.nbytes for layout in units.layouts.values())
    how = "matrix by matrix, as each runs," if per_matrix else "on use"
    bits = bits_per_weight(codec, units.packed)
    if codec.format == GGML:
        whose = f"as {codec.recipe}" if codec.recipe else "in the GGUF's own formats"
        kind = f"{whose} ({describe_formats(units.packed)}; {bits:.2f} bits/weight)"
    else:
        kind = f"as {codec.format} (blocksize {codec.blocksize}, {bits:.3f} bits/weight)"
    fused = sum(multiplies_packed(codec, packed, device) for packed in units.dense_packed.values())
    in_blocks = (f"; decode steps (up to {PACKED_MATVEC_TOKENS} tokens) multiply {fused} of "
                 f"{len(units.dense_packed)} units' matrices in their blocks instead" if fused else "")
    return (f"layer matrices stored {kind}: {format_size(stored)} instead of "
            f"{format_size(plain)} in {dtype_name(units.dtype)}; each unit dequantized {how} into a "
            f"{format_size(scratch_bytes(units.dense_packed, units.dtype, per_matrix))} buffer{in_blocks}")
