"""The dense planner: from budgets, unit sizes and measured bandwidths, decide where each unit lives, the policies
and the prefetch depth, for units that every pass uses (planner.py is the entry point; experts.py plans routed
experts in the room this leaves).

Pure bookkeeping: keys, byte counts and seconds. The plan is data; the store carries it out.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..errors import BudgetError, ConfigError
from ..sizes import format_size
from .registry import EVICTION_POLICIES, PREFETCH_POLICIES

AUTO = "auto"
DEFAULT_PREFETCH_DEPTH = 2
RESIDENT_ORDERS = ("spread", "contiguous")  # which of equal units stay resident: spread over the pass, or the first


@dataclasses.dataclass(frozen=True)
class UnitInfo:
    """One store unit as the planner sees it."""

    key: str
    nbytes: int
    uses_per_pass: int = 1
    read_bytes: int | None = None  # device memory the compute reads and writes per use (None: nbytes)


@dataclasses.dataclass(frozen=True)
class PlanInput:
    """Everything a plan depends on. Budgets here are already capped to what the machine has."""

    units: tuple[UnitInfo, ...]
    schedule: tuple[str, ...]
    device_budget_bytes: int
    host_budget_bytes: int
    device_reserve_bytes: int = 0
    h2d_gbps: float | None = None
    disk_gbps: float | None = None
    hbm_gbps: float | None = None  # the device memory's (None: not measured, no such term in the prediction)
    device_policy: str = AUTO
    host_policy: str = AUTO
    prefetch: str = AUTO
    prefetch_depth: int | None = None
    notes: tuple[str, ...] = ()
    unpredictable: str | None = None  # why no time per pass can be predicted (e.g. the compute device is a CPU)
    experts: Any = None  # experts.ExpertsInput: a mixture-of-experts model's routed experts, planned as a cache
    host_lookup: tuple[str, ...] = ()  # units kept in RAM and used there (not in `units`): an input embedding
    resident_order: str = "spread"  # RESIDENT_ORDERS: which of equal units stay resident when not all fit
    reserve_parts: tuple[tuple[str, int], ...] = ()  # what the reserve holds besides activations and KV cache


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where each unit lives, which policies run each tier, and what one pass should cost."""

    regime: str
    device_resident: tuple[str, ...]
    host_resident: tuple[str, ...]
    streamed_from_host: tuple[str, ...]
    streamed_from_disk: tuple[str, ...]
    device_policy: str
    host_policy: str
    prefetch: str
    prefetch_depth: int
    disk_prefetch_depth: int
    device_budget_bytes: int
    host_budget_bytes: int
    device_reserve_bytes: int
    device_weights_bytes: int
    device_slot_bytes: int
    host_slot_bytes: int
    h2d_bytes_per_pass: int
    disk_bytes_per_pass: int
    predicted: dict[str, float | str | None]
    schedule: tuple[str, ...]
    notes: tuple[str, ...]
    experts: Any = None  # experts.ExpertPlan of a mixture-of-experts model whose experts are units
    host_lookup: tuple[str, ...] = ()  # units kept in RAM and used there, never streamed (an input embedding)
    reserve_parts: tuple[tuple[str, int], ...] = ()  # what the reserve holds besides activations and KV cache

    def to_dict(self) -> dict[str, object]:
        """The plan as JSON-serialisable data."""
        return {field.name: (list(value) if isinstance(value, tuple) else
                             value.to_dict() if hasattr(value, "to_dict") else value)
                for field in dataclasses.fields(self) for value in [getattr(self, field.name)]}


def reserve_text(reserve_bytes: int, parts: Sequence[tuple[str, int]]) -> str:
    """The device reserve in words, each named part (a draft, a dequantization buffer) apart from the activations
    and KV cache that the rest is for."""
    kept = reserve_bytes - sum(nbytes for _, nbytes in parts)
    if not parts:
        return f"{format_size(reserve_bytes)} for activations and KV cache"
    named = ", ".join(f"{format_size(nbytes)} for {name}" for name, nbytes in parts)
    return f"{format_size(reserve_bytes)}: {format_size(kept)} for activations and KV cache, {named}"


def slot_bytes(streamed: Sequence[UnitInfo], depth: int) -> int:
    """Room to stream: the unit being computed plus `depth` prefetched ones, as `depth + 1` of the others, or the
    largest alone. A unit much larger than the rest (a 72B model's 2.5 GB output layer beside 0.5 GB layers) then
    has room to itself without cutting every unit's prefetch: the store holds prefetches back while there is no
    room, so that one unit's copy overlaps less, once a pass."""
    sizes = sorted((unit.nbytes for unit in streamed), reverse=True)
    if len(sizes) <= depth + 1:  # every streamed unit can be on the device at once
        return sum(sizes)
    return max(sizes[0], sum(sizes[1:depth + 2]))


def _spread(count: int) -> list[int]:
    """0..count-1 in bit-reversed order: every prefix is spread evenly over the range."""
    bits = max(1, (count - 1).bit_length())
    order = sorted(range(1 << bits), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))
    return [i for i in order if i < count]


def _choose_resident(units: Sequence[UnitInfo], budget_bytes: int, depth: int,
                     order: str = "spread") -> list[UnitInfo]:
    """Greedy: units used most per pass first, then the largest (it also shrinks the streaming slots). Among
    equal units (the decoder layers) the resident ones are spread over the pass, so that streamed units alternate
    with resident ones and their copies overlap the residents' compute instead of queueing after it (`order`
    "contiguous": the first ones, for comparison)."""
    groups: dict[tuple[int, int], list[UnitInfo]] = {}
    for unit in units:
        groups.setdefault((unit.uses_per_pass, unit.nbytes), []).append(unit)
    ranks = _spread if order == "spread" else (lambda count: list(range(count)))
    spread_rank = {unit.key: rank for group in groups.values()
                   for rank, index in enumerate(ranks(len(group))) for unit in [group[index]]}
    ranked = sorted(units, key=lambda u: (-u.uses_per_pass, -u.nbytes, spread_rank[u.key]))
    resident: list[UnitInfo] = []
    resident_bytes = 0
    for unit in ranked:
        streamed = [u for u in units if u not in resident and u is not unit]
        if resident_bytes + unit.nbytes + slot_bytes(streamed, depth) <= budget_bytes:
            resident.append(unit)
            resident_bytes += unit.nbytes
    return resident


def _check_fits(tier: str, units: Sequence[UnitInfo], budget_bytes: int) -> None:
    """BudgetError, naming the unit and its size, when the tier cannot hold even the largest unit."""
    largest = max(units, key=lambda u: u.nbytes)
    if largest.nbytes > budget_bytes:
        raise BudgetError(f"{tier} budget {format_size(budget_bytes)} cannot hold unit {largest.key!r}: "
                          f"it needs {largest.nbytes} bytes ({format_size(largest.nbytes)})")


def _fit(tier: str, units: Sequence[UnitInfo], budget_bytes: int, depth: int,
         order: str) -> tuple[int, list[UnitInfo]]:
    """The deepest prefetch (at most `depth`) for which a resident set plus streaming slots fits the tier, and
    that resident set. BudgetError when not even one unit fits."""
    _check_fits(tier, units, budget_bytes)
    for tried in range(depth, -1, -1):
        resident = _choose_resident(units, budget_bytes, tried, order)
        streamed = [u for u in units if u not in resident]
        if sum(u.nbytes for u in resident) + slot_bytes(streamed, tried) <= budget_bytes:
            return tried, resident
    return 0, []


def _check_policies(data: PlanInput) -> None:
    for name, table in (("device_policy", EVICTION_POLICIES), ("host_policy", EVICTION_POLICIES),
                        ("prefetch", PREFETCH_POLICIES)):
        value = getattr(data, name)
        if value != AUTO and value not in table:
            raise ConfigError(f"{name}: unknown policy {value!r}; choose from {', '.join(sorted(table))}")


def _place_on_device(units: list[UnitInfo], weights_bytes: int, depth: int,
                     order: str) -> tuple[int, list[UnitInfo]]:
    """Step 1: the device tier. Everything, when it fits; else the resident set and the depth that fit."""
    if sum(u.nbytes for u in units) <= weights_bytes:
        return depth, units
    return _fit("device", units, weights_bytes, depth, order)


def _place_in_host(units: list[UnitInfo], through_host: list[UnitInfo], device_resident: list[UnitInfo],
                   host_bytes: int, depth: int, order: str) -> tuple[int, list[UnitInfo]]:
    """Step 2: the host tier, for the units the device does not keep. Every unit passes through host RAM when it
    is first loaded, so the tier must hold the largest; when all streamed units fit beside one device-resident
    unit in transit, they all stay; else the resident set and the disk read-ahead depth that fit."""
    _check_fits("host", units, host_bytes)
    if sum(u.nbytes for u in through_host) + slot_bytes(device_resident, 0) <= host_bytes:
        return 0, through_host  # nothing is read from disk twice: no read-ahead depth
    host_depth, resident = _fit("host", through_host or units, host_bytes, depth, order)
    return host_depth, [u for u in resident if u in through_host]


def make_dense_plan(data: PlanInput) -> Plan:
    """Place every unit (device tier first, then host; the rest is read from disk each pass), choose the
    policies and the prefetch depths, and predict the time of one pass. `data.experts` is not looked at."""
    _check_policies(data)
    units = list(data.units)
    notes = list(data.notes)
    device_weights = data.device_budget_bytes - data.device_reserve_bytes
    if device_weights <= 0:
        raise BudgetError(f"device budget {format_size(data.device_budget_bytes)} leaves no room for weights "
                          f"after reserving {reserve_text(data.device_reserve_bytes, data.reserve_parts)}")
    prefetch = "lookahead" if data.prefetch == AUTO else data.prefetch
    wanted_depth = 0 if prefetch == "none" else (DEFAULT_PREFETCH_DEPTH if data.prefetch_depth is None
                                                  else data.prefetch_depth)

    depth, device_resident = _place_on_device(units, device_weights, wanted_depth, data.resident_order)
    through_host = [u for u in units if u not in device_resident]
    host_depth, host_resident = _place_in_host(units, through_host, device_resident, data.host_budget_bytes,
                                               wanted_depth, data.resident_order)
    from_disk = [u for u in through_host if u not in host_resident]
    # Step 3: depths. Disk reads run ahead on their own depth, so that a device tier with room for one streamed
    # unit still keeps the disk busy; the device's prefetch cannot run deeper than the host can stage.
    if depth > host_depth and from_disk:
        notes.append(f"prefetch depth lowered from {depth} to {host_depth} to fit the host budget")
        depth = host_depth
    if data.prefetch_depth is not None and depth < data.prefetch_depth and prefetch != "none":
        notes.append(f"prefetch depth {data.prefetch_depth} does not fit the budget; using {depth}")

    regime = "device" if not through_host else ("device+host" if not from_disk else "disk")
    h2d_bytes = sum(u.nbytes * u.uses_per_pass for u in through_host)
    disk_bytes = sum(u.nbytes * u.uses_per_pass for u in from_disk)
    return Plan(
        regime=regime,
        device_resident=tuple(u.key for u in device_resident),
        host_resident=tuple(u.key for u in host_resident),
        streamed_from_host=tuple(u.key for u in through_host if u in host_resident),
        streamed_from_disk=tuple(u.key for u in from_disk),
        device_policy="static" if data.device_policy == AUTO else data.device_policy,
        host_policy="static" if data.host_policy == AUTO else data.host_policy,
        prefetch=prefetch,
        prefetch_depth=depth,
        disk_prefetch_depth=host_depth,
        device_budget_bytes=data.device_budget_bytes,
        host_budget_bytes=data.host_budget_bytes,
        device_reserve_bytes=data.device_reserve_bytes,
        device_weights_bytes=device_weights,
        device_slot_bytes=slot_bytes(through_host, depth),
        host_slot_bytes=slot_bytes(from_disk or device_resident, host_depth),
        h2d_bytes_per_pass=h2d_bytes,
        disk_bytes_per_pass=disk_bytes,
        predicted=predict_pass(h2d_bytes, disk_bytes, data),
        schedule=data.schedule,
        notes=tuple(notes),
        host_lookup=data.host_lookup,
        reserve_parts=data.reserve_parts,
    )


def predict_pass(h2d_bytes: int, disk_bytes: int, data: PlanInput) -> dict[str, float | str | None]:
    """Seconds per pass with perfect overlap: the slowest of the disk, the host-to-device link and, where its rate
    was measured, the device memory the weights are read from (and a packed unit's dequantized copy written to
    and read back; `UnitInfo.read_bytes`). When that is not a meaningful bound, `step_s` is None and `unknown` says
    why: a pass that moves no bytes with no device memory rate (or one on a CPU) is bound by compute, which is
    not modelled, and a link never measured has no rate."""
    terms: dict[str, float | None] = {
        "disk_s": disk_bytes / (data.disk_gbps * 1e9) if data.disk_gbps else (0.0 if not disk_bytes else None),
        "h2d_s": h2d_bytes / (data.h2d_gbps * 1e9) if data.h2d_gbps else (0.0 if not h2d_bytes else None),
    }
    if data.hbm_gbps:
        read = sum((u.nbytes if u.read_bytes is None else u.read_bytes) * u.uses_per_pass for u in data.units)
        terms["hbm_s"] = read / (data.hbm_gbps * 1e9)
    unknown = data.unpredictable
    if unknown is None and not h2d_bytes and not disk_bytes and "hbm_s" not in terms:
        unknown = "every unit is resident on the device: the pass is bound by compute, which is not predicted"
    if unknown is None and None in terms.values():
        unknown = "bandwidths not measured: run `tierstore probe`"
    if unknown is not None:
        return {**terms, "step_s": None, "bound": None, "unknown": unknown}
    bound, step_s = max(terms.items(), key=lambda item: item[1])  # type: ignore[arg-type, return-value]
    return {**terms, "step_s": step_s, "bound": bound.removesuffix("_s"), "unknown": None}
