"""A decode step's GGML matrix multiplied in its blocks (ggml_triton.matvec) against the time its packed bytes take
to be read from device memory, for the kernel's tile shapes.

Each format's Qwen2.5-7B MLP matrices (gate/up: 18944 x 3584, down: 3584 x 18944) as random valid blocks, times one
token: the matrix-vector kernel for each tile (rows a program, elements of a row at once, warps), the matrix
dequantized into bf16 and multiplied (what a step did before), and a bf16 matrix of the same shape multiplied
(cuBLAS reading 2 bytes a weight). The bound is the packed bytes over the device memory's rate (tierstore's probe:
a copy within the GPU). Each tile's product is checked against the dequantized one first.

    python benchmarks/bench_matvec.py --out $OUT          # one GPU, about a minute
"""
from __future__ import annotations

import argparse
import json
import os

from bench_formats import random_blocks

SHAPES = {"gate": (18944, 3584), "down": (3584, 18944)}
TILES = ((1, 2048, 4), (2, 1024, 4), (4, 1024, 4), (4, 512, 4), (8, 512, 4), (8, 512, 8), (16, 256, 8),
         (4, 2048, 8))  # (rows a program, elements of a row at once, warps)


def timed_s(run, reps: int = 50) -> float:
    """Median seconds of one call of `run` on the GPU (CUDA events), after a warm-up call."""
    import torch

    run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def tile_run(format: str, blocks, x, out, tile: tuple[int, int, int]):
    """The matrix-vector kernel at `tile`, as a call."""
    import triton

    from tierstore import ggml_triton

    rows_each, elements_each, warps = tile
    values, nbytes = ggml_triton.MATVEC_VALUES[format]
    elements = 256 if format in ggml_triton.VALUES else 32
    rows, columns = out.shape[1], x.shape[1]
    if elements_each < elements:
        return None
    grid = (triton.cdiv(rows, rows_each),)

    def run() -> None:
        ggml_triton._matvec[grid](blocks, x, out, columns // elements, columns, rows, VALUES=values, BYTES=nbytes,
                                  ELEMENTS=elements, TOKENS=x.shape[0], TOKENS_POW2=triton.next_power_of_2(x.shape[0]),
                                  BLOCKS=elements_each // elements, ROWS=rows_each, num_warps=warps)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="Q2_K,Q3_K,Q4_K,Q6_K,Q4_0,Q8_0")
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    import torch

    from tierstore import ggml
    from tierstore.probe import hbm_gbps

    device = torch.device("cuda")
    rate = hbm_gbps(device)
    print(f"device memory {rate:.0f} GB/s (copy within the GPU); {torch.cuda.get_device_name()}", flush=True)
    results = {"hbm_gbps": rate, "device": torch.cuda.get_device_name(), "rows": []}
    for format in args.formats.split(","):
        for name, (rows, columns) in SHAPES.items():
            blocks = random_blocks(format, rows * columns, device, seed=1).view(-1, ggml.BLOCKS[format][1])
            x = torch.randn(args.tokens, columns, dtype=torch.bfloat16, device=device)
            dense = torch.empty(rows, columns, dtype=torch.bfloat16, device=device)
            ggml.dequantize(format, blocks.reshape(-1), dense.view(-1))
            want = (x.float() @ dense.float().T)
            bound_s = blocks.numel() / (rate * 1e9)
            row = {"format": format, "matrix": name, "packed_bytes": blocks.numel(), "bound_s": bound_s,
                   "dequantize_multiply_s": timed_s(lambda: (ggml.dequantize(format, blocks.reshape(-1),
                                                                             dense.view(-1)), x @ dense.T)),
                   "bf16_multiply_s": timed_s(lambda: x @ dense.T), "tiles": {}}
            for tile in TILES:
                out = torch.empty(args.tokens, rows, dtype=torch.bfloat16, device=device)
                run = tile_run(format, blocks, x, out, tile)
                if run is None:
                    continue
                run()
                error = ((out.float() - want).abs().max() / want.abs().max()).item()
                row["tiles"]["x".join(map(str, tile))] = {"s": timed_s(run), "relative_error": error}
            results["rows"].append(row)
            best = min(row["tiles"].items(), key=lambda item: item[1]["s"])
            print(f"{format} {name} {blocks.numel() / 1e6:.1f} MB: bound {bound_s * 1e6:.1f} us, dequantize+multiply "
                  f"{row['dequantize_multiply_s'] * 1e6:.1f} us, bf16 multiply {row['bf16_multiply_s'] * 1e6:.1f} us; "
                  + ", ".join(f"{tile} {t['s'] * 1e6:.1f} us ({t['s'] / bound_s:.2f}x, err {t['relative_error']:.1e})"
                              for tile, t in row["tiles"].items())
                  + f"; best {best[0]}", flush=True)
    with open(os.path.join(args.out, "matvec_results.json"), "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
