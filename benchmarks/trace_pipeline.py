"""Where does a decode step lose time against the PCIe bound? Times every copy and every layer on the GPU.

    python benchmarks/trace_pipeline.py [--vram 4GB --ram 16GB --depth auto]
Prints, for one decode step, each copy's enqueue time (CPU) and start/end (GPU), and each layer's compute window,
all in ms from the step's start, then the link's busy fraction.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_7b import build_checkpoint, prompt_ids  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="/tmp/llama7b-hf")
    parser.add_argument("--vram", default="4GB")
    parser.add_argument("--ram", default="16GB")
    parser.add_argument("--depth", default="auto")
    parser.add_argument("--switch-interval", type=float, default=None)
    args = parser.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    build_checkpoint(args.model)
    import tierstore

    depth = args.depth if args.depth == "auto" else int(args.depth)
    model = tierstore.AutoModel.from_pretrained(
        args.model, budget=tierstore.Budget(vram=args.vram, ram=args.ram), dtype=torch.float16,
        config={"policy": {"prefetch_depth": depth}, "runtime": {"cache_dir": "/tmp/trace-cache"}})
    print("plan depth", model.plan.prefetch_depth, "resident", model.plan.device_resident, flush=True)
    origin = torch.cuda.Event(enable_timing=True)
    copies: list[tuple[str, float, object, object]] = []
    computes: list[tuple[str, float, object, object]] = []
    transfer = model.store.transfer
    real_copy = transfer.copy
    keys_by_buffer = {}

    def traced_copy(dst, src, free_after):
        fence, timer = real_copy(dst, src, free_after)
        copies.append((keys_by_buffer.get(dst.data_ptr(), "?"), time.perf_counter(), *timer))
        return fence, timer

    transfer.copy = traced_copy
    real_start = model.store._start_device_load

    def traced_start(key, required):
        entry = real_start(key, required)
        if entry is not None:
            keys_by_buffer[entry.buffer.data_ptr()] = key
        return entry

    model.store._start_device_load = traced_start
    for i, layer in enumerate(model.model.model.layers):
        def pre(module, a, i=i):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            module._trace = (time.perf_counter(), start)

        def post(module, a, out, i=i):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            computes.append((f"layers.{i}", module._trace[0], module._trace[1], end))
        layer.register_forward_pre_hook(pre)
        layer.register_forward_hook(post)
    ids = prompt_ids(1)
    model.generate(ids, max_new_tokens=3, do_sample=False)  # warm
    copies.clear()
    computes.clear()
    torch.cuda.synchronize()
    origin.record()
    cpu0 = time.perf_counter()
    model.generate(ids, max_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    total_ms = (time.perf_counter() - cpu0) * 1e3
    rows = [("copy", k, (c - cpu0) * 1e3, origin.elapsed_time(s), origin.elapsed_time(e)) for k, c, s, e in copies]
    rows += [("compute", k, (c - cpu0) * 1e3, origin.elapsed_time(s), origin.elapsed_time(e))
             for k, c, s, e in computes]
    rows.sort(key=lambda r: r[3])
    print(f"total {total_ms:.1f} ms for prefill+3 decode steps")
    print(f"{'what':8} {'unit':10} {'cpu ms':>8} {'gpu start':>9} {'gpu end':>8}")
    for row in rows[:200]:
        print(f"{row[0]:8} {row[1]:10} {row[2]:8.2f} {row[3]:9.2f} {row[4]:8.2f}")
    busy = sum(r[4] - r[3] for r in rows if r[0] == "copy")
    span = max(r[4] for r in rows) - min(r[3] for r in rows)
    print(f"link busy {busy:.1f} ms of {span:.1f} ms GPU span ({busy / span:.0%}); copies {len(copies)}")


if __name__ == "__main__":
    main()
