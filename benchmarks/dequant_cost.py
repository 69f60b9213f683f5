"""What dequantizing one Llama-2-7B layer costs on the GPU: host-side time per call (the decode loop is
launch-bound, so this adds to every step) and device time per call, for nf4 and int8.

    python benchmarks/dequant_cost.py
"""
from __future__ import annotations

import time

import torch

from tierstore.compression import Codec, Decompressor, compress_unit
from tierstore.units import UnitLayout

HIDDEN, INTER = 4096, 11008
SHAPES = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, HIDDEN), "v": (HIDDEN, HIDDEN), "o": (HIDDEN, HIDDEN),
          "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER), "norm": (HIDDEN,)}


def main() -> None:
    device = torch.device("cuda", 0)
    layout = UnitLayout.pack("layer", {name: (torch.float16, shape) for name, shape in SHAPES.items()})
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
    for view in layout.views(buffer).values():
        view.copy_(torch.randn(view.shape) * 0.02)
    for fmt in ("nf4", "int8"):
        codec = Codec.create(fmt)
        packed_layout, packed_buffer, packed = compress_unit(layout, buffer, set(SHAPES) - {"norm"}, codec, device)
        tensors = packed_layout.views(packed_buffer.to(device))
        unpack = Decompressor(codec, {"layer": packed}, torch.float16, device)
        for _ in range(10):
            unpack.materialize("layer", tensors)
        torch.cuda.synchronize()
        calls = 200
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        host_start = time.perf_counter()
        for _ in range(calls):
            unpack.materialize("layer", tensors)
        host_ms = (time.perf_counter() - host_start) / calls * 1e3
        end.record()
        torch.cuda.synchronize()
        copy_ms = packed_layout.nbytes / 54e9 * 1e3
        print(f"{fmt}: unit {packed_layout.nbytes / 1e6:.1f} MB (fp16 {layout.nbytes / 1e6:.1f} MB), host "
              f"{host_ms:.3f} ms/call, device {start.elapsed_time(end) / calls:.3f} ms/call; copy at 54 GB/s "
              f"{copy_ms:.2f} ms vs fp16 {layout.nbytes / 54e9 * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
