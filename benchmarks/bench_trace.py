"""What a trace costs, and a picture of a streamed pass: decode s/token with `trace=` against without, alternating.

One device-tool call (about 4 minutes on the H200):
    python benchmarks/bench_trace.py --out $OUT
Two cases, each opened twice (untraced and traced) and run alternately (5 and 9 times); every decode step's time
is kept, and the medians (and 10th percentiles) of all steps are compared:
- streamed: Llama-2-7B-shaped fp16 (random weights) at vram 4GB / ram 16GB, PCIe-bound (~0.24 s/token);
- resident: a 1.3B Llama-shaped model wholly on the GPU, where a step is milliseconds of kernel launches, the
  case in which the tracer's CUDA events weigh most.
Writes both traces and the streamed run's timeline (timeline.png) under --out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from common import build_checkpoint, prompt_ids


class StepTimes:
    """A logits processor that keeps the time between consecutive decode steps."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, input_ids, scores):
        self.calls.append(time.perf_counter())
        return scores

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.calls[1:], self.calls[2:])]  # the first call ends prefill


def decode_steps(model, ids, tokens: int) -> list[float]:
    """Seconds of each decode step of one generate call."""
    from transformers import LogitsProcessorList

    clock = StepTimes()
    model.generate(ids, max_new_tokens=tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]))
    return clock.steps()


def run_case(name: str, path: str, budget, tokens: int, repeats: int, out: str, cache: str) -> dict:
    import torch

    import tierstore

    config = {"runtime": {"cache_dir": cache}}
    trace_path = os.path.join(out, f"trace-{name}.json")
    plain = tierstore.AutoModel.from_pretrained(path, budget=budget, config=config, dtype=torch.float16)
    traced = tierstore.AutoModel.from_pretrained(path, budget=budget, config=config, dtype=torch.float16,
                                                 trace=trace_path)
    ids = prompt_ids(1).to(plain.device)
    times: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for model in (plain, traced):  # warm: allocator, kernels, page cache
            decode_steps(model, ids, 4)
        for _ in range(repeats):
            times["off"] += decode_steps(plain, ids, tokens)
            times["on"] += decode_steps(traced, ids, tokens)
        predicted = plain.report().to_dict()["plan"]["predicted"]
    finally:
        plain.close()
        traced.close()
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    low_off, low_on = (statistics.quantiles(times[k], n=10)[0] for k in ("off", "on"))
    row = {"case": name, "tokens": tokens, "repeats": repeats, "steps": len(times["off"]), "off_s": off, "on_s": on,
           "ratio": on / off, "p10_off_s": low_off, "p10_on_s": low_on, "bound": predicted.get("bound"),
           "predicted_s": predicted.get("step_s"), "trace": trace_path, "trace_mb": os.path.getsize(trace_path) / 1e6}
    print(f"{name:9} decode step s, median of {len(times['off'])}: off {off:.4f}  on {on:.4f}  on/off {on / off:.3f};"
          f"  p10 off {low_off:.4f}  on {low_on:.4f}  on/off {low_on / low_off:.3f};  trace {row['trace_mb']:.1f} MB",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/bench-trace")
    parser.add_argument("--work", default="/tmp")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import json

    import torch

    import tierstore
    from tierstore.plot import plot_trace
    from tierstore.probe import run_probe

    cache = os.path.join(args.work, "trace-cache")
    probe = run_probe(cache, torch.device("cuda", 0))
    print(f"probe: disk {probe['disk_gbps']:.2f} GB/s, pinned h2d {probe['h2d_pinned_gbps']:.2f} GB/s; "
          f"{torch.cuda.get_device_name(0)}", flush=True)
    big, small = os.path.join(args.work, "llama7b-hf"), os.path.join(args.work, "llama1b-hf")
    build_checkpoint(big)
    build_checkpoint(small, hidden=2048, inter=5504, layers=24, heads=16)
    rows = [run_case("streamed", big, tierstore.Budget(vram="4GB", ram="16GB"), 16, 5, args.out, cache),
            run_case("resident", small, None, 128, 9, args.out, cache)]
    print(plot_trace(rows[0]["trace"], os.path.join(args.out, "timeline.png")))
    with open(os.path.join(args.out, "bench_trace.json"), "w") as handle:
        json.dump({"probe": probe, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
