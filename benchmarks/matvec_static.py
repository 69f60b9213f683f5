"""The matrix-vector kernel's tiles compiled for a GPU without one: instructions per element and registers.

ggml_triton._matvec is compiled ahead of time for an H100/H200 (sm_90) by Triton on any machine (no GPU needed:
Triton ships ptxas), for each format and tile (rows a program, elements a row at once, warps). Printed: the PTX
instructions of the kernel's main loop per element per thread (what bounds a kernel that reads so few bytes an
element: an H100 issues about 30 T lane-instructions a second, so reading 4-bit weights at its ~2.8 TB/s allows
about 6 an element), the loop's barriers, and from the cubin the registers (occupancy) and local memory (spills).
A guide for choosing the tile where no GPU is at hand; bench_matvec.py times them.

    python benchmarks/matvec_static.py --formats Q2_K,Q4_0 --tiles 1x2048x4,4x1024x4
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import tierstore  # noqa: F401  (maps the checkout's packages)


def loop_body(ptx: str) -> list[str]:
    """The instructions between the longest backward branch's target and the branch (the kernel's main loop)."""
    lines = [line.strip() for line in ptx.splitlines()]
    labels = {line.split(":")[0]: at for at, line in enumerate(lines) if re.match(r"^\$L__BB\d+_\d+:", line)}
    best: list[str] = []
    for at, line in enumerate(lines):
        target = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if target and labels.get(target.group(1), at) < at:
            body = [x for x in lines[labels[target.group(1)]:at + 1]
                    if x and not x.startswith(("$", "//", "{", "}", "."))]
            best = max(best, body, key=len)
    return best


def compiled(format: str, tile: tuple[int, int, int], tokens: int):
    """The kernel compiled for sm_90 at `tile` (bench_matvec.tile_set), and the elements a thread handles a window."""
    import triton
    from bench_matvec import tile_set
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tierstore import ggml_triton

    with tile_set(tile):
        constants = ggml_triton.matvec_constants(format, tokens)
    signature = {"blocks": "*u8", "x": "*bf16", "out": "*bf16", "row_blocks": "i32", "columns": "i32", "rows": "i32",
                 **{name: "constexpr" for name in constants}}
    kernel = triton.compile(ASTSource(fn=ggml_triton._matvec, signature=signature, constexprs=constants),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": tile[2]})
    return kernel, constants["ROWS"] * constants["BLOCKS"] * constants["ELEMENTS"] / (32 * tile[2])


def resources(cubin: bytes) -> str:
    """cuobjdump's registers, shared and local memory of the kernel."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", usage)
    return "registers {} shared {} B local {} B".format(*found.groups()) if found else "resources unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="Q2_K,Q3_K,Q4_K,Q6_K,Q4_0,Q8_0")
    parser.add_argument("--tiles", default="1x2048x4,2x1024x4,4x1024x4,4x512x4,8x512x8,4x2048x8")
    parser.add_argument("--tokens", default="1,3")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    for format in args.formats.split(","):
        for tile in args.tiles.split(","):
            for tokens in (int(t) for t in args.tokens.split(",")):
                kernel, elements_per_thread = compiled(format, tuple(int(part) for part in tile.split("x")), tokens)
                body = loop_body(kernel.asm["ptx"])
                print(f"{format} {tile} tokens {tokens}: {len(body) / elements_per_thread:.1f} loop instructions an "
                      f"element, {sum('bar.sync' in line for line in body)} barriers a window, "
                      f"{resources(kernel.asm['cubin'])}", flush=True)


if __name__ == "__main__":
    main()
