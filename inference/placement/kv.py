"""The KV cache's share of the budgets: how many bytes it takes, whether the device reserve or host RAM holds it
beside the weights (re-planning the device tier when the reserve must grow), how the device budget is shared
out, and the largest batch the budgets hold. The facts are fixed when the model opens (`KVBudget`); the plan is
the model's current one. Changes nothing: the model applies what this decides (`TierstoreModel.fit_kv_cache`)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from ...errors import BudgetError, InputError
from ...policies.experts import with_experts
from ...policies.planner import Plan, PlanInput, make_plan
from ...sizes import format_size
from .budgets import ACTIVATION_SLACK_BYTES, DraftCost, kv_bytes_per_token

KV_LAYERS_ON_DEVICE = 3  # a host KV cache's layers on the device at once: computing, fetched ahead, written back
COLUMN_SLACK = 1.25  # the cache's columns stay within this many times (plus 16) the longest row's real tokens


@dataclasses.dataclass(frozen=True)
class KVBudget:
    """What a model's KV cache may take beside its weights, as known when it opened: what its plan was made from,
    where `runtime.kv_cache` lets the cache live, whether the compute device has memory of its own (a GPU: on a
    CPU the cache lives with the activations, outside the device tier), the model's transformers config and
    compute dtype (the cache's shape), the dequantization buffer, a draft's device cost, and the bytes of the units
    the host tier serves."""

    plan_input: PlanInput
    where: str
    separate_device: bool
    hf_config: Any
    dtype: torch.dtype
    scratch_bytes: int = 0
    draft: DraftCost | None = None
    host_weights_bytes: int = 0

    def cache_bytes(self, cache_tokens: int) -> int:
        """A KV cache of `cache_tokens`, asked only where a cache is placed (a model without attention has none)."""
        return kv_bytes_per_token(self.hf_config, self.dtype) * cache_tokens

    def reserve_bytes(self, cache_tokens: int) -> int:
        """The device reserve a KV cache of `cache_tokens` needs, with activations and the named parts."""
        parts = sum(nbytes for _, nbytes in self.reserve_parts(cache_tokens))
        return self.cache_bytes(cache_tokens) + ACTIVATION_SLACK_BYTES + parts

    def reserve_parts(self, cache_tokens: int) -> tuple[tuple[str, int], ...]:
        """What that reserve holds besides the KV cache and the activations, by name: the dequantization buffer,
        the draft's weights and KV cache."""
        parts = [("the dequantization buffer", self.scratch_bytes)] if self.scratch_bytes else []
        if self.draft is not None:
            parts.append((f"draft {self.draft.name}", self.draft.device_bytes(cache_tokens)))
        return tuple(parts)

    def host_room_bytes(self, plan: Plan) -> int:
        """RAM the budget leaves beside the weights' host tier (which takes all the units or its whole budget)."""
        weights = self.host_weights_bytes + (plan.experts.host_bytes if plan.experts is not None else 0)
        return max(plan.host_budget_bytes - weights, 0)

    def device_plan(self, plan: Plan, cache_tokens: int) -> Plan | None:
        """The plan whose device reserve holds a KV cache of `cache_tokens`: None when `plan`'s does, BudgetError
        when no plan within the device budget does."""
        needed = self.reserve_bytes(cache_tokens)
        if needed <= plan.device_reserve_bytes:
            return None
        return self.reserved_plan(plan, needed, self.reserve_parts(cache_tokens))

    def reserved_plan(self, plan: Plan, reserve_bytes: int, parts: tuple[tuple[str, int], ...]) -> Plan:
        """`plan` re-made with a device reserve of `reserve_bytes` holding the named `parts` (and the KV cache
        and activations); BudgetError when the budget leaves the weights no room beside it."""
        experts = plan.experts
        slots = experts.device_slots * experts.expert_bytes if experts is not None else 0
        # the experts' device slots are allocated once: the dense units make room around them
        wanted = dataclasses.replace(self.plan_input, device_reserve_bytes=reserve_bytes, experts=None,
                                     reserve_parts=parts)
        replanned = make_plan(dataclasses.replace(wanted, device_reserve_bytes=reserve_bytes + slots))
        return with_experts(replanned, experts, wanted) if experts is not None else replanned

    def placement(self, plan: Plan, cache_tokens: int) -> tuple[bool, Plan | None]:
        """Whether a KV cache of `cache_tokens` goes to host RAM, and the plan it needs (None: `plan`). In the
        device reserve when the device budget holds it beside the weights (a larger reserve means fewer resident
        weights); otherwise in host RAM, when what the RAM budget leaves beside the weights' host tier holds it and
        the device reserve holds the layers in use (one computing, one fetched ahead, one written back).
        `runtime.kv_cache` may insist on either. BudgetError when the cache fits nowhere allowed."""
        if not self.separate_device:
            return False, None  # the device is the host
        if self.where != "host":
            try:
                return False, self.device_plan(plan, cache_tokens)
            except BudgetError:
                if self.where == "device":
                    raise
        if self.cache_bytes(cache_tokens) > self.host_room_bytes(plan):
            raise BudgetError(f"a KV cache of {cache_tokens} tokens does not fit the RAM budget's room")
        layers = self.hf_config.get_text_config().num_hidden_layers
        in_use = math.ceil(min(KV_LAYERS_ON_DEVICE, layers) * cache_tokens / layers)
        return True, self.device_plan(plan, in_use)

    def refusal(self, plan: Plan, cache_tokens: int) -> str:
        """Why a KV cache of `cache_tokens` fits nowhere, naming each place it was allowed."""
        places = [f"the device budget {format_size(plan.device_budget_bytes)} leaves beside the weights"
                  ] if self.where != "host" else []
        if self.where != "device":
            places.append(f"the {format_size(self.host_room_bytes(plan))} the RAM budget leaves beside the host tier")
        return (f"a batch of {cache_tokens} cache tokens needs {format_size(self.cache_bytes(cache_tokens))} of KV "
                f"cache: more than {', and more than '.join(places)}; use fewer prompts or tokens")

    def notes(self, cache_tokens: int, on_host: bool, replanned: Plan | None) -> list[str]:
        """The report's notes on a placement."""
        notes = []
        if replanned is not None:
            notes.append(f"{format_size(replanned.device_reserve_bytes)} of device reserve for "
                         f"{'the KV cache layers in use' if on_host else 'the KV cache'} and activations: "
                         f"{len(replanned.device_resident)} units now resident")
        if on_host:
            notes.append(f"KV cache of {cache_tokens} tokens ({format_size(self.cache_bytes(cache_tokens))}) in host "
                         f"RAM, streamed a layer ahead by transformers' offloaded DynamicCache: it crosses the link "
                         f"both ways each pass")
        return notes


def device_shares(plan: Plan) -> list[str]:
    """How the device budget asked for is shared out, when part of it is not weights: the expert slots, and
    the reserve, whose named parts (a dequantization buffer, a draft) the plan carries."""
    if not plan.device_reserve_bytes:
        return []
    parts = [f"{format_size(plan.device_weights_bytes)} for weights"]
    experts = plan.experts
    if experts is not None:  # the dense units' share above; the experts' slots are their own
        parts.append(f"{format_size(experts.device_slots * experts.expert_bytes)} for {experts.device_slots} "
                     f"expert slots")
    kept = plan.device_reserve_bytes - sum(nbytes for _, nbytes in plan.reserve_parts)
    if kept:
        parts.append(f"{format_size(kept)} kept for activations and the KV cache")
    parts += [f"{format_size(nbytes)} for {name}" for name, nbytes in plan.reserve_parts if nbytes]
    return [f"device budget {format_size(plan.device_budget_bytes)}: {', '.join(parts)}"]


def kv_cache_tokens(batch: int, max_seq_tokens: int) -> int:
    """The KV cache's size in tokens (rows times columns) for `batch` sequences of `max_seq_tokens` tokens, with
    COLUMN_SLACK for the masked columns of rows that joined at different times."""
    return math.ceil(batch * max_seq_tokens * COLUMN_SLACK)


def largest_batch(model: Any, max_batch: int, max_seq_tokens: int) -> tuple[int, list[str]]:
    """The most sequences of `max_seq_tokens` tokens, up to `max_batch`, whose KV cache (`kv_cache_tokens`) the
    budgets hold beside the weights: in the device reserve, or else in host RAM (`KVBudget.placement`).
    A cache that would leave the device room for only one streamed unit at a time is not taken when a smaller
    batch keeps two: copies and compute would take turns instead of overlapping (measured on an H200, a 7B
    model's pass took 0.306 s against 0.216 s). The model is re-planned for the batch; returns it and the plan's
    notes on it. InputError when not even one sequence fits."""
    def plan_for(batch: int) -> Any:
        try:
            return model.kv_placement(kv_cache_tokens(batch, max_seq_tokens))[1] or model.plan
        except BudgetError:
            return None

    def overlaps(plan: Any) -> bool:
        streams = plan.streamed_from_host or plan.streamed_from_disk
        return not streams or plan.prefetch_depth >= 1

    def largest(fits: Callable[[Any], bool]) -> int:
        low, high = 1, max_batch  # fits(batch 1) holds; find the largest
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(plan_for(middle)) else (low, middle - 1)
        return low

    first = plan_for(1)
    if first is None:
        raise InputError(f"the KV cache of one sequence of {max_seq_tokens} tokens fits neither the device budget "
                         f"nor the RAM budget beside the weights: lower --max-seq-len or raise --vram or --ram")
    batch = largest(lambda plan: plan is not None)
    notes = []
    if not overlaps(plan_for(batch)) and overlaps(first):
        kept = largest(lambda plan: plan is not None and overlaps(plan))
        notes.append(f"batch {kept}, not the {batch} the budgets hold: a larger batch's KV cache leaves the device "
                     f"room for one streamed unit at a time, and copies and compute would take turns")
        batch = kept
    return batch, notes + model.fit_kv_cache(kv_cache_tokens(batch, max_seq_tokens))
