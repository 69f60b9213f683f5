"""Eviction and prefetch policies and the planner: keys and byte counts only, no torch."""
from .eviction import FIFO, LFU, LRU, MRU, Belady, EvictionPolicy, Static
from .planner import Plan, PlanInput, UnitInfo, make_plan
from .prefetch import Lookahead, NoPrefetch, PrefetchPolicy
from .registry import EVICTION_POLICIES, PREFETCH_POLICIES, make_eviction, make_prefetch

__all__ = [
    "FIFO", "LFU", "LRU", "MRU", "Belady", "Static", "EvictionPolicy",
    "Lookahead", "NoPrefetch", "PrefetchPolicy",
    "EVICTION_POLICIES", "PREFETCH_POLICIES", "make_eviction", "make_prefetch",
    "Plan", "PlanInput", "UnitInfo", "make_plan",
]
