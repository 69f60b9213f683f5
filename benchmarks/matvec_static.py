"""The matrix-vector kernel's tiles compiled for a GPU without one: instructions per element and registers.

ggml_triton._matvec is compiled ahead of time for an H100/H200 (sm_90) by Triton on any machine (no GPU needed:
Triton ships ptxas and cuobjdump), for each format and tile (rows a program, elements a row at once, warps), on
Qwen2.5-7B's gate matrix (18944 x 3584) with the divisibility a launch on it specialises for. Printed: the machine
(SASS) instructions of the kernel's main loop per element a thread handles (what bounds a kernel that reads so few
bytes an element: an H100 issues about 33 T lane-instructions a second, so reading 4-bit weights at its ~3 TB/s
allows about 5 an element), their kinds, the loop's barriers, and from the cubin the registers (occupancy) and
local memory (spills). A guide for choosing the tile where no GPU is at hand; bench_matvec.py times them.

    python benchmarks/matvec_static.py --formats Q2_K,Q4_0 --tiles 1x2048x4,4x1024x4
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import tierstore  # noqa: F401  (maps the checkout's packages)

ROWS, COLUMNS = 18944, 3584  # the 7B gate matrix (--columns: another row length)


def loop_body(sass: str) -> list[str]:
    """The instructions from the longest backward branch's target to the branch (the kernel's main loop)."""
    code = [(int(found.group(1), 16), found.group(2).strip())
            for found in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    best: list[str] = []
    for address, text in code:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            body = [line for at, line in code if int(target.group(1), 16) <= at <= address]
            best = max(best, body, key=len)
    return best


def opcode(line: str) -> str:
    """An instruction's operation without its predicate and modifiers (`@!P0 LDG.E.U8` -> LDG)."""
    words = line.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def compiled(format: str, tile: tuple[int, ...], kernel: str = "values", columns: int = COLUMNS):
    """`kernel`'s matrix-vector kernel (values: ggml_triton._matvec, dots: ggml_dots') compiled for sm_90 at `tile`
    (bench_matvec.tile_set) on the gate matrix's rows, `columns` long, and the elements a thread handles a
    window."""
    import triton
    from bench_matvec import tile_set
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tierstore import ggml, ggml_dots, ggml_triton

    with tile_set(tile, kernel):
        tiled = (ggml_dots.constants if kernel == "dots" else ggml_triton.matvec_constants)(format, columns)
    constants = {**tiled, "tokens": 1, "OFFSETS": False, "ALIGN": 1}  # a launch specialises tokens = 1
    signature = {"blocks": "*u8", "x": "*bf16", "out": "*bf16", "offsets": "*u8", "row_blocks": "i32",
                 "columns": "i32", "rows": "i32", "group_rows": "i32", **{name: "constexpr" for name in constants}}
    values = {"row_blocks": columns // ggml.BLOCKS[format][0], "columns": columns, "rows": ROWS, "group_rows": ROWS}
    divisible = [0, 1, 2, 3] + [4 + at for at, value in enumerate(values.values()) if value % 16 == 0]
    attrs = {(at,): [["tt.divisibility", 16]] for at in divisible}  # as a launch specialises (16-byte pointers)
    binary = triton.compile(ASTSource(fn=ggml_dots._matvec_dots if kernel == "dots" else ggml_triton._matvec,
                                      signature=signature, constexprs=constants, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": tile[2]})
    return binary, constants["ROWS"] * constants["BLOCKS"] * ggml.BLOCKS[format][0] / (32 * tile[2])


def cuobjdump(cubin: bytes, flag: str) -> str:
    """Triton's cuobjdump's output for the cubin with `flag` (-sass, -res-usage)."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return subprocess.run([tool, flag, handle.name], capture_output=True, text=True).stdout


def resources(cubin: bytes) -> str:
    """The kernel's registers, shared and local memory."""
    found = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", cuobjdump(cubin, "-res-usage"))
    return "registers {} shared {} B local {} B".format(*found.groups()) if found else "resources unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="Q2_K,Q3_K,Q4_K,Q6_K,Q4_0,Q8_0")
    parser.add_argument("--tiles", default="1x2048x4,2x1024x4,4x1024x4,4x512x4,8x512x8,4x2048x8")
    parser.add_argument("--kernel", default="values", choices=["values", "dots"],
                        help="values: ggml_triton's; dots: ggml_dots' (Q4_K, Q2_K: sums by sub-block)")
    parser.add_argument("--columns", type=int, default=COLUMNS, help="a row's elements (2048: Qwen3-30B-A3B's "
                        "experts' gate_up; the window is the largest power of two of blocks dividing a row)")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    for format in args.formats.split(","):
        for tile in args.tiles.split(","):  # a program multiplies one token (more tokens: more programs)
            kernel, elements_per_thread = compiled(format, tuple(int(part) for part in tile.split("x")), args.kernel,
                                                   args.columns)
            body = loop_body(cuobjdump(kernel.asm["cubin"], "-sass"))
            kinds = collections.Counter(opcode(line) for line in body).most_common(6)
            print(f"{format} {tile}: {len(body) / elements_per_thread:.1f} loop instructions an element "
                  f"({', '.join(f'{name} {count / elements_per_thread:.1f}' for name, count in kinds)}), "
                  f"{sum(opcode(line) == 'BAR' for line in body)} barriers a window, "
                  f"{resources(kernel.asm['cubin'])}", flush=True)


if __name__ == "__main__":
    main()
