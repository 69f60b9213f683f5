"""One RMSNorm of a 7B decode step's row on a GPU: transformers' forward against tierstore's fused one.

For a [1, 1, 3584] bfloat16 row (Qwen2.5-7B's width): the kernels each forward launches (torch.profiler), its time
a call inside a CUDA graph of 56 calls (a decode step's norms, launch by launch as a replayed step runs them), and
the largest difference to transformers' values; also torch's rms_norm with the weight inside (one kernel, but the
weight's multiply rounded once where transformers rounds twice). A device call of seconds:
    python benchmarks/norm_kernels.py
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import tierstore  # noqa: F401  (maps the checkout's packages)
from tierstore.inference.runtime.fused_norms import FusedNorms

WIDTH, CALLS, REPLAYS = 3584, 56, 20


def kernels(forward, x: torch.Tensor) -> list[str]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward(x)
        torch.cuda.synchronize()
    return [event.name for event in prof.events() if event.device_type.name == "CUDA"]


def graphed_us(forward, x: torch.Tensor) -> float:
    """µs a call, CALLS calls chained in one CUDA graph, replayed REPLAYS times."""
    for _ in range(3):
        forward(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h = x
        for _ in range(CALLS):
            h = forward(h)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPLAYS * CALLS)


def main() -> None:
    x = torch.randn(1, 1, WIDTH, device="cuda", dtype=torch.bfloat16)
    norm = LlamaRMSNorm(WIDTH, 1e-6).cuda().to(torch.bfloat16)
    norm.weight.data.normal_(1.0, 0.5)
    with torch.no_grad():
        want = norm(x)
        rows = [("transformers' forward", norm.forward)]
        fused = FusedNorms([norm])
        rows.append(("tierstore's (runtime.fused_norms)", norm.forward))
        rows.append(("rms_norm with the weight inside",
                     lambda h: torch.nn.functional.rms_norm(h, (WIDTH,), norm.weight, 1e-6)))
        for name, forward in rows:
            launched = kernels(forward, x)
            difference = (forward(x).float() - want.float()).abs().max().item()
            print(f"{name}: {len(launched)} kernels, {graphed_us(forward, x):.2f} µs a call in a graph, largest "
                  f"difference to transformers {difference:.4g}", flush=True)
        fused.detach()


if __name__ == "__main__":
    main()
