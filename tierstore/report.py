"""The run report: per tier budget, peak, hits, bytes and GB/s; per run prefill, decode and the plan's bound.

`to_dict()` is JSON-serialisable; `print(report)` shows rich tables.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

from .policies.dense import reserve_text
from .policies.planner import Plan
from .sizes import format_size
from .tier import TierStats


@dataclasses.dataclass
class Timing:
    """Wall-clock of the last generate call, split at the first token."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    new_tokens: int = 0
    batch_size: int = 0
    graphed: bool | None = None  # decode steps replayed a CUDA graph (None: not on a GPU)
    host_step_s: float | None = None  # of a graphed step: the host's time issuing it, not the device's

    def to_dict(self) -> dict[str, float | int | None]:
        """Seconds, steps and derived rates."""
        step_s = self.decode_s / self.decode_steps if self.decode_steps else None
        # tokens after the first (which prefill gives); a step is one weight pass, which with a draft yields several
        return {**dataclasses.asdict(self), "decode_step_s": step_s,
                "decode_tokens_per_s": ((self.new_tokens - 1) * self.batch_size / self.decode_s
                                        if self.decode_s > 0 else None)}


@dataclasses.dataclass
class RunReport:
    """What a run did against what the plan predicted."""

    plan: Plan
    tiers: dict[str, TierStats]
    timing: Timing
    device: str
    setup_s: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)
    speculation: dict[str, Any] | None = None  # SpeculationStats.to_dict() of a run with a draft
    experts: dict[str, Any] | None = None  # ExpertStats.to_dict() of a mixture-of-experts run
    peak_rss_bytes: int | None = None  # the process's peak resident memory so far: what the budgets do not bound
    kv: dict[str, Any] | None = None  # the last call's KV cache: where, how large, moved per pass, prompt chunks

    def to_dict(self) -> dict[str, Any]:
        """The whole report as JSON-serialisable data."""
        timing = self.timing.to_dict()
        predicted = self.plan.predicted.get("step_s")
        achieved = timing["decode_step_s"]
        return {
            "device": self.device,
            "setup_s": self.setup_s,
            "peak_rss_bytes": self.peak_rss_bytes,
            "tiers": {name: stats.to_dict() for name, stats in self.tiers.items()},
            "timing": {**timing, "predicted_step_s": predicted,
                       "ratio_to_bound": achieved / predicted if achieved and predicted else None},
            "plan": self.plan.to_dict(),
            "notes": list(self.notes),
            "speculation": self.speculation,
            "experts": self._experts(timing),
            "kv": self.kv,
        }

    def _experts(self, timing: dict[str, Any]) -> dict[str, Any] | None:
        """The routing counters plus what the experts' tiers moved per pass and per token."""
        if self.experts is None:
            return None
        passes = self.experts["calls"] // max(self.plan.experts.layers, 1) if self.plan.experts else 0
        copied = self.tiers["experts device"].bytes_in
        tokens = timing["new_tokens"] * timing["batch_size"]
        return {**self.experts, "passes": passes, "h2d_bytes_per_pass": copied / passes if passes else None,
                "h2d_bytes_per_token": copied / tokens if tokens else None,
                "mapped_bytes_per_pass": self.experts["mapped_bytes"] / passes if passes else None,
                "host_computed_per_pass": self.experts["host_computed"] / passes if passes else None}

    def tables(self) -> list[Table]:
        """The report as rich tables: tiers, then timing against the plan."""
        data = self.to_dict()
        tiers = Table(title=f"tierstore tiers ({self.device}, plan: {self.plan.regime})")
        for column in ("tier", "budget", "peak", "hits", "misses", "hit rate", "bytes in", "bytes out", "GB/s",
                       "stall s"):
            tiers.add_column(column, justify="left" if column == "tier" else "right")
        for name, stats in data["tiers"].items():
            # the device budget as asked for; what of it is not for weights, the notes break down
            budget = self.plan.device_budget_bytes if name == "device" else stats["budget_bytes"]
            tiers.add_row(name, format_size(budget), format_size(stats["peak_bytes"]),
                          str(stats["hits"]), str(stats["misses"]), _fmt(stats["hit_rate"], "{:.1%}"),
                          format_size(stats["bytes_in"]), format_size(stats["bytes_out"]),
                          _fmt(stats["gbps"], "{:.2f}"), f"{stats['stall_s']:.3f}")
        timing = data["timing"]
        # tokens per sequence; tokens/s over all the batch's sequences
        run = Table(title="run")
        for column in ("prefill s", "decode s", "batch", "tokens each", "tokens/s", "step s", "predicted step s",
                       "ratio", "bound", "graphed", "peak RSS"):
            run.add_column(column, justify="right")
        graphed = "-" if timing["graphed"] is None else \
            f"yes, host {timing['host_step_s'] * 1e3:.2f} ms/step" if timing["graphed"] and timing["host_step_s"] \
            else "yes" if timing["graphed"] else "no"
        run.add_row(f"{timing['prefill_s']:.3f}", f"{timing['decode_s']:.3f}", str(timing["batch_size"]),
                    str(timing["new_tokens"]), _fmt(timing["decode_tokens_per_s"], "{:.2f}"),
                    _fmt(timing["decode_step_s"], "{:.4f}"), _fmt(timing["predicted_step_s"], "{:.4f}"),
                    _fmt(timing["ratio_to_bound"], "{:.2f}x"), str(self.plan.predicted.get("bound") or "-"),
                    graphed, format_size(self.peak_rss_bytes) if self.peak_rss_bytes else "-")
        tables = [tiers, run]
        if self.speculation is not None:
            tables.append(_speculation_table(self.speculation))
        if data["experts"] is not None:
            tables.extend(_experts_tables(data["experts"]))
        if self.kv is not None:
            tables.append(_kv_table(self.kv))
        if self.plan.notes or self.notes:
            notes = Table(title="notes", show_header=False)
            notes.add_column("note")
            for note in (*self.plan.notes, *self.notes):
                notes.add_row(note)
            tables.append(notes)
        return tables

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.tables()

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=120, force_terminal=False).print(self)
        return buffer.getvalue()


DEPTHS_SHOWN = 4  # the speculation table's acceptance by depth (the report's dict holds every depth)


def _speculation_table(data: dict[str, Any]) -> Table:
    """Passes, tokens and time; for streamed experts also the verify passes' expert budget (missed experts per MoE
    layer), the drafted nodes it pruned per pass and the most one layer call moved."""
    table = Table(title=f"speculation (draft: {data['draft']})")
    budgeted = data.get("expert_budget") is not None
    for column in ("passes", "tokens/pass", "acceptance", f"% at depth 1-{DEPTHS_SHOWN}", "tree nodes/pass",
                   "draft s", "draft step s", "verify s", "verify pass s",
                   *(("expert budget", "pruned nodes/pass", "most moved") * budgeted)):
        table.add_column(column, justify="right", no_wrap=column.startswith("%"))

    def per_pass(count: int) -> float | None:
        return count / data["passes"] if data["passes"] else None
    table.add_row(str(data["passes"]), _fmt(data["tokens_per_pass"], "{:.2f}"),
                  _fmt(data["acceptance_rate"], "{:.1%}"),
                  " ".join(f"{rate * 100:.0f}" for rate in data["acceptance_by_depth"][:DEPTHS_SHOWN]) or "-",
                  _fmt(per_pass(data["tree_nodes"]), "{:.1f}"),
                  f"{data['draft_s']:.3f}", _fmt(data["draft_step_s"], "{:.4f}"), f"{data['verify_s']:.3f}",
                  _fmt(data["verify_pass_s"], "{:.4f}"),
                  *((str(data["expert_budget"]), _fmt(per_pass(data["pruned_nodes"]), "{:.1f}"),
                     str(data["most_missed_experts"])) if budgeted else ()))
    return table


def _kv_table(data: dict[str, Any]) -> Table:
    """Where the KV cache lived (bytes by tier), what a decode pass moved over the link and from disk, how the
    prompt was fed and what the prefix cache saved."""
    table = Table(title="KV cache")
    for column in ("tier", "tokens", "bytes by tier", "link/pass", "disk/pass", "prompt chunk",
                   "prefix tokens reused", "prefix hits/misses"):
        table.add_column(column, justify="right")
    prefix = data.get("prefix")
    by_tier = ", ".join(f"{tier} {format_size(nbytes)}" for tier, nbytes in data["tier_bytes"].items())
    table.add_row(data["tier"], str(data["cache_tokens"]), by_tier, format_size(data["moved_bytes_per_pass"]),
                  format_size(data["disk_bytes_per_pass"]), str(data["prompt_chunk_tokens"] or "whole"),
                  str(data["prefix_tokens_reused"]),
                  f"{prefix['hits']}/{prefix['misses']}" if prefix is not None else "-")
    return table


def _experts_tables(data: dict[str, Any]) -> list[Table]:
    """Two tables: how the experts were routed, and where the missed ones were computed."""
    routing = Table(title="experts: routing")
    for column in ("layer calls", "routed/call", "experts touched", "busiest 10% share", "prediction recall",
                   "prefetch used", "chunked calls"):
        routing.add_column(column, justify="right")
    calls = data["calls"]
    routing.add_row(str(calls), _fmt(data["routed"] / calls if calls else None, "{:.1f}"),
                    str(data["experts_touched"]), _fmt(data["busiest_tenth_share"], "{:.1%}"),
                    _fmt(data["prediction_recall"], "{:.1%}"), _fmt(data["prefetch_used_share"], "{:.1%}"),
                    str(data["chunked_calls"]))
    misses = Table(title="experts: misses")
    for column in ("copied/pass", "copied/token", "read in place/pass", "CPU-computed/pass", "CPU tokens/expert",
                   "CPU GB/s", "CPU time dequantizing", "host work/layer call"):
        misses.add_column(column, justify="right")
    misses.add_row(_fmt(data["h2d_bytes_per_pass"], "{}", format_size),
                   _fmt(data["h2d_bytes_per_token"], "{}", format_size),
                   _fmt(data["mapped_bytes_per_pass"], "{}", format_size),
                   _fmt(data["host_computed_per_pass"], "{:.1f}"), _fmt(data.get("host_tokens_per_expert"), "{:.1f}"),
                   _fmt(data["cpu_gbps"], "{:.1f}"),
                   _fmt(data["host_unpack_s"] / data["host_s"] if data["host_s"] else None, "{:.0%}"),
                   _fmt(data["host_work_s_per_call"], "{:.2e} s"))
    return [routing, misses]


def plan_table(plan: Plan) -> Table:
    """The plan as a table: placement per unit group, policies and the predicted time per pass."""
    table = Table(title=f"tierstore plan: {plan.regime}")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    rows = [
        ("device budget", f"{format_size(plan.device_budget_bytes)} (reserved "
                          f"{reserve_text(plan.device_reserve_bytes, plan.reserve_parts)})"),
        ("host budget", format_size(plan.host_budget_bytes)),
        ("device resident", _keys(plan.device_resident)),
        ("host resident", _keys(plan.host_resident)),
        ("streamed from host", _keys(plan.streamed_from_host)),
        ("streamed from disk", _keys(plan.streamed_from_disk)),
        ("policies", f"device {plan.device_policy}, host {plan.host_policy}, prefetch {plan.prefetch} "
                     f"depth {plan.prefetch_depth}"),
        ("bytes per pass", f"host->device {format_size(plan.h2d_bytes_per_pass)}, "
                           f"disk {format_size(plan.disk_bytes_per_pass)}"),
        ("predicted s per pass", _prediction(plan.predicted)),
    ]
    if plan.experts is not None:
        rows[-1:-1] = _expert_rows(plan.experts)
    rows += [("note", note) for note in plan.notes]
    for row in rows:
        table.add_row(*row)
    return table


def _expert_rows(experts: Any) -> list[tuple[str, str]]:
    """Where the experts live, and what a pass moves at batch 1 and 32 (uniform routing)."""
    total = experts.total_experts
    rows = [("experts", f"{total} units of {format_size(experts.expert_bytes)} ({experts.layers} layers x "
                        f"{experts.experts_per_layer}, {experts.top_k} routed per token)"),
            ("experts placement",
             f"device {experts.device_slots} slots ({format_size(experts.device_slots * experts.expert_bytes)}, "
             f"{experts.device_policy}), host {experts.host_experts} "
             f"({format_size(experts.host_experts * experts.expert_bytes)}, {experts.host_policy}), "
             f"disk {total - experts.host_experts}; prefetch {experts.prefetch}"),
            ("experts missed", _compute_text(experts))]
    for batch in (1, 32):
        h2d, disk = experts.moved_bytes(batch)
        rows.append((f"expert bytes per pass, batch {batch}",
                     f"routed {format_size(experts.routed_bytes(batch))}, host->device {format_size(h2d)}, disk "
                     f"{format_size(disk)} (uniform routing)"))
    return rows


def _compute_text(experts: Any) -> str:
    """Where an expert routed to but not in a slot is computed, and by what rates."""
    if experts.compute == "device":
        return "copied into a slot (experts.compute = device)"
    if experts.compute == "host":
        return "computed by the CPU from host RAM (experts.compute = host)"
    costs = experts.costs
    return (f"split per layer between copies ({costs.link_gbps:.1f} GB/s link) and the CPU ({costs.host_gbps:.1f} "
            f"GB/s at 1 token, {costs.host_gbps_32:.1f} at 32): about {experts.host_share:.0%} on the CPU at batch 1")


def _prediction(predicted: dict[str, float | str | None]) -> str:
    if predicted.get("step_s") is None:
        return f"unknown ({predicted.get('unknown') or 'run `tierstore probe` to measure bandwidths'})"
    terms = ", ".join(f"{name.removesuffix('_s')} {value:.4f}" for name, value in predicted.items()
                      if name in ("disk_s", "h2d_s", "hbm_s") and isinstance(value, float))
    return f"{predicted['step_s']:.4f} (bound: {predicted['bound']}; {terms})"


def _keys(keys: tuple[str, ...]) -> str:
    if not keys:
        return "-"
    if len(keys) <= 6:
        return ", ".join(keys)
    return f"{len(keys)} units: {', '.join(keys[:3])}, ..., {keys[-1]}"


def _fmt(value: float | None, spec: str, convert: Any = None) -> str:
    if value is None:
        return "-"
    return spec.format(convert(value) if convert is not None else value)
