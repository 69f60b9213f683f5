"""A decode step's GGML matrix multiplied in its blocks (ggml_triton.matvec) against the time its packed bytes take
to be read from device memory, for the kernel's tile shapes.

Each format's Qwen2.5-7B MLP matrices (gate/up: 18944 x 3584, down: 3584 x 18944) as random valid blocks, times one
token: the matrix-vector kernel for each tile (rows a program, elements of a row at once, warps), the matrix
dequantized into bf16 and multiplied (what a step did before), and a bf16 matrix of the same shape multiplied
(cuBLAS reading 2 bytes a weight), each timed as 20 calls in one CUDA graph (no launch time). The bound is the
packed bytes over the device memory's rate (tierstore's probe: a copy within the GPU). Each tile's product is
checked against the dequantized one first.

    python benchmarks/bench_matvec.py --out $OUT          # one GPU, about a minute
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator

from bench_formats import random_blocks

from tierstore import ggml

SHAPES = {"gate": (18944, 3584), "down": (3584, 18944)}
TILES = ((1, 2048, 4), (2, 1024, 4), (4, 1024, 4), (4, 512, 4), (8, 512, 4), (8, 512, 8), (16, 256, 8),
         (4, 2048, 8), (4, 1024, 4, 2), (4, 1024, 4, 3))  # (rows a program, elements of a row at once, warps[, stages])


def timed_s(run, reps: int = 20) -> float:
    """Seconds of one call of `run` on the GPU: `reps` calls captured in one CUDA graph (so that Python's launch
    time, which can pass a small matrix's kernel time, does not count), the median of 5 replays over `reps`."""
    import torch

    run()  # warm-up (and compile)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            run()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def tile_set(tile: tuple[int, ...]) -> Iterator[None]:
    """ggml_triton's matrix-vector tile (rows a program, elements of a row at once, warps[, pipeline stages]) set
    for the block."""
    from tierstore import ggml_triton

    names = ("MATVEC_ROWS", "MATVEC_ELEMENTS", "MATVEC_WARPS", "MATVEC_STAGES")[:len(tile)]
    saved = [getattr(ggml_triton, name) for name in names]
    for name, value in zip(names, tile):
        setattr(ggml_triton, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, saved):
            setattr(ggml_triton, name, value)


def tile_run(format: str, blocks, x, out, tile: tuple[int, ...]):
    """ggml_triton.matvec at `tile`, as a call; None where a row's window would be less than one block."""
    from tierstore import ggml_triton

    if tile[1] < ggml.BLOCKS[format][0]:
        return None

    def run() -> None:
        with tile_set(tile):
            ggml_triton.matvec(format, blocks, x, out)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="Q2_K,Q3_K,Q4_K,Q6_K,Q4_0,Q8_0")
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--tiles", default=",".join("x".join(map(str, tile)) for tile in TILES),
                        help="rows a program x elements a row at once x warps [x pipeline stages], comma-separated")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    import torch

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
            for tile in (tuple(int(part) for part in tile.split("x")) for tile in args.tiles.split(",")):
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
