"""What writing a compressed store costs a unit: one Qwen3-30B-A3B expert (gate and up 768 x 2048, down 2048 x 768,
bf16: 9.4 MB, the unit an MoE store writes 6,144 of) or one 7B-shaped MLP matrix, compressed by `compress_unit` as
`compress` and `write_store` do, in each format, on the CPU or a GPU. Prints seconds a unit, MB of bf16 read a
second, the operators (CPU) or kernels (GPU) a unit launches, and each format's time against nf4's (bitsandbytes,
one kernel a matrix) in the same run.

    python benchmarks/compress_rate.py --device cuda --formats q4_k,q2_k,q3_k,q5_k,q6_k,nf4
    python benchmarks/compress_rate.py --device cpu --unit dense
    python benchmarks/compress_rate.py --device cpu --as-gpu      # the CPU searching as a GPU does: its kernel count
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import tierstore  # noqa: F401  (maps the checkout's packages)
from tierstore import ggml_quantize
from tierstore.compression import Codec, compress_unit
from tierstore.errors import ConfigError
from tierstore.units import UnitLayout

UNITS = {"expert": {"gate_proj": (768, 2048), "up_proj": (768, 2048), "down_proj": (2048, 768)},
         "dense": {"down_proj": (3584, 18944)}}
# operators that move no data (views, allocation): not kernels
_NO_KERNEL = ("aten::to", "aten::_to_copy", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::view",
              "aten::reshape", "aten::unsqueeze", "aten::slice", "aten::select", "aten::as_strided", "aten::expand",
              "aten::_unsafe_view", "aten::lift_fresh", "aten::detach_", "aten::alias", "aten::resolve_conj",
              "aten::resolve_neg", "aten::split", "aten::unbind", "aten::narrow", "aten::t", "aten::transpose")


def unit(shapes: dict[str, tuple[int, int]]) -> tuple[UnitLayout, torch.Tensor]:
    layout = UnitLayout.pack("unit", {name: (torch.bfloat16, shape) for name, shape in shapes.items()})
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
    torch.manual_seed(0)
    for view in layout.views(buffer).values():
        view.copy_(torch.randn(view.shape) * 0.02)
    return layout, buffer


def kernels(run, device: torch.device) -> int:
    """Kernels one call of `run` launches: CUDA kernels on a GPU, operators that touch data on the CPU."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for event in events if event.device_type == torch.autograd.DeviceType.CUDA)
    leaves = [event for event in events if event.name.startswith("aten::") and event.name not in _NO_KERNEL
              and not any(child.name.startswith("aten::") for child in event.cpu_children)]
    return len(leaves)


def seconds(run, device: torch.device, repeats: int) -> float:
    run()  # warm: compiled kernels, allocator
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--unit", choices=sorted(UNITS), default="expert")
    parser.add_argument("--formats", default="q4_k,q2_k,q3_k,q5_k,q6_k,q8_0,nf4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--as-gpu", action="store_true",
                        help="search with a GPU's grids at once and chunks of rows (on a CPU: what a GPU launches)")
    args = parser.parse_args()
    if args.as_gpu:
        ggml_quantize.GRIDS_AT_ONCE = (ggml_quantize.GRIDS_AT_ONCE[1],) * 2
        ggml_quantize.GRID_ELEMENTS = (ggml_quantize.GRID_ELEMENTS[1],) * 2
        ggml_quantize.CPU_CHUNK_ELEMENTS = ggml_quantize.CHUNK_ELEMENTS
    try:
        codecs = {name: Codec.create(name) for name in args.formats.split(",")}
    except ConfigError as exc:
        parser.error(str(exc))
    device = torch.device(args.device)
    layout, buffer = unit(UNITS[args.unit])
    matrices = set(UNITS[args.unit])
    rows = {}
    for name, codec in codecs.items():

        def run(codec=codec):
            compress_unit(layout, buffer, matrices, codec, device)
        rows[name] = (seconds(run, device, args.repeats), kernels(run, device))
    print(f"unit: {args.unit} ({layout.nbytes / 1e6:.1f} MB of bf16), device: "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"threads {torch.get_num_threads()}{', searching as a GPU does' if args.as_gpu else ''}")
    print("| format | s a unit | MB/s | kernels a unit (CPU: operators) | x nf4 |")
    print("|---|---|---|---|---|")
    baseline = rows.get("nf4", (None,))[0]
    for name, (took, launched) in rows.items():
        ratio = f"{took / baseline:.2f}" if baseline else "-"
        print(f"| {name} | {took:.4f} | {layout.nbytes / took / 1e6:.0f} | {launched} | {ratio} |")


if __name__ == "__main__":
    main()
