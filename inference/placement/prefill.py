"""How a prompt is fed to the model: in chunks whose activations fit the device budget beside the KV cache and
the weights in flight, at any prompt length.

A pass's activations grow with its tokens: a 7B model's MLP alone holds three [tokens, 18,944] matrices, about
0.2 MB a token, so a 32k-token prompt in one pass took 10.1 GB of a 4 GB budget. A prompt whose one-pass
activations fit half the activation slack (`ACTIVATION_SLACK_BYTES`) runs in one pass as before. A longer one is
cut into chunks, each a weight pass, as large as the device budget allows, because a streamed pass costs the same
for any number of tokens: when every weight stays resident beside the chunk, the room the weights leave; otherwise
the whole budget except the KV cache, its named parts and the room to stream two units at once (the resident
weights give their room to the chunk while the prompt runs, and get it back for decoding).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...errors import BudgetError
from ...policies.dense import slot_bytes
from ...policies.planner import Plan
from ...sizes import format_size
from .budgets import ACTIVATION_SLACK_BYTES, kv_bytes_per_token
from .kv import KVBudget

ONE_PASS_ACTIVATION_BYTES = ACTIVATION_SLACK_BYTES // 2  # a prompt's activations that need no chunks of their own
ESTIMATE_SLACK = 1.5  # the estimate below against the allocator's rounding and the kernels' workspace (at 1.25 a
# 7B model's 32,000-token prompt took 4.09 GB of a 4 GB budget on an H200)


@dataclasses.dataclass(frozen=True)
class Prefill:
    """How a prompt is fed: chunks of `chunk_tokens` (the whole prompt: one pass), and the plan to run them under
    (None: the model's own), with a note for the report when chunked."""

    chunk_tokens: int
    plan: Plan | None = None
    note: str | None = None


def activation_bytes_per_token(config: Any, dtype: torch.dtype, masked_keys: int) -> int:
    """The most one prompt token's activations take at once in a layer: the residual stream and its norms, the
    attention's projections, the MLP's (or the routed experts') intermediates, and, where the attention needs a mask
    (`masked_keys` keys; 0 without one), the mask's row and the float bias the kernel makes of it; eager attention
    also holds its scores in float32."""
    text = config.get_text_config()
    hidden = text.hidden_size
    heads = getattr(text, "num_attention_heads", None) or 1  # none: a state-space model's mixer, as wide
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    routed = getattr(text, "num_experts_per_tok", None)
    if routed:  # each token's experts' intermediates, shared experts included
        expert = getattr(text, "moe_intermediate_size", None) or intermediate
        shared = getattr(text, "n_shared_experts", None) or 0
        intermediate = max(intermediate, expert * (routed + shared))
    width = 8 * hidden + 3 * heads * head_dim + 4 * intermediate
    per_token = width * dtype.itemsize + masked_keys * (1 + dtype.itemsize)
    if getattr(text, "_attn_implementation", None) == "eager":
        per_token += masked_keys * heads * (dtype.itemsize + 4)
    return int(per_token * ESTIMATE_SLACK)


def tree_bytes(config: Any, dtype: torch.dtype, context_tokens: int, nodes: int) -> int:
    """What one verify pass of a tree of `nodes` over a context of `context_tokens` takes on the device: its
    activations, each node's mask row over the context and the tree, its logits and its KV entries (held until
    the pass's accepted path is kept)."""
    vocab = config.get_text_config().vocab_size
    per_token = (activation_bytes_per_token(config, dtype, context_tokens + nodes) + vocab * dtype.itemsize
                 + kv_bytes_per_token(config, dtype))
    return nodes * per_token


def tree_nodes_within(config: Any, dtype: torch.dtype, context_tokens: int, room_bytes: int, cap: int) -> int:
    """The most nodes (at most `cap`, at least 1) a draft tree may have for one verify pass over a context of
    `context_tokens` to keep what the pass takes (`tree_bytes`) within `room_bytes`."""
    nodes = cap
    while nodes > 1 and tree_bytes(config, dtype, context_tokens, nodes) > room_bytes:
        nodes //= 2
    return nodes


def plan_prefill(budget: KVBudget, plan: Plan, prompt_tokens: int, rows: int, masked: bool,
                 chunk_setting: int | None) -> Prefill:
    """How to feed `rows` prompts of `prompt_tokens` under `plan` (the one placing their KV cache): the configured
    chunk (`runtime.prefill_chunk`), one pass when its activations are small, else chunks as above. `masked`: the
    attention needs a mask tensor (padding, a window, eager attention), whose rows grow with the prompt. BudgetError
    when not even one token's activations fit."""
    per_token = rows * activation_bytes_per_token(budget.hf_config, budget.dtype, prompt_tokens if masked else 0)
    if chunk_setting is not None:
        return Prefill(min(chunk_setting, prompt_tokens))
    if per_token * prompt_tokens <= ONE_PASS_ACTIVATION_BYTES:
        return Prefill(prompt_tokens)
    if not budget.separate_device:  # on a CPU the activations live outside the device tier: bound them alike
        chunk = max(ONE_PASS_ACTIVATION_BYTES // per_token, 1)
        return Prefill(chunk, None, f"prompt fed in chunks of {chunk} tokens ({format_size(chunk * per_token)} "
                                    f"of activations each)")
    units = budget.plan_input.units
    weights = sum(unit.nbytes for unit in units)
    room = plan.device_budget_bytes - plan.device_reserve_bytes
    if room - weights >= per_token * min(prompt_tokens, 1024):  # every weight stays resident beside the chunk
        allowance = room - weights
    else:  # the resident weights make way: the chunk takes all but the room to stream two units at once
        allowance = room - slot_bytes(units, 1)
    chunk = min(allowance // per_token, prompt_tokens)
    if chunk < 1:
        raise BudgetError(f"a prompt token's activations take {format_size(per_token)} ({rows} rows), more than the "
                          f"{format_size(max(allowance, 0))} the device budget leaves beside the weights in flight "
                          f"and the KV cache")
    chunk_bytes = chunk * per_token
    note = (f"prompt fed in chunks of {chunk} tokens: {format_size(chunk_bytes)} of the device budget for their "
            f"activations while it runs")
    if chunk_bytes <= ONE_PASS_ACTIVATION_BYTES:
        return Prefill(chunk, None, note)
    parts = (*plan.reserve_parts, (f"prompt activations (chunks of {chunk} tokens)", chunk_bytes))
    return Prefill(chunk, budget.reserved_plan(plan, plan.device_reserve_bytes + chunk_bytes, parts), note)
