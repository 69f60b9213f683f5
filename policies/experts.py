"""Planning a mixture-of-experts model: the dense units as any model's, the routed experts as a cache.

Dense units (attention, norms, routers, shared experts, embeddings) are used by every pass; an expert only when a
token is routed to it, so the dense plan comes first and the experts get the room it leaves: device slots (at
least one token's experts, twice that so the next layer's predicted experts can load while this layer computes)
and host RAM. An expert routed to but not in a slot is either copied over the link or computed by the CPU where
it lives (`split_misses`): the link and the CPU then work at once. Pure bookkeeping, like the dense planner.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from ..errors import BudgetError, ConfigError
from ..sizes import format_size
from ..tier import replay
from .dense import AUTO, Plan, PlanInput, make_dense_plan, predict_pass
from .eviction import Key
from .registry import make_eviction

EXPERT_POLICIES = ("lfu", "lru", "fifo")
# A layer call that computes any expert on the host pays this once: the hidden state and routing weights read
# back, the CPU's sum copied over and added (measured on an H200 host: about half a millisecond).
HOST_CALL_S = 0.5e-3
# Where a missed expert is computed, besides auto (the cost model decides): copied into a slot, computed by the CPU,
# or read in place by the device from mapped host RAM (a decode step's; inference/runtime/mapped_experts.py).
COMPUTE_MODES = ("device", "host", "mapped")
DEFAULT_EXPERT_POLICY = "lfu"  # popularity is skewed on real models; the decay follows it as the text moves on
GATHER_PAIRS = 8  # (token, expert) pairs whose experts a layer reading them in place gathers at once, at least


@dataclasses.dataclass(frozen=True)
class ExpertCosts:
    """What a missed expert costs on each path, from measured rates: copied, its bytes cross the link whatever
    its tokens; computed on the host, a compressed expert is first dequantized by the CPU (`host_unpack_s` each,
    as this run measured it: 0 for plain experts, and until measured), then the CPU reads its bytes once per pass
    (`host_gbps`: weight bytes per second of a one-token linear) and does more work per token (`host_gbps_32`: the
    same at 32 tokens)."""

    link_gbps: float
    host_gbps: float
    host_gbps_32: float
    host_call_s: float = HOST_CALL_S
    host_unpack_s: float = 0.0

    def copy_s(self, nbytes: int) -> float:
        return nbytes / (self.link_gbps * 1e9)

    def host_s(self, nbytes: int, tokens: int) -> float:
        return self.host_unpack_s + self.host_linear_s(nbytes, tokens)

    def host_linear_s(self, nbytes: int, tokens: int) -> float:
        """The CPU's multiplications alone (an expert of `nbytes` as it computes, for `tokens` tokens)."""
        one = nbytes / (self.host_gbps * 1e9)
        per_token = max(nbytes / (self.host_gbps_32 * 1e9) - one, 0.0) / 31
        return one + per_token * (tokens - 1)

    def unpacked(self, seconds_each: float) -> ExpertCosts:
        """These costs with the CPU's dequantization of one expert measured at `seconds_each`: taken as it is the
        first time, then moved a fifth of the way each time. A CPU dequantizes a k-quant expert several times
        slower than it multiplies the plain one (2.3 ms against 0.56 ms for a 768 x 2048 Q4_K matrix on two cores)."""
        kept = seconds_each if self.host_unpack_s == 0 else 0.8 * self.host_unpack_s + 0.2 * seconds_each
        return dataclasses.replace(self, host_unpack_s=kept)

    def observed(self, predicted_s: float, seconds: float) -> ExpertCosts:
        """These costs with the CPU's rates moved toward what the run measured: work these costs put at
        `predicted_s` took `seconds`. Under a run's load (the link's copies reading the same RAM, the loop's own
        threads) the CPU may well be slower than the probe found it: on H100 hosts probed at 48-53 GB/s, a
        speculative MoE run's verify passes got 4-8 GB/s of it."""
        scale = 0.8 + 0.2 * predicted_s / seconds
        return dataclasses.replace(self, host_gbps=self.host_gbps * scale, host_gbps_32=self.host_gbps_32 * scale)


def split_misses(tokens: Mapping[int, int], nbytes: int, costs: ExpertCosts,
                 heat: Mapping[int, int] | None = None, host_nbytes: int | None = None) -> list[int]:
    """Of a layer's missed experts (expert -> tokens routed to it, each of `nbytes` as stored), those to compute
    on the host; the rest are copied. The link and the CPU work at once, so the layer waits for the longer of the
    two: experts move to the host, cheapest first (fewest tokens, then coldest by `heat`, so that the hot ones are
    copied into slots where they will hit again), while that shortens the wait. `host_nbytes`: the bytes the CPU's
    work on one scales with, where that is not `nbytes` (a compressed expert is dequantized first)."""
    order = sorted(tokens, key=lambda expert: (tokens[expert], (heat or {}).get(expert, 0), expert))
    copy_each = costs.copy_s(nbytes)
    link_s, host_s, chosen = copy_each * len(order), 0.0, []
    for expert in order:
        cost = costs.host_s(host_nbytes or nbytes, tokens[expert]) + (0.0 if chosen else costs.host_call_s)
        if max(host_s + cost, link_s - copy_each) >= max(host_s, link_s):
            break
        chosen.append(expert)
        host_s, link_s = host_s + cost, link_s - copy_each
    return chosen


@dataclasses.dataclass(frozen=True)
class ExpertsInput:
    """The routed experts as the planner sees them: `layers` MoE layers of `experts_per_layer` experts of
    `expert_bytes` each, `top_k` routed per token; the policies asked for; `predictable`: the routers are units
    of their own, so the next layer's experts can be predicted."""

    layers: int
    experts_per_layer: int
    top_k: int
    expert_bytes: int
    device_policy: str = AUTO
    host_policy: str = AUTO
    prefetch: str = AUTO
    predictable: bool = True
    compute: str = AUTO
    costs: ExpertCosts | None = None  # measured rates; None: not measured (auto then copies every miss)
    window: int = 0  # compressed experts: how many are dequantized at once on the device (0: uncompressed)
    window_bytes: int = 0  # that window's device bytes
    mappable: bool = True  # every expert can be read in place (compressed ones: all stored alike, unrotated)

    @property
    def total_experts(self) -> int:
        return self.layers * self.experts_per_layer


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    """Where the experts live: `device_slots` on the device (an LFU/LRU cache), `host_bytes` of host RAM (the
    rest are read from disk when routed to), and whether the next layer's experts are predicted: "router" always,
    "auto" while the copies that starts are used (see inference/runtime/experts.py, PrefetchGate), "none"."""

    layers: int
    experts_per_layer: int
    top_k: int
    expert_bytes: int
    device_slots: int
    host_bytes: int
    device_policy: str
    host_policy: str
    prefetch: str
    choose_policy: bool = False  # device_policy auto: re-chosen after each call from the routing it saw
    compute: str = "device"  # where missed experts are computed: device (copied), host, or auto (split_misses)
    costs: ExpertCosts | None = None
    window: int = 0  # compressed experts dequantized at once (inference/runtime/packed_experts.py); 0: none

    @property
    def total_experts(self) -> int:
        return self.layers * self.experts_per_layer

    @property
    def host_experts(self) -> int:
        return min(self.total_experts, self.host_bytes // self.expert_bytes)

    def routed_per_layer(self, batch: int) -> float:
        """Distinct experts a layer needs for a pass of `batch` tokens, expected under uniform routing."""
        e, k = self.experts_per_layer, self.top_k
        return e * (1.0 - (1.0 - k / e) ** batch)

    def routed_bytes(self, batch: int = 1) -> int:
        """Expert bytes one pass of `batch` tokens computes with, expected under uniform routing."""
        return int(self.layers * self.routed_per_layer(batch) * self.expert_bytes)

    def moved_bytes(self, batch: int = 1) -> tuple[int, int]:
        """(host->device, disk) expert bytes of one pass, expected under uniform routing: the device slots beyond
        one pass's working set hit in proportion to the experts they hold, host RAM likewise for the disk; of
        the misses, the share computed on the host crosses no link."""
        routed = self.routed_bytes(batch)
        cached = max(self.device_slots - self.top_k * 2, 0) / self.total_experts
        in_host = self.host_experts / self.total_experts
        missed = routed * (1.0 - min(cached, 1.0))
        return int(missed * (1.0 - self.host_share)), int(missed * (1.0 - in_host))

    @property
    def host_share(self) -> float:
        """The share of missed experts computed on the host at one token each: all under "host", none under
        "device"; under "auto" the share that keeps the CPU and the link equally busy (each does its part of the
        bytes at its own rate)."""
        if self.compute == "host":
            return 1.0
        if self.compute == "device" or self.costs is None:
            return 0.0
        return self.costs.host_gbps / (self.costs.host_gbps + self.costs.link_gbps)

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "routed_bytes_batch_1": self.routed_bytes(1)}

    def store_plan(self, keys: Sequence[Key] = ()) -> Plan:
        """The plan the experts' own store carries out: slots and host bytes, the cache policies, no schedule.
        When host RAM holds every expert, the experts (`keys`) are resident there: read in the background from
        the start, so that no pass waits for the disk (or the page cache) to serve one."""
        resident = tuple(keys) if self.host_experts >= self.total_experts else ()
        return Plan(regime="experts", device_resident=(), host_resident=resident, streamed_from_host=(),
                    streamed_from_disk=(), device_policy=self.device_policy, host_policy=self.host_policy,
                    prefetch="none", prefetch_depth=0, disk_prefetch_depth=0,
                    device_budget_bytes=self.device_slots * self.expert_bytes, host_budget_bytes=self.host_bytes,
                    device_reserve_bytes=0, device_weights_bytes=self.device_slots * self.expert_bytes,
                    device_slot_bytes=self.expert_bytes, host_slot_bytes=self.expert_bytes, h2d_bytes_per_pass=0,
                    disk_bytes_per_pass=0, predicted={}, schedule=(), notes=())


def best_policy(accesses: Sequence[Key], slots: int, current: str) -> tuple[str, dict[str, float]]:
    """The eviction policy that would have hit most often: `accesses` (the experts routed to, in order) replayed
    on demand through `slots` device slots under each policy. Ties keep `current`. Returns it and each hit rate."""
    sizes = dict.fromkeys(accesses, 1)
    rates = {name: replay(list(accesses), sizes, slots, make_eviction(name, (), set())).hits / max(len(accesses), 1)
             for name in EXPERT_POLICIES}
    return max(rates, key=lambda name: (rates[name], name == current)), rates


def gather_pairs(top_k: int) -> int:
    """How many (token, expert) pairs a layer call that reads its experts in place gathers at once: whole tokens'
    routing, at least GATHER_PAIRS (inference/runtime/mapped_experts.py). Their experts' bytes are what the
    plan reserves on the device for that buffer."""
    return top_k * max(1, GATHER_PAIRS // top_k)


def _compute(experts: ExpertsInput) -> str:
    """Where missed experts are computed: as asked, auto only with measured rates to split by (else copied)."""
    if experts.compute == AUTO and experts.costs is None:
        return "device"
    return experts.compute


def _check(experts: ExpertsInput) -> None:
    if experts.compute != AUTO and experts.compute not in COMPUTE_MODES:
        raise ConfigError(f"experts.compute: unknown place {experts.compute!r}; choose from auto, "
                          f"{', '.join(COMPUTE_MODES)}")
    for name in ("device_policy", "host_policy"):
        value = getattr(experts, name)
        if value != AUTO and value not in EXPERT_POLICIES:
            raise ConfigError(f"experts.{name}: unknown policy {value!r}; choose from {', '.join(EXPERT_POLICIES)}")


def make_moe_plan(dense: PlanInput, experts: ExpertsInput) -> Plan:
    """The dense plan, made in the room left after the experts' minimum, plus the experts' plan in what the dense
    units leave. BudgetError, with the bytes needed, when the device cannot hold the dense part of a layer
    beside the experts one token needs."""
    _check(experts)
    one_token = experts.top_k * experts.expert_bytes
    predict = experts.prefetch != "none" and experts.predictable
    # a device with an activation reserve (a GPU) may read experts in place: its gather buffer is an activation;
    # compressed experts' window is one too
    maps = _compute(experts) == "mapped" or (_compute(experts) == AUTO and experts.mappable)
    gather = gather_pairs(experts.top_k) * experts.expert_bytes if dense.device_reserve_bytes and maps else 0
    dense = dataclasses.replace(dense, device_reserve_bytes=dense.device_reserve_bytes + gather
                                + experts.window_bytes)
    plan = None
    for slots in ((2 * experts.top_k, experts.top_k) if predict else (experts.top_k,)):
        try:
            plan = make_dense_plan(dataclasses.replace(
                dense, device_reserve_bytes=dense.device_reserve_bytes + slots * experts.expert_bytes,
                host_budget_bytes=dense.host_budget_bytes - slots * experts.expert_bytes))
            break
        except BudgetError as exc:
            failure = exc
    if plan is None:
        largest = max(unit.nbytes for unit in dense.units)
        needed = dense.device_reserve_bytes + largest + one_token
        raise BudgetError(f"device budget {format_size(dense.device_budget_bytes)} cannot hold the dense part of a "
                          f"layer ({format_size(largest)}) beside the {experts.top_k} experts one token needs "
                          f"({format_size(one_token)}) and the {format_size(dense.device_reserve_bytes)} reserve: it "
                          f"needs at least {needed} bytes ({format_size(needed)}); {failure}") from failure
    sizes = {unit.key: unit.nbytes for unit in dense.units}
    dense_device = sum(sizes[key] for key in plan.device_resident) + plan.device_slot_bytes
    left_device = plan.device_weights_bytes + slots * experts.expert_bytes - dense_device
    dense_host = sum(sizes[key] for key in plan.host_resident) + plan.host_slot_bytes
    left_host = max(dense.host_budget_bytes - dense_host, slots * experts.expert_bytes)
    device_slots = min(experts.total_experts, max(slots, left_device // experts.expert_bytes))
    expert_plan = ExpertPlan(
        layers=experts.layers, experts_per_layer=experts.experts_per_layer, top_k=experts.top_k,
        expert_bytes=experts.expert_bytes, device_slots=device_slots,
        host_bytes=min(left_host, experts.total_experts * experts.expert_bytes),
        device_policy=DEFAULT_EXPERT_POLICY if experts.device_policy == AUTO else experts.device_policy,
        host_policy=DEFAULT_EXPERT_POLICY if experts.host_policy == AUTO else experts.host_policy,
        choose_policy=experts.device_policy == AUTO,
        prefetch=(("auto" if experts.prefetch == AUTO else experts.prefetch)
                  if predict and device_slots >= 2 * experts.top_k else "none"),
        compute=_compute(experts), costs=experts.costs, window=experts.window)
    notes = [*plan.notes, *_checked_notes(expert_plan, experts)]
    return with_experts(dataclasses.replace(plan, notes=tuple(notes)), expert_plan, dense)


def _checked_notes(expert_plan: ExpertPlan, experts: ExpertsInput) -> list[str]:
    """The plan's notes on the experts; ConfigError or BudgetError for a `compute` the plan cannot carry out."""
    if expert_plan.compute == "mapped" and expert_plan.host_experts < expert_plan.total_experts:
        every = format_size(expert_plan.total_experts * experts.expert_bytes)
        raise BudgetError(f"experts.compute = mapped reads routed experts from host RAM, which must hold all "
                          f"{expert_plan.total_experts} ({every}); the RAM budget leaves room for "
                          f"{expert_plan.host_experts}: raise ram, or choose device or host")
    notes = []
    every_in_ram = expert_plan.host_experts >= expert_plan.total_experts
    if expert_plan.compute == "mapped" or (expert_plan.compute == "auto" and every_in_ram and experts.mappable):
        notes.append("experts: a decode step reads each routed expert in place, from its slot or over the link from "
                     "pinned RAM (no copy, no wait for the routing; on a GPU); a longer call "
                     + ("copies the missed ones" if expert_plan.compute == "mapped" else
                        "splits the missed ones between copies and the CPU"))
    if experts.window:
        notes.append(f"experts stay compressed in every tier, their device slots too; the routed ones are "
                     f"dequantized on the device, {experts.window} at a time, into a "
                     f"{format_size(experts.window_bytes)} window")
    slots = expert_plan.device_slots
    if slots < experts.total_experts and slots < experts.experts_per_layer:
        notes.append(f"{slots} expert slots on the device, fewer than a layer's {experts.experts_per_layer} "
                     f"experts: a long prompt's pass runs its experts in token chunks")
    return notes


def with_experts(plan: Plan, experts: ExpertPlan, dense: PlanInput) -> Plan:
    """A dense plan (made with expert slots inside its reserve) as the whole model's plan: the reserve is
    `dense`'s (activations and KV cache) again, the dense units' budget is what the slots leave, and the bytes per
    pass and their prediction count the routed experts."""
    h2d, disk = experts.moved_bytes(1)
    return dataclasses.replace(
        plan, experts=experts, regime=_regime(plan.regime, experts), device_reserve_bytes=dense.device_reserve_bytes,
        device_weights_bytes=(plan.device_budget_bytes - dense.device_reserve_bytes
                              - experts.device_slots * experts.expert_bytes),
        h2d_bytes_per_pass=plan.h2d_bytes_per_pass + h2d, disk_bytes_per_pass=plan.disk_bytes_per_pass + disk,
        predicted=predict_pass(plan.h2d_bytes_per_pass + h2d, plan.disk_bytes_per_pass + disk, dense))


_REGIMES = ("device", "device+host", "disk")


def _regime(dense: str, experts: ExpertPlan) -> str:
    """The farther tier the model's units come from: the dense units', or the experts' (device when every expert
    has a slot, device+host when host RAM holds the rest, disk when some are read from it)."""
    if experts.device_slots >= experts.total_experts:
        return dense
    farthest = "device+host" if experts.host_experts >= experts.total_experts else "disk"
    return max(dense, farthest, key=_REGIMES.index)
