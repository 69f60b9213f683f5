"""The planner: from budgets, unit sizes and measured bandwidths, decide placement, policies and prefetch depth.

Pure bookkeeping: keys, byte counts and seconds. The plan is data; the store carries it out.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..errors import BudgetError
from ..sizes import format_size
from .registry import EVICTION_POLICIES, PREFETCH_POLICIES

AUTO = "auto"
DEFAULT_PREFETCH_DEPTH = 2


@dataclasses.dataclass(frozen=True)
class UnitInfo:
    """One store unit as the planner sees it."""

    key: str
    nbytes: int
    uses_per_pass: int = 1


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
    compute_s_per_pass: float | None = None
    device_policy: str = AUTO
    host_policy: str = AUTO
    prefetch: str = AUTO
    prefetch_depth: int | None = None
    notes: tuple[str, ...] = ()


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

    def to_dict(self) -> dict[str, object]:
        """The plan as JSON-serialisable data."""
        return {field.name: (list(value) if isinstance(value, tuple) else value)
                for field in dataclasses.fields(self) for value in [getattr(self, field.name)]}


def _slot_bytes(streamed: Sequence[UnitInfo], depth: int) -> int:
    """Room to stream: the unit being computed plus `depth` prefetched ones, at most the `depth + 1` largest
    (an uncompressed output layer does not make every slot its size)."""
    return sum(sorted((unit.nbytes for unit in streamed), reverse=True)[:depth + 1])


def _spread(count: int) -> list[int]:
    """0..count-1 in bit-reversed order: every prefix is spread evenly over the range."""
    bits = max(1, (count - 1).bit_length())
    order = sorted(range(1 << bits), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))
    return [i for i in order if i < count]


def _choose_resident(units: Sequence[UnitInfo], budget_bytes: int, depth: int) -> list[UnitInfo]:
    """Greedy: units used most per pass first, then the largest (it also shrinks the streaming slots). Among
    equal units (the decoder layers) the resident ones are spread over the pass, so that streamed units alternate
    with resident ones and their copies overlap the residents' compute instead of queueing after it."""
    groups: dict[tuple[int, int], list[UnitInfo]] = {}
    for unit in units:
        groups.setdefault((unit.uses_per_pass, unit.nbytes), []).append(unit)
    spread_rank = {unit.key: rank for group in groups.values()
                   for rank, index in enumerate(_spread(len(group))) for unit in [group[index]]}
    ranked = sorted(units, key=lambda u: (-u.uses_per_pass, -u.nbytes, spread_rank[u.key]))
    resident: list[UnitInfo] = []
    resident_bytes = 0
    for unit in ranked:
        streamed = [u for u in units if u not in resident and u is not unit]
        if resident_bytes + unit.nbytes + _slot_bytes(streamed, depth) <= budget_bytes:
            resident.append(unit)
            resident_bytes += unit.nbytes
    return resident


def _fit(tier: str, units: Sequence[UnitInfo], budget_bytes: int, depth: int) -> tuple[int, list[UnitInfo]]:
    """The deepest prefetch (at most `depth`) for which a resident set plus streaming slots fits the tier.

    BudgetError, naming the unit and its size, when not even one unit fits.
    """
    largest = max(units, key=lambda u: u.nbytes)
    if largest.nbytes > budget_bytes:
        raise BudgetError(f"{tier} budget {format_size(budget_bytes)} cannot hold unit {largest.key!r}: "
                          f"it needs {largest.nbytes} bytes ({format_size(largest.nbytes)})")
    for tried in range(depth, -1, -1):
        resident = _choose_resident(units, budget_bytes, tried)
        streamed = [u for u in units if u not in resident]
        if sum(u.nbytes for u in resident) + _slot_bytes(streamed, tried) <= budget_bytes:
            return tried, resident
    return 0, []


def make_plan(data: PlanInput) -> Plan:
    """Place every unit, choose the policies and the prefetch depth, and predict the time of one pass."""
    for name, table in (("device_policy", EVICTION_POLICIES), ("host_policy", EVICTION_POLICIES),
                        ("prefetch", PREFETCH_POLICIES)):
        value = getattr(data, name)
        if value != AUTO and value not in table:
            raise BudgetError(f"{name}: unknown policy {value!r}; choose from {', '.join(sorted(table))}")
    units = list(data.units)
    notes = list(data.notes)
    device_weights = data.device_budget_bytes - data.device_reserve_bytes
    if device_weights <= 0:
        raise BudgetError(f"device budget {format_size(data.device_budget_bytes)} leaves no room for weights "
                          f"after reserving {format_size(data.device_reserve_bytes)} for activations and KV cache")

    prefetch = "lookahead" if data.prefetch == AUTO else data.prefetch
    depth = (DEFAULT_PREFETCH_DEPTH if data.prefetch_depth is None else data.prefetch_depth)
    depth = 0 if prefetch == "none" else depth

    wanted_depth = depth
    total_bytes = sum(u.nbytes for u in units)
    if total_bytes <= device_weights:
        device_resident = units
    else:
        depth, device_resident = _fit("device", units, device_weights, depth)
    through_host = [u for u in units if u not in device_resident]
    # Every unit passes through host RAM at least once, when it is first loaded. Disk reads run ahead on their own
    # depth, so that a device tier with room for one streamed unit still keeps the disk busy.
    host_depth = depth
    if sum(u.nbytes for u in through_host) + _slot_bytes(device_resident, 0) <= data.host_budget_bytes:
        _fit("host", units, data.host_budget_bytes, 0)
        host_resident = through_host
    else:
        host_depth, host_resident = _fit("host", through_host or units, data.host_budget_bytes, wanted_depth)
        host_resident = [u for u in host_resident if u in through_host]
    from_disk = [u for u in through_host if u not in host_resident]
    if depth > host_depth and from_disk:
        notes.append(f"prefetch depth lowered from {depth} to {host_depth} to fit the host budget")
        depth = host_depth
    if data.prefetch_depth is not None and depth < data.prefetch_depth and prefetch != "none":
        notes.append(f"prefetch depth {data.prefetch_depth} does not fit the budget; using {depth}")
    host_depth = host_depth if from_disk else 0

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
        device_slot_bytes=_slot_bytes(through_host, depth),
        host_slot_bytes=_slot_bytes(from_disk or device_resident, host_depth),
        h2d_bytes_per_pass=h2d_bytes,
        disk_bytes_per_pass=disk_bytes,
        predicted=predict_pass(h2d_bytes, disk_bytes, data),
        schedule=data.schedule,
        notes=tuple(notes),
    )


def predict_pass(h2d_bytes: int, disk_bytes: int, data: PlanInput) -> dict[str, float | str | None]:
    """Seconds per pass with perfect overlap: the slowest of disk, host-to-device copy and compute."""
    terms: dict[str, float | None] = {
        "disk_s": disk_bytes / (data.disk_gbps * 1e9) if data.disk_gbps else (0.0 if not disk_bytes else None),
        "h2d_s": h2d_bytes / (data.h2d_gbps * 1e9) if data.h2d_gbps else (0.0 if not h2d_bytes else None),
        "compute_s": data.compute_s_per_pass,
    }
    known = {name: value for name, value in terms.items() if value is not None}
    bound_name, step_s = max(known.items(), key=lambda item: item[1]) if known else (None, None)
    result: dict[str, float | str | None] = dict(terms)
    result["step_s"] = step_s
    result["bound"] = bound_name.removesuffix("_s") if bound_name else None
    return result
