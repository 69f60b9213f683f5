"""A decode step's GGML matrix multiplied in its blocks (ggml_triton.matvec) against the time its packed bytes take
to be read from device memory, for the kernel's tile shapes.

Each format's Qwen2.5-7B MLP matrices (gate/up: 18944 x 3584, down: 3584 x 18944) as random valid blocks, times one
token: the matrix-vector kernel for each tile (rows a program, elements of a row at once, warps), the matrix
dequantized into bf16 and multiplied (what a step did before), and a bf16 matrix of the same shape multiplied
(cuBLAS reading 2 bytes a weight), each timed as 20 calls in one CUDA graph (no launch time). The bound is the
packed bytes over the device memory's rate (tierstore's probe: a copy within the GPU). Each tile's product is
checked against the dequantized one first.

    python benchmarks/bench_matvec.py --out $OUT          # one GPU, about a minute

`--kernels values,dots` times ggml_dots' kernel (Q4_K and Q2_K summed by sub-block) beside today's at each tile.

`--experts` times the grouped kernel a decode step's MoE layer launches instead (ggml_triton.matvec_grouped with
byte offsets: 8 routed experts of the Qwen3-30B-A3B shape, gate_up 1536 x 2048 and down 2048 x 768, read where
they lie among 128 experts, each of the graph's calls routed to other experts so that the L2 holds none of them),
against the same bound: the routed experts' packed bytes over the device memory's rate.

    python benchmarks/bench_matvec.py --out $OUT --experts --formats Q4_K
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from collections.abc import Iterator

from bench_formats import random_blocks

from tierstore import ggml

SHAPES = {"gate": (18944, 3584), "down": (3584, 18944)}
EXPERT_SHAPES = {"gate_up": (1536, 2048), "down": (2048, 768)}  # Qwen3-30B-A3B's experts, (rows, columns)
EXPERTS, ROUTED = 128, 8
EXPERT_TILES = tuple((rows, elements, warps) for rows in (2, 4, 8, 16) for elements in (512, 1024, 2048)
                     for warps in (2, 4, 8)) + ((4, 1024, 4, 2), (8, 1024, 4, 2), (8, 2048, 8, 2))
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
def tile_set(tile: tuple[int, ...], kernel: str = "values") -> Iterator[None]:
    """`kernel`'s matrix-vector tile (rows a program, elements of a row at once, warps[, pipeline stages: values
    only]) set for the block."""
    from tierstore import ggml_dots, ggml_triton

    if kernel == "dots":
        saved_tile, ggml_dots.TILE = ggml_dots.TILE, tuple(tile[:3])
        try:
            yield
        finally:
            ggml_dots.TILE = saved_tile
        return
    names = ("MATVEC_ROWS", "MATVEC_ELEMENTS", "MATVEC_WARPS", "MATVEC_STAGES")[:len(tile)]
    saved = [getattr(ggml_triton, name) for name in names]
    for name, value in zip(names, tile):
        setattr(ggml_triton, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, saved):
            setattr(ggml_triton, name, value)


def at_tile(format: str, tile: tuple[int, ...], call, kernel: str = "values"):
    """`call` run with `kernel`'s tile set to `tile`, as a call; None where a row's window would be less than
    one of `format`'s blocks."""
    if tile[1] < ggml.BLOCKS[format][0]:
        return None

    def run() -> None:
        with tile_set(tile, kernel):
            call()
    return run


def kernels(name: str):
    """The module of the matrix-vector kernel `name`: values (ggml_triton: each weight's value, then its product)
    or dots (ggml_dots: codes times inputs summed by sub-block, then scaled)."""
    from tierstore import ggml_dots, ggml_triton

    return {"values": ggml_triton, "dots": ggml_dots}[name]


def tile_run(format: str, blocks, x, out, tile: tuple[int, ...], kernel: str = "values"):
    """`kernel`'s matvec at `tile`, as a call (None: see at_tile)."""
    return at_tile(format, tile, lambda: kernels(kernel).matvec(format, blocks, x, out), kernel)


def grouped_run(format: str, pool, x, out, offsets, tile: tuple[int, ...], align: int, kernel: str = "values"):
    """`kernel`'s matvec_grouped over `pool` at each of `offsets`' rows in turn (one call each), at `tile`
    (None: see at_tile)."""
    def calls() -> None:
        for at in offsets:
            kernels(kernel).matvec_grouped(format, pool, x, out, at, align)
    return at_tile(format, tile, calls, kernel)


def tile_kernels(args, format: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (kernel, tile) pairs to time for `format`: each of args.kernels that has the format, at each tile."""
    from tierstore import ggml_dots

    return [(kernel, tile) for kernel in args.kernels.split(",") for tile in args.tiles
            if kernel == "values" or format in ggml_dots.DOTS]


def label(kernel: str, tile: tuple[int, ...]) -> str:
    return ("" if kernel == "values" else kernel + " ") + "x".join(map(str, tile))


def experts_rows(args, rate: float, device) -> list[dict]:
    """The grouped kernel at each tile for each format and expert matrix: seconds a call against its bound."""
    import torch

    from tierstore import ggml_triton

    now_tile = (ggml_triton.MATVEC_ROWS, ggml_triton.MATVEC_ELEMENTS, ggml_triton.MATVEC_WARPS)
    rows_out = []
    calls = 20
    for format in args.formats.split(","):
        for name, (rows, columns) in EXPERT_SHAPES.items():
            nbytes = rows * columns // ggml.BLOCKS[format][0] * ggml.BLOCKS[format][1]
            pool = random_blocks(format, EXPERTS * rows * columns, device, seed=1)
            gen = torch.Generator().manual_seed(0)
            routed = [torch.randperm(EXPERTS, generator=gen)[:ROUTED] for _ in range(calls)]
            offsets = [(experts * nbytes).to(device) for experts in routed]
            x = torch.randn(ROUTED, columns, dtype=torch.bfloat16, device=device)
            dense = torch.empty(EXPERTS, rows, columns, dtype=torch.bfloat16, device=device)
            ggml.dequantize(format, pool, dense.view(-1))
            want = torch.einsum("gc,grc->gr", x.float(), dense[routed[0].to(device)].float())
            bound_s = ROUTED * nbytes / (rate * 1e9)
            row = {"format": format, "matrix": name, "packed_bytes": ROUTED * nbytes, "bound_s": bound_s, "tiles": {}}
            align = math.gcd(16, nbytes)  # each expert's first byte, as the runner passes it
            for kernel, tile in tile_kernels(args, format):
                out = torch.empty(ROUTED, rows, dtype=torch.bfloat16, device=device)
                check = grouped_run(format, pool, x, out, offsets[:1], tile, align, kernel)
                if check is None:
                    continue
                check()
                error = ((out.float() - want).abs().max() / want.abs().max()).item()
                run = grouped_run(format, pool, x, out, offsets, tile, align, kernel)
                row["tiles"][label(kernel, tile)] = {"s": timed_s(run, reps=1) / calls, "relative_error": error}
            rows_out.append(row)
            ranked = sorted(row["tiles"].items(), key=lambda item: item[1]["s"])
            default = "x".join(map(str, now_tile))
            now = row["tiles"].get(default)
            print(f"{format} experts' {name}, {ROUTED} of {EXPERTS} x {nbytes / 1e6:.2f} MB: "
                  f"bound {bound_s * 1e6:.1f} us; "
                  + (f"today's tile {default} {now['s'] * 1e6:.1f} us ({now['s'] / bound_s:.2f}x); " if now else "")
                  + "fastest: " + ", ".join(f"{tile} {t['s'] * 1e6:.1f} us ({t['s'] / bound_s:.2f}x, err "
                                            f"{t['relative_error']:.1e})" for tile, t in ranked[:6]), flush=True)
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="Q2_K,Q3_K,Q4_K,Q6_K,Q4_0,Q8_0")
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--tiles", default=None,
                        help="rows a program x elements a row at once x warps [x pipeline stages], comma-separated")
    parser.add_argument("--experts", action="store_true", help="the grouped kernel of an MoE decode step instead")
    parser.add_argument("--kernels", default="values",
                        help="values (ggml_triton), dots (ggml_dots: Q4_K and Q2_K), or both, comma-separated")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    unknown = sorted(set(args.kernels.split(",")) - {"values", "dots"})
    if unknown:
        parser.error(f"--kernels: {', '.join(unknown)} is not a kernel; choose from values, dots")
    args.tiles = [tuple(int(part) for part in tile.split("x")) for tile in args.tiles.split(",")] if args.tiles \
        else list(EXPERT_TILES if args.experts else TILES)
    import torch

    from tierstore.probe import hbm_gbps

    device = torch.device("cuda")
    rate = hbm_gbps(device)
    print(f"device memory {rate:.0f} GB/s (copy within the GPU); {torch.cuda.get_device_name()}", flush=True)
    results = {"hbm_gbps": rate, "device": torch.cuda.get_device_name(), "rows": []}
    if args.experts:
        results["rows"] = experts_rows(args, rate, device)
        with open(os.path.join(args.out, "matvec_experts.json"), "w") as handle:
            json.dump(results, handle, indent=1)
        return
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
            for kernel, tile in tile_kernels(args, format):
                out = torch.empty(args.tokens, rows, dtype=torch.bfloat16, device=device)
                run = tile_run(format, blocks, x, out, tile, kernel)
                if run is None:
                    continue
                run()
                error = ((out.float() - want).abs().max() / want.abs().max()).item()
                row["tiles"][label(kernel, tile)] = {"s": timed_s(run), "relative_error": error}
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
