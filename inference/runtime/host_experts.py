"""Routed experts computed by the CPU where they live, in host RAM: the token's hidden state crosses the link, not
the expert's weights.

The math is transformers' experts kernel for one expert (its `batched_mm` form): the first projection (gate and
up, or up alone), the module's own `_apply_gate` or activation, the down projection, biases where the module has
them, each output scaled by its routing weight. It runs on the expert's own tensors in the host tier (one slice of
each fused parameter), so nothing is stacked or copied; outputs are summed per token in float32.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

# CPU cores left to other threads while the CPU computes experts beside a GPU. A thread waiting on the GPU spins a
# core (CUDA's default), and one spinning thread beside torch's full team of threads stalls every parallel region on
# the thread that shares its core: on a 16-core H100 host the experts' rate fell from 28.7 GB/s to 0.4 (one token an
# expert) with a thread copying to the GPU and waiting beside them, and came back to 28.4 with 15 threads
# (benchmarks/cpu_expert_rate.py). Such a thread: a draft growing its tree ahead (`speculation.ahead`), a caller's
# own. Two cores cost the experts about 1% where nothing spins.
SPARE_CORES = 2


def host_threads(device: torch.device, threads: int) -> int | None:
    """The intra-op threads the CPU's experts run with beside `device` (None: torch's own; on a CPU there is no
    GPU to wait on, the experts are the device's work)."""
    return None if device.type == "cpu" else max(1, threads - SPARE_CORES)


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `count` for the block, then as they were (about a microsecond each way)."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def computes_on_host(module: nn.Module) -> bool:
    """Whether this experts module's math is the one `expert_forward` runs: transformers' experts interface with
    fused gate/up (or up) and down projections and no post-expert norm (whose weights live on the device)."""
    if not hasattr(module, "has_gate") or getattr(module, "has_post_expert_norm", False):
        return False
    first = "gate_up_proj" if module.has_gate else "up_proj"
    return first in module._parameters and "down_proj" in module._parameters


def expert_forward(module: nn.Module, weights: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """One expert of `module` on `inputs` (tokens, hidden), from its tensors by parameter name (one slice each);
    or, with the tensors stacked one expert per row of `inputs` (rows, *shape), each row by its own expert."""
    return expert_math(module, inputs, lambda name, x: _linear(x, weights[name], weights.get(f"{name}_bias"),
                                                               module.is_transposed))


def expert_math(module: nn.Module, inputs: torch.Tensor,
                linear: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """An expert of transformers' experts interface on `inputs`: the first projection (fused gate/up, or up), the
    gate or the activation, the down projection; `linear(name, x)` multiplies x by parameter `name` (its bias
    added)."""
    first = "gate_up_proj" if module.has_gate else "up_proj"
    hidden = linear(first, inputs)
    hidden = module._apply_gate(hidden) if module.has_gate else module.act_fn(hidden)
    return linear("down_proj", hidden)


def _linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if weight.dim() == 3:  # one matrix per row of inputs
        out = (inputs[:, None, :] @ weight)[:, 0] if transposed else (weight @ inputs[:, :, None])[..., 0]
    else:
        out = inputs @ weight if transposed else nn.functional.linear(inputs, weight)
    return out if bias is None else out + bias


def host_outputs(module: nn.Module, experts: Sequence[int], weights: Sequence[Mapping[str, torch.Tensor]],
                 routed: Sequence[int], top_k: int, hidden: torch.Tensor, routing_weights: torch.Tensor,
                 pin_memory: bool = False) -> torch.Tensor:
    """The summed outputs (tokens, hidden) in float32 of `experts`, each from its `weights`, for the tokens routed
    to them: `routed` is the routing token-major (top_k per token); `hidden` and `routing_weights` are on the CPU.
    `pin_memory`: the sum is made in pinned memory, so that its copy to a GPU does not wait for the host."""
    total = torch.zeros(hidden.shape, dtype=torch.float32, pin_memory=pin_memory)
    pairs = _pairs(routed, experts, top_k)
    for expert, tensors in zip(experts, weights):
        if expert not in pairs:  # no token of these routed to it
            continue
        tokens, ranks = pairs[expert]
        dtype = next(iter(tensors.values())).dtype
        out = expert_forward(module, tensors, hidden[tokens].to(dtype))
        total.index_add_(0, tokens, out.float() * routing_weights[tokens, ranks, None].float())
    return total


def _pairs(routed: Sequence[int], experts: Sequence[int], top_k: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each of `experts`' (tokens, ranks) in `routed` (token-major, `top_k` a token), in routing order. Found with
    numpy's array ops: a verify pass routes some 8,200 pairs a layer, which a Python loop took 1.5 ms to sort out
    on a 2-core CPU (this: 0.5 ms)."""
    routing = np.asarray(routed)
    positions = np.flatnonzero(np.isin(routing, experts))
    ranked = positions[np.argsort(routing[positions], kind="stable")]
    ids, counts = np.unique(routing[ranked], return_counts=True)
    sizes = counts.tolist()
    tokens = torch.from_numpy(ranked // top_k).split(sizes)
    ranks = torch.from_numpy(ranked % top_k).split(sizes)
    return dict(zip(ids.tolist(), zip(tokens, ranks)))
