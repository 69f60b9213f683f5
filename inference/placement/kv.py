"""The KV cache's share of the budgets: how many bytes it takes, which tier holds each layer's share beside the
weights (the device reserve, host RAM, a file on disk; re-planning the device tier when the reserve must grow),
how the device budget is shared out, and the largest batch the budgets hold. The facts are fixed when the model
opens (`KVBudget`); the plan is the model's current one. Changes nothing: the model applies what this decides
(`TierstoreModel.fit_kv_cache`)."""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch

from ...errors import BudgetError, InputError
from ...policies.experts import with_experts
from ...policies.planner import Plan, PlanInput, make_plan
from ...sizes import format_size
from ..runtime.tiered_kv import DEVICE_BUFFERS
from .budgets import ACTIVATION_SLACK_BYTES, DraftCost, kv_bytes_per_token

KV_LAYERS_ON_DEVICE = 3  # the batcher's offloaded KV cache's layers on the device at once: computing, fetched
# ahead, written back (transformers' offloaded cache); `TieredKVCache` uses DEVICE_BUFFERS
KVTiers = tuple[str, ...]  # per layer: "device", "host" or "disk"; None for a cache wholly on the device
COLUMN_SLACK = 1.25  # the cache's columns stay within this many times (plus 16) the longest row's real tokens


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a generate call will run: `new_tokens` decode passes after a prompt fed in `chunk_tokens(plan)`-token
    chunks (`prompt_tokens` of them), for weighing KV placements by time."""

    prompt_tokens: int
    new_tokens: int
    chunk_tokens: Callable[[Plan], int]

    def seconds(self, plan: Plan, host_kv_bytes: int, disk_kv_bytes: int, link_gbps: float,
                disk_gbps: float) -> float:
        """Estimated seconds of the prompt and decoding under `plan`, with `host_kv_bytes` of KV cache fetched
        from RAM and `disk_kv_bytes` from disk (through RAM) each decode pass at full length; a chunk pass reads
        half of it on average. Each pass takes its slower source."""
        try:
            chunks = math.ceil(self.prompt_tokens / max(self.chunk_tokens(plan), 1))
        except BudgetError:
            return math.inf

        def pass_s(share: float) -> float:
            link = (plan.h2d_bytes_per_pass + share * (host_kv_bytes + disk_kv_bytes)) / (link_gbps * 1e9)
            return max(link, share * disk_kv_bytes / (disk_gbps * 1e9))
        return chunks * pass_s(0.5) + self.new_tokens * pass_s(1.0)


@dataclasses.dataclass(frozen=True)
class KVBudget:
    """What a model's KV cache may take beside its weights, as known when it opened: what its plan was made from,
    where `runtime.kv_cache` lets the cache live, whether the compute device has memory of its own (a GPU: on a
    CPU the cache lives with the activations, outside the device tier), the model's transformers config and
    compute dtype (the cache's shape), the dequantization buffer, a draft's device cost, the bytes of the units
    the host tier serves, and the directory for layers on disk (None: no disk tier)."""

    plan_input: PlanInput
    where: str
    separate_device: bool
    hf_config: Any
    dtype: torch.dtype
    scratch_bytes: int = 0
    draft: DraftCost | None = None
    host_weights_bytes: int = 0
    disk_dir: str | None = None

    def cache_bytes(self, cache_tokens: int) -> int:
        """A KV cache of `cache_tokens`, asked only where a cache is placed (a model without attention has none)."""
        return kv_bytes_per_token(self.hf_config, self.dtype) * cache_tokens

    def reserve_bytes(self, cache_tokens: int) -> int:
        """The device reserve a KV cache of `cache_tokens` needs, with activations and the named parts."""
        parts = sum(nbytes for _, nbytes in self.reserve_parts(cache_tokens))
        return self.cache_bytes(cache_tokens) + ACTIVATION_SLACK_BYTES + parts

    def spare_reserve_bytes(self, plan: Plan, cache_tokens: int) -> int:
        """Bytes of `plan`'s device reserve that a call of `cache_tokens` leaves unused (the reserve is sized for a
        longer context than most calls have): room a verify pass's tree may take beside the activation slack."""
        return max(plan.device_reserve_bytes - self.reserve_bytes(cache_tokens), 0)

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

    def placement(self, plan: Plan, cache_tokens: int, tiered: bool = True,
                  workload: Workload | None = None) -> tuple[KVTiers | None, Plan | None]:
        """Where a KV cache of `cache_tokens` goes (None: wholly in the device reserve; else a tier per layer), and
        the plan it needs (None: `plan`). In the device reserve when the device budget holds it beside the weights
        (a larger reserve means fewer resident weights). Otherwise layer by layer: in host RAM as far as the RAM
        budget's room beside the weights' host tier holds it, the rest on disk (for a `tiered` cache, `TieredKVCache`,
        given a directory; the batcher's rows change, and it takes transformers' offloaded cache, in RAM only); the
        device reserve then holds the layers in use. Layers bound for disk may stay on the device instead, in place
        of resident weights (`_kept_on_device`). `runtime.kv_cache` may insist on a tier. BudgetError when the cache
        fits nowhere allowed. On a CPU the cache lives with the activations unless `runtime.kv_cache = disk`."""
        text = self.hf_config.get_text_config()
        if getattr(text, "num_attention_heads", None) is None:
            return None, None  # no attention, no KV cache: the model keeps its own state
        layers = text.num_hidden_layers
        if not self.separate_device:  # the device is the host
            if self.where != "disk" or not tiered:
                return None, None
            self._check_disk(layers, self.cache_bytes(cache_tokens))
            return ("disk",) * layers, None
        if self.where in ("auto", "device"):
            try:
                return None, self.device_plan(plan, cache_tokens)
            except BudgetError:
                if self.where == "device":
                    raise
        per_layer = math.ceil(self.cache_bytes(cache_tokens) / layers)
        room = self.host_room_bytes(plan)
        in_ram = 0 if self.where == "disk" else min(layers, room // per_layer)
        on_disk = layers - in_ram
        if on_disk:
            if self.where == "host" or not tiered or self.disk_dir is None:
                raise BudgetError(f"a KV cache of {cache_tokens} tokens does not fit the RAM budget's room")
            in_ram = min(in_ram, max(room // per_layer - 2, 0))  # two layers' pinned bounce buffers for reads
            on_disk = layers - in_ram
            self._check_disk(on_disk, on_disk * per_layer)
        in_use = math.ceil(min(DEVICE_BUFFERS if tiered else KV_LAYERS_ON_DEVICE, layers) * cache_tokens / layers)
        base = self.device_plan(plan, in_use) or plan
        kept, kept_plan = self._kept_on_device(base, in_use, in_ram, on_disk, cache_tokens / layers, per_layer,
                                               workload)
        tiers = ["device"] * kept + _spread(in_ram, on_disk - kept)
        return tuple(tiers), None if kept_plan is plan else kept_plan

    def _check_disk(self, layers: int, nbytes: int) -> None:
        """Refuse `layers` layers of KV cache (`nbytes`) on disk: InputError when `runtime.kv_dir` cannot hold
        files, BudgetError when its file system lacks the room."""
        if self.disk_dir is None:
            raise BudgetError("a KV cache on disk needs a directory (runtime.kv_dir)")
        if _free_disk_bytes(self.disk_dir) < nbytes:
            raise BudgetError(f"{layers} layers of KV cache ({format_size(nbytes)}) do not fit the free space of "
                              f"{self.disk_dir}")

    def _kept_on_device(self, plan: Plan, in_use: int, in_ram: int, on_disk: int, layer_tokens: float,
                        layer_bytes: int, workload: Workload | None) -> tuple[int, Plan]:
        """How many of the `on_disk` layers (each `layer_tokens` of cache, `layer_bytes`) stay in the device
        reserve beside the `in_use` tokens, in place of resident weights, and the plan for them. A decode pass
        gains: a device byte of such a layer saves a disk read and a copy, a device byte of weights only the copy.
        A chunked prompt loses: the reserve leaves its chunks less room, and each chunk pass re-reads the layers
        still on disk. With the `workload` and the probe's rates, the count that makes prompt and decoding
        shortest (`Workload.seconds`); without them, as many as the budget holds while copies and compute overlap."""
        def plan_for(count: int) -> Plan | None:
            try:
                replanned = self.device_plan(plan, in_use + math.ceil(count * layer_tokens)) or plan
            except BudgetError:
                return None
            streams = plan.streamed_from_host or plan.streamed_from_disk
            overlaps = not streams or replanned.prefetch_depth >= min(plan.prefetch_depth, 1)
            return replanned if overlaps else None

        low, high = 0, on_disk
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if plan_for(middle) is not None else (low, middle - 1)
        rates = (self.plan_input.h2d_gbps, self.plan_input.disk_gbps)
        if not low or workload is None or None in rates:
            return low, plan_for(low) or plan
        plans = {count: plan_for(count) for count in {0, low, *(low * part // 4 for part in (1, 2, 3))}}
        costs = {count: workload.seconds(planned, in_ram * layer_bytes, (on_disk - count) * layer_bytes, *rates)
                 for count, planned in plans.items()}
        best = min(sorted(plans), key=lambda count: (costs[count], -count))
        return best, plans[best] or plan

    def refusal(self, plan: Plan, cache_tokens: int, tiered: bool = True) -> str:
        """Why a KV cache of `cache_tokens` fits nowhere, naming each place it was allowed."""
        places = [f"the device budget {format_size(plan.device_budget_bytes)} leaves beside the weights"
                  ] if self.where not in ("host", "disk") else []
        if self.where in ("auto", "host"):
            places.append(f"the {format_size(self.host_room_bytes(plan))} the RAM budget leaves beside the host tier")
        if self.where in ("auto", "disk") and tiered and self.disk_dir is not None:
            places.append(f"the free space of {self.disk_dir} (runtime.kv_dir)")
        return (f"a batch of {cache_tokens} cache tokens needs {format_size(self.cache_bytes(cache_tokens))} of KV "
                f"cache: more than {', and more than '.join(places)}; use fewer prompts or tokens")

    def notes(self, cache_tokens: int, tiers: KVTiers | None, replanned: Plan | None,
              tiered: bool = True) -> list[str]:
        """The report's notes on a placement (of a `tiered` cache, or the batcher's)."""
        notes = []
        if replanned is not None:
            notes.append(f"{format_size(replanned.device_reserve_bytes)} of device reserve for "
                         f"{'the KV cache layers in use' if tiers is not None else 'the KV cache'} and activations: "
                         f"{len(replanned.device_resident)} units now resident")
        if tiers is None:
            return notes
        size = f"KV cache of {cache_tokens} tokens ({format_size(self.cache_bytes(cache_tokens))})"
        if tiered:
            notes.append(f"{size} by layer: {describe_tiers(tiers)}; layers off the device are fetched a layer ahead "
                         f"and only new rows go back")
        else:
            notes.append(f"{size} in host RAM, streamed a layer ahead by transformers' offloaded DynamicCache: it "
                         f"crosses the link both ways each pass")
        return notes


def describe_tiers(tiers: KVTiers) -> str:
    """'20 host, 8 disk': how many layers each tier holds, device first."""
    return ", ".join(f"{tiers.count(tier)} {tier}" for tier in ("device", "host", "disk") if tier in tiers)


def _spread(in_ram: int, on_disk: int) -> list[str]:
    """`in_ram` "host" and `on_disk` "disk" layers interleaved evenly, so that disk reads have host layers'
    time to run ahead."""
    total = in_ram + on_disk
    return ["disk" if (index + 1) * on_disk // total > index * on_disk // total else "host" for index in range(total)]


def _free_disk_bytes(directory: str) -> int:
    """Free bytes of the file system `directory` is (or would be made) on; InputError when it is not a directory,
    or the folder it would be made in cannot be written."""
    existing = os.path.abspath(directory)
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        if os.path.exists(existing):
            raise InputError(f"runtime.kv_dir {directory!r} cannot hold the KV cache's files: {existing!r} is not a "
                             f"directory")
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"runtime.kv_dir {directory!r} cannot hold the KV cache's files: no permission to write in "
                         f"{existing!r}")
    return shutil.disk_usage(existing).free


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
            return model.kv_placement(kv_cache_tokens(batch, max_seq_tokens), tiered=False)[1] or model.plan
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
    return batch, notes + model.fit_kv_cache(kv_cache_tokens(batch, max_seq_tokens), tiered=False)
