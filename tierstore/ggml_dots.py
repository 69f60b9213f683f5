"""The matrix-vector product of Q4_K and Q2_K matrices summed by sub-block: codes times inputs, scaled once.

ggml_triton._matvec makes each element's value (step times code less offset) and multiplies it by its input:
compiled for an H100 that is 9.5 instructions an element for Q4_K, 11.6 for Q2_K (benchmarks/matvec_static.py),
and it runs at 3-4x the time of its bytes. A k-quant's sub-block shares one step d and one offset m, so its part of
a row's sum is

    sum_e (d q_e - m) x_e  =  d sum_e q_e x_e  -  m sum_e x_e

Here the codes are read in 32-bit words (8 codes of Q4_K, 16 of Q2_K). Each code is masked where it lies in its
word (bytes 2 and 3 after one shift a word) and put in the mantissa of 2**23 (one AND-OR, less 2**23: an add), which
makes it times a power of two exactly; its input carries the inverse power. Products are summed by word; each
word's sums are scaled by its sub-block's step and offset once a window, and summed across threads once, at the end.
The products are the reference's to float32 summation error (the order of the sum differs from _matvec's).

Status: an experiment, not used by any model (`ggml.MATVEC_KERNEL = "dots"` puts it in a model's decode steps for
the benchmarks to compare). Timed on an H100 (`bench_matvec.py --kernels values,dots`, RESULTS.md): at TILE it is
1.16x faster than _matvec for 7B-shaped Q4_K matrices, as fast for the experts' Q4_K down, and slower for Q2_K and
the experts' gate_up; a 7B Q4_K pass at vram 4 GB ran no faster with it (bound by the link). The tiles that compile
to the fewest instructions an element (`matvec_static.py --kernel dots`: 7.3 for Q4_K at 16x1024x4) ran slowest.

Its words need 4-byte alignment (`takes`): a row's blocks (144 and 84 bytes) keep it wherever the matrix starts
4-byte aligned.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ggml_triton import _add, _half, _k_scales, _launch, matvec_constants

# (rows a program, elements of a row at once, warps): the fastest on an H100 for 7B-shaped Q4_K rows and the experts'
# down matrices (benchmarks/bench_matvec.py --kernels dots; 16x1024x4 compiles to fewer instructions an element but
# ran 1.2-2x slower)
TILE = (4, 1024, 4)


@triton.jit
def _words(base, offset, WORDS: tl.constexpr):
    """WORDS 32-bit words [.., .., WORDS] from bytes `base + offset` (a multiple of 4 from 4-byte aligned blocks)."""
    return tl.load((base + offset).to(tl.pointer_type(tl.int32)) + tl.arange(0, WORDS)[None, None, :])


@triton.jit
def _code(words, at: tl.constexpr, mask: tl.constexpr):
    """The codes at bits `at` of `words` (masked by `mask`, at + their bits <= 23) times 2**at as float32, exactly:
    put in the mantissa of 2**23 in place (one AND-OR) less 2**23 (an add). The caller's inputs carry 2**-at."""
    return ((words & (mask << at)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _q4_k_dots(blocks, first, x, BLOCKS: tl.constexpr):
    """Rows' sums over BLOCKS Q4_K blocks by word [ROWS, BLOCKS * 4, 8] from the rows' first blocks' indices
    `first` [ROWS] in `blocks` (bytes) and the inputs `x` at the window's first element. A block's 128 code bytes
    are 4 runs of 32: run j holds sub-block 2j in its low nibbles and 2j + 1 in its high ones, element e in byte e."""
    pair = tl.arange(0, BLOCKS * 4)[None, :, None]  # (block, run j)
    run = pair % 4
    base = blocks + (first[:, None, None] + pair // 4) * 144
    words = _words(base, 16 + 32 * run, 8)  # 4 elements a word, in sub-blocks 2j (low) and 2j + 1 (high)
    upper = words >> 16  # bytes 2 and 3 where bytes 0 and 1 were (the sign's bits are masked off)
    column = (pair // 4) * 256 + 64 * run + 4 * tl.arange(0, 8)[None, None, :]  # each word's first in 2j
    low = tl.full(words.shape, 0.0, tl.float32)
    high = tl.full(words.shape, 0.0, tl.float32)
    low_x = tl.full(column.shape, 0.0, tl.float32)
    high_x = tl.full(column.shape, 0.0, tl.float32)
    for byte in tl.static_range(4):
        at = 8 * (byte % 2)
        x_low = tl.load(x + column + byte).to(tl.float32)
        x_high = tl.load(x + column + 32 + byte).to(tl.float32)
        low += _code(words if byte < 2 else upper, at, 0x0F) * (x_low * (1.0 / (1 << at)))
        high += _code(words if byte < 2 else upper, at + 4, 0x0F) * (x_high * (1.0 / (1 << (at + 4))))
        low_x += x_low
        high_x += x_high
    d_low, m_low = _k_scales(base, 2 * run)
    d_high, m_high = _k_scales(base, 2 * run + 1)
    return d_low * low - m_low * low_x + d_high * high - m_high * high_x


@triton.jit
def _q2_k_dots(blocks, first, x, BLOCKS: tl.constexpr):
    """Rows' sums over BLOCKS Q2_K blocks by word [ROWS, BLOCKS * 4, 4]. A block's 64 code bytes are 2 halves of
    32; byte i of half h holds element i % 16 of sub-blocks 8h + 2k + i // 16 in its bit pairs k = 0..3. Run (h, p)
    is the half's bytes 16p..16p+15, 4 words; its sub-blocks are 8h + 2k + p."""
    run = tl.arange(0, BLOCKS * 4)[None, :, None]  # (block, half h, p)
    half, p = (run % 4) // 2, run % 2
    base = blocks + (first[:, None, None] + run // 4) * 84
    words = _words(base, 16 + 32 * half + 16 * p, 4)  # 4 elements a word, 4 bit pairs each
    upper = words >> 16
    column = (run // 4) * 256 + 128 * half + 16 * p + 4 * tl.arange(0, 4)[None, None, :]  # first in sub 8h + p
    d, dmin = _half(base, 80), _half(base, 82)
    sums = tl.full(words.shape, 0.0, tl.float32)
    for k in tl.static_range(4):
        products = tl.full(words.shape, 0.0, tl.float32)
        inputs = tl.full(column.shape, 0.0, tl.float32)
        for byte in tl.static_range(4):
            at = 8 * (byte % 2) + 2 * k
            x_k = tl.load(x + column + 32 * k + byte).to(tl.float32)
            products += _code(words if byte < 2 else upper, at, 3) * (x_k * (1.0 / (1 << at)))
            inputs += x_k
        scale = tl.load(base + 8 * half + 2 * k + p).to(tl.int32)
        sums += d * (scale & 0x0F).to(tl.float32) * products - dmin * (scale >> 4).to(tl.float32) * inputs
    return sums


@triton.jit
def _matvec_dots(blocks, x, out, offsets, row_blocks, columns, rows, group_rows, tokens, OFFSETS: tl.constexpr,
                 ALIGN: tl.constexpr, DOTS: tl.constexpr, BLOCKS: tl.constexpr, ROWS: tl.constexpr,
                 WORDS: tl.constexpr):
    """ggml_triton._matvec's contract (rows, tokens, groups, offsets) with the sums made by the format's DOTS:
    ROWS rows a program, BLOCKS blocks of each at a time, the rows sharing each load of the inputs."""
    program = tl.program_id(0).to(tl.int64)
    token, first_row = program % tokens, program // tokens * ROWS
    group = first_row // group_rows
    x += (token + group) * columns
    row = tl.minimum(first_row + tl.arange(0, ROWS).to(tl.int64), rows - 1)
    if OFFSETS:  # rows counted within the group, from where its matrix lies
        blocks += tl.multiple_of(tl.load(offsets + group), ALIGN)
        row -= group * group_rows
    sums = tl.full([ROWS, BLOCKS * 4, WORDS], 0.0, tl.float32)  # by word: summed across threads once, at the end
    for start in range(0, row_blocks, BLOCKS):
        sums += DOTS(blocks, row * row_blocks + start, x + start * 256, BLOCKS)
    rows_here = first_row + tl.arange(0, ROWS).to(tl.int64)
    tl.store(out + token * rows + rows_here, tl.reduce(tl.reduce(sums, 2, _add), 1, _add).to(out.dtype.element_ty),
             mask=rows_here < rows)


DOTS = {"Q4_K": (_q4_k_dots, 8), "Q2_K": (_q2_k_dots, 4)}  # each format's sums over a window, words a run


def takes(format: str, blocks: torch.Tensor, offsets_align: int | None = None) -> bool:
    """Whether this kernel multiplies `format`'s `blocks`: a format it has sums for, its words 4-byte aligned
    (the blocks' first byte, and each offset of a grouped call read where its matrices lie: `offsets_align`)."""
    return format in DOTS and blocks.data_ptr() % 4 == 0 and (offsets_align is None or offsets_align % 4 == 0)


def matvec(format: str, blocks: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
    """ggml_triton.matvec's product by this kernel (where `takes`)."""
    _launch(format, blocks, x, out, tokens=x.shape[0], rows=out.shape[1], group_rows=out.shape[1],
            kernel=_matvec_dots, constants=constants(format, x.shape[1]), warps=TILE[2])


def matvec_grouped(format: str, blocks: torch.Tensor, x: torch.Tensor, out: torch.Tensor,
                   offsets: torch.Tensor | None = None, offsets_align: int = 1) -> None:
    """ggml_triton.matvec_grouped's products by this kernel (where `takes`)."""
    groups, rows = out.shape
    _launch(format, blocks, x, out, tokens=1, rows=groups * rows, group_rows=rows, offsets=offsets,
            offsets_align=offsets_align, kernel=_matvec_dots, constants=constants(format, x.shape[1]),
            warps=TILE[2])


def constants(format: str, columns: int) -> dict:
    """The kernel's compile-time arguments at TILE (rows a program, blocks a row at once)."""
    tile = matvec_constants(format, columns, TILE[:2])
    dots, words = DOTS[format]
    return {"DOTS": dots, "BLOCKS": tile["BLOCKS"], "ROWS": tile["ROWS"], "WORDS": words}
