"""From a user's budget and this machine's measurements to the planner's input: caps, reserves and notes."""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping

import torch

from ...budget import Budget
from ...files import PAGE_BYTES
from ...policies.planner import PlanInput, UnitInfo
from ...sizes import format_size
from ...units import UnitLayout, align

ACTIVATION_SLACK_BYTES = 256 * 2**20  # cuBLAS workspace, SDPA, hidden states and logits of a small batch
_RESERVE_CONTEXT_TOKENS = 1024
log = logging.getLogger(__name__)


def effective_budgets(budget: Budget, measured: Budget, device: torch.device) -> tuple[int, int, list[str]]:
    """Device and host bytes to plan with: the user's, capped at what is free, or what is free."""
    notes: list[str] = []
    free_vram = measured.vram or 0
    free_ram = measured.ram or 0
    if device.type == "cpu":
        # Without a GPU the device tier is the compute's working set in RAM: both tiers share it, and together
        # they are capped by the free RAM.
        free_vram = free_ram
        default_device, default_host = free_ram // 2, free_ram // 2
    else:
        default_device, default_host = free_vram, free_ram
    device_bytes = _capped("vram", budget.vram, free_vram, default_device, notes)
    free_what = "free"
    if device.type == "cpu":  # one pool of RAM: the host tier gets what the device tier left
        free_ram, free_what = max(free_ram - device_bytes, 0), "of RAM free beside the device tier"
    host_bytes = _capped("ram", budget.ram, free_ram, min(default_host, free_ram), notes, free_what)
    return device_bytes, host_bytes, notes


def _capped(name: str, wanted: int | None, free: int, default: int, notes: list[str],
            free_what: str = "free") -> int:
    if wanted is None:
        notes.append(f"{name} budget measured: {format_size(default)}")
        return default
    if wanted > free:
        notes.append(f"{name} budget {format_size(wanted)} is more than the {format_size(free)} {free_what}; "
                     f"capped by {format_size(wanted - free)}")
        log.warning("%s", notes[-1])
        return free
    return wanted


def kv_bytes_per_token(config: object, dtype: torch.dtype) -> int:
    """KV cache bytes one token adds across all layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * dtype.itemsize


def device_reserve_bytes(config: object, dtype: torch.dtype, device: torch.device, reserve: int | None) -> int:
    """Device bytes kept out of the weight budget: KV cache of 1024 tokens plus activation workspace.

    A generate call whose KV cache would not fit re-plans with a larger reserve (see the model).

    On a CPU the activations live in ordinary RAM outside the device tier, so nothing is reserved.
    """
    if reserve is not None:
        return reserve
    if device.type == "cpu":
        return 0
    return kv_bytes_per_token(config, dtype) * _RESERVE_CONTEXT_TOKENS + ACTIVATION_SLACK_BYTES


@dataclasses.dataclass(frozen=True)
class DraftCost:
    """What a speculative draft holds on the compute device beside the streamed model: its weights (and
    dequantization buffer), resident for the whole run, and its KV cache, which grows with the sequence."""

    name: str
    weights_bytes: int
    kv_bytes_per_token: int
    ahead_tokens: int = 0  # KV entries for a tree grown while the model verifies (`speculation.ahead`)

    def device_bytes(self, cache_tokens: int) -> int:
        """Weights plus a KV cache of `cache_tokens`."""
        return self.weights_bytes + self.kv_bytes_per_token * cache_tokens

    def reserve_bytes(self, separate_device: bool) -> int:
        """What the plan takes from the streamed model's device budget: weights and a KV cache as long as the
        model's own reserve, plus the tree grown ahead (on a CPU, `separate_device` False, the weights: activations
        and KV caches live outside the device tier)."""
        return self.device_bytes(_RESERVE_CONTEXT_TOKENS + self.ahead_tokens if separate_device else 0)

    def note(self, separate_device: bool) -> str:
        kv_bytes = self.reserve_bytes(separate_device) - self.weights_bytes
        ahead = f" and a tree of {self.ahead_tokens} grown ahead" if self.ahead_tokens else ""
        kv = f" + {format_size(kv_bytes)} of KV cache for {_RESERVE_CONTEXT_TOKENS} tokens{ahead}" if kv_bytes else ""
        return (f"draft {self.name}: {format_size(self.weights_bytes)} of weights{kv}, resident on the device and "
                f"taken from the device budget")


def plan_input(unit_bytes: Mapping[str, int], schedule: list[str], device_bytes: int, host_bytes: int,
               reserve_bytes: int, policy: object, probe: Mapping[str, float] | None,
               notes: list[str], device: torch.device, extra_uses: Mapping[str, int] | None = None,
               read_bytes: Mapping[str, int] | None = None) -> PlanInput:
    """The planner's input, units listed in first-use order with their uses per pass (`extra_uses`: uses outside
    the schedule, such as a router also predicting for an earlier layer; `read_bytes`: device memory a use reads
    and writes where it is not the unit's bytes)."""
    uses = Counter(schedule) + Counter(extra_uses or {})
    order = list(dict.fromkeys(schedule))
    probe = probe or {}
    read_bytes = read_bytes or {}
    return PlanInput(
        units=tuple(UnitInfo(key, unit_bytes[key], uses[key], read_bytes.get(key)) for key in order),
        schedule=tuple(schedule),
        device_budget_bytes=device_bytes,
        host_budget_bytes=host_bytes,
        device_reserve_bytes=reserve_bytes,
        h2d_gbps=probe.get("h2d_pinned_gbps") if getattr(policy, "pinned", True) else probe.get("h2d_gbps"),
        disk_gbps=probe.get("disk_gbps"),
        hbm_gbps=probe.get("hbm_gbps") if device.type == "cuda" else None,
        device_policy=policy.device,  # type: ignore[attr-defined]
        host_policy=policy.host,  # type: ignore[attr-defined]
        prefetch=policy.prefetch,  # type: ignore[attr-defined]
        prefetch_depth=policy.prefetch_depth,  # type: ignore[attr-defined]
        resident_order=policy.resident_order,  # type: ignore[attr-defined]
        notes=tuple(notes),
        unpredictable=("on a CPU the pass is bound by compute, which is not predicted" if device.type == "cpu"
                       else None),
    )


def pinned_arena_bytes(budget_bytes: int, layouts: Mapping[str, UnitLayout]) -> int:
    """The pinned arena for a store: its host budget, or all of its units when they take less."""
    return min(budget_bytes, sum(align(layout.nbytes, PAGE_BYTES) for layout in layouts.values()))
