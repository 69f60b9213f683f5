"""The planner's one entry point: a model's plan, dense (dense.py) or with routed experts planned as a cache in
the room the dense units leave (experts.py)."""
from __future__ import annotations

import dataclasses

from .dense import AUTO, Plan, PlanInput, UnitInfo, make_dense_plan, predict_pass
from .experts import make_moe_plan

__all__ = ["AUTO", "Plan", "PlanInput", "UnitInfo", "make_plan", "predict_pass"]


def make_plan(data: PlanInput) -> Plan:
    """Place every unit (device tier first, then host; the rest is read from disk each pass), choose the
    policies and the prefetch depths, and predict the time of one pass. Routed experts (`data.experts`) are
    planned after the dense units, in the room they leave."""
    if data.experts is not None:
        return make_moe_plan(dataclasses.replace(data, experts=None), data.experts)
    return make_dense_plan(data)
