"""The k-quants (Q2_K to Q6_K) dequantized on a GPU by Triton kernels written for their block layout.

torch.compile turns ggml.py's steps into one kernel that decodes a sub-block's packed 6-bit scale again for every
element it scales, and reads the block bytes one at a time: on an H200 it dequantized a 7B layer of Q4_K in
0.97 ms, 4× Q4_0 over the same bytes (benchmarks/RESULTS.md). These kernels hold each program's blocks as a tile
[blocks, sub-blocks, elements]: each sub-block's scale is decoded once and broadcast, and the codes are read as
runs of contiguous bytes. The arithmetic is ggml.py's (the `gguf` package's reference) operation for operation in
float32, then one cast to the output dtype.

The same values feed a matrix-vector kernel (`matvec`, for a decode step's few tokens): each program walks
MATVEC_ROWS rows' blocks and sums their values times the inputs in float32 (the rows share each load of the
inputs), so the matrix is read in its packed bytes and never written out (tile sizes: benchmarks/bench_matvec.py).
It also takes the legacy formats (Q4_0 ... Q8_0, 32-element blocks).

Importing this module imports Triton (ggml.py does so only on a GPU, where torch's CUDA builds ship it);
`TRITON_INTERPRET=1` runs the kernels on the CPU (tests/test_ggml_triton.py checks every format there against the
reference dequantizers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FORMATS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
BLOCKS_PER_PROGRAM = 8  # 2048 elements a program
MATVEC_ELEMENTS = 1024  # elements of each row a matrix-vector program reads at once
MATVEC_ROWS = 4  # rows a matrix-vector program multiplies, sharing each load of the inputs (matvec_static.py)
MATVEC_WARPS = 4
MATVEC_STAGES = 1  # windows in flight a program (Triton's software pipelining; 1: none)


def dequantize(format: str, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Fill `out` ([blocks, 256], any float dtype) with the elements of `format`'s uint8 `blocks` [blocks, bytes]
    (both contiguous, on one device). Multiplies and adds stay apart (no fused multiply-add), so that the values
    are the reference's bits."""
    count = blocks.shape[0]
    if count:
        values, nbytes, _ = VALUES[format]
        grid = (triton.cdiv(count, BLOCKS_PER_PROGRAM),)
        _dequantize[grid](blocks, out, count, VALUES=values, BYTES=nbytes, BLOCKS=BLOCKS_PER_PROGRAM,
                          enable_fp_fusion=False)


def matvec(format: str, blocks: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
    """out [tokens, rows] = x [tokens, columns] times the transposed matrix [rows, columns] that `format`'s uint8
    `blocks` [rows * columns / block elements, bytes] hold (a k-quant or a legacy format: MATVEC_VALUES; a GGUF
    matrix's rows are whole blocks), without writing the dequantized matrix anywhere: decoding reads each weight's
    packed bits once. Sums in float32 (the values are the reference's, exactly); x and out contiguous, a few tokens
    (each token's programs read the matrix again, next to each other in the launch so that they share the L2)."""
    _launch(format, blocks, x, out, tokens=x.shape[0], rows=out.shape[1], group_rows=out.shape[1])


def matvec_grouped(format: str, blocks: torch.Tensor, x: torch.Tensor, out: torch.Tensor,
                   offsets: torch.Tensor | None = None, offsets_align: int = 1) -> None:
    """out [groups, rows] = each group's matrix [rows, columns] times its own input x [groups, columns], one launch
    for all of them: `blocks` holds the groups' matrices back to back (experts gathered), or with `offsets` (int64
    [groups], on the device) group g's matrix starts `offsets[g]` bytes into `blocks` (experts read where they lie:
    in their slots, or in mapped host RAM, with nothing gathered); every offset a multiple of `offsets_align` (a
    power of two: what the compiler may assume to read wider words)."""
    groups, rows = out.shape
    _launch(format, blocks, x, out, tokens=1, rows=groups * rows, group_rows=rows, offsets=offsets,
            offsets_align=offsets_align)


def _launch(format: str, blocks: torch.Tensor, x: torch.Tensor, out: torch.Tensor, tokens: int, rows: int,
            group_rows: int, offsets: torch.Tensor | None = None, offsets_align: int = 1, kernel=None,
            constants: dict | None = None, warps: int | None = None) -> None:
    """`kernel` (_matvec, or another of its arguments, `constants` and `warps`: ggml_dots) over `rows` rows times
    `tokens` tokens, each `group_rows` rows with inputs of their own (a program's rows kept within one group), on
    one axis of programs with the tokens fastest (CUDA's second axis stops at 65,535 programs)."""
    columns = x.shape[1]
    constants = dict(constants or matvec_constants(format, columns))
    if group_rows != rows:
        constants["ROWS"] = min(constants["ROWS"], group_rows & -group_rows)
    subs, sub_elements = MATVEC_VALUES[format][2]
    (kernel or _matvec)[(tokens * triton.cdiv(rows, constants["ROWS"]),)](
        blocks, x, out, blocks if offsets is None else offsets, columns // (subs * sub_elements), columns, rows,
        group_rows, tokens, OFFSETS=offsets is not None, ALIGN=offsets_align, **constants,
        num_warps=warps or MATVEC_WARPS)


def matvec_constants(format: str, columns: int, tile: tuple[int, int] | None = None) -> dict:
    """The matrix-vector kernel's compile-time arguments for `format` and a row of `columns` elements at the
    module's tile (or `tile`: rows, elements): a program reads MATVEC_ROWS rows' MATVEC_ELEMENTS elements at once,
    in the largest power of two of blocks that divides a row's blocks (so that every window is whole and no load
    needs a mask); where that is fewer blocks, in proportionally more rows (so that as many bytes are read at
    once)."""
    rows_each, elements_each = tile or (MATVEC_ROWS, MATVEC_ELEMENTS)
    values, nbytes, (subs, sub_elements) = MATVEC_VALUES[format]
    elements = subs * sub_elements
    row_blocks = columns // elements
    window = max(elements_each // elements, 1)
    blocks = min(window, row_blocks & -row_blocks)
    return {"VALUES": values, "BYTES": nbytes, "ELEMENTS": elements, "BLOCKS": blocks,
            "ROWS": rows_each * (window // blocks), "STAGES": MATVEC_STAGES}


@triton.jit
def _rows(count, BLOCKS: tl.constexpr):
    """This program's block indices [B, 1, 1] (int64: a unit may hold more than 2**31 elements), which exist, and
    the indices to read from (past the last block, the last: the reads need no mask, the stores do)."""
    first = tl.program_id(0).to(tl.int64) * BLOCKS
    index = first + tl.arange(0, BLOCKS).to(tl.int64)[:, None, None]
    return index, index < count, tl.minimum(index, count - 1)


@triton.jit
def _half(base, at):
    """The float16 at bytes at, at+1 of each block (base: [B, 1, 1] byte pointers), as float32."""
    low = tl.load(base + at).to(tl.uint16)
    high = tl.load(base + at + 1).to(tl.uint16)
    return (low | (high << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _thirty_twos():
    """Q4_K's and Q5_K's blocks: eight sub-blocks [1, 8, 1] of 32 elements [1, 1, 32]."""
    return tl.arange(0, 8)[None, :, None], tl.arange(0, 32)[None, None, :]


@triton.jit
def _sixteens():
    """Q2_K's, Q3_K's and Q6_K's blocks: sixteen sub-blocks [1, 16, 1] of 16 elements [1, 1, 16]; which half of
    the block (128 elements) a sub-block lies in, which quarter of that half (32 elements), and each element's
    place in its quarter (0..31), by which those formats pack their bits."""
    sub, element = tl.arange(0, 16)[None, :, None], tl.arange(0, 16)[None, None, :]
    return sub, element, sub // 8, (sub % 8) // 2, 16 * (sub % 2) + element


@triton.jit
def _store(out, index, first, value, exists):
    """Each existing block's values at elements `first` [1, S, E] of its 256, cast to the output's dtype."""
    tl.store(out + index * 256 + first, value.to(out.dtype.element_ty), mask=exists)


@triton.jit
def _k_scales(base, sub):
    """Q4_K's and Q5_K's step and offset of sub-blocks `sub` (0..7): the block's float16 d and dmin times the
    sub-block's 6-bit scale and minimum, packed in the 12 bytes at 4."""
    low = sub < 4
    a = tl.load(base + 4 + sub)
    b = tl.load(base + 8 + sub)
    c = tl.load(base + 4 + tl.where(low, sub, sub - 4))
    scale = tl.where(low, a & 63, (b & 0x0F) | ((c >> 6) << 4))
    minimum = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
    return _half(base, 0) * scale.to(tl.float32), _half(base, 2) * minimum.to(tl.float32)


@triton.jit
def _field(base, at, shift, mask):
    """(byte `at` of each block >> `shift`) & `mask`, as int32: a code, or a packed scale's bits."""
    return (tl.load(base + at).to(tl.int32) >> shift) & mask


@triton.jit
def _float(code, offset: tl.constexpr = 0):
    """code - offset as float32, exactly, for int32 codes 0 <= code < 2**22: the code in the mantissa of 2**23
    (an OR) less 2**23 + offset (an add), two full-rate instructions where an int-to-float conversion issues at
    an eighth of the rate."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + offset)


@triton.jit
def _q4_k_values(base):
    """A Q4_K block tile's values [B, 8, 32] in float32 and their element places in the block [1, 8, 32]."""
    sub, element = _thirty_twos()
    d, dm = _k_scales(base, sub)
    q = _field(base, 16 + 32 * (sub // 2) + element, 4 * (sub % 2), 0x0F)
    return d * _float(q) - dm, sub * 32 + element


@triton.jit
def _q5_k_values(base):
    sub, element = _thirty_twos()
    d, dm = _k_scales(base, sub)
    q = _field(base, 48 + 32 * (sub // 2) + element, 4 * (sub % 2), 0x0F) \
        | (_field(base, 16 + element, sub, 1) << 4)
    return d * _float(q) - dm, sub * 32 + element


@triton.jit
def _q6_k_values(base):
    sub, element, half, quarter, within = _sixteens()
    d = _half(base, 208) * tl.load(base + 192 + sub).to(tl.int8, bitcast=True)
    low = _field(base, 64 * half + 32 * (quarter % 2) + within, 4 * (quarter // 2), 0x0F)
    high = _field(base, 128 + 32 * half + within, 2 * quarter, 3)
    return d * _float(low | (high << 4), 32), sub * 16 + element


@triton.jit
def _q3_k_values(base):
    sub, element, half, quarter, within = _sixteens()
    scale = _field(base, 96 + sub % 8, 4 * (sub // 8), 0x0F) \
        | (_field(base, 104 + sub % 4, 2 * (sub // 4), 3) << 4)
    d = _half(base, 108) * (scale - 32).to(tl.float32)
    codes = _field(base, 32 + 32 * half + within, 2 * quarter, 3)
    high = _field(base, within, 4 * half + quarter, 1)  # the hmask bit: 0 subtracts 4
    return d * _float(codes | (high << 2), 4), sub * 16 + element


@triton.jit
def _q2_k_values(base):
    sub, element, half, quarter, within = _sixteens()
    dl = _half(base, 80) * _field(base, sub, 0, 0x0F).to(tl.float32)
    ml = _half(base, 82) * _field(base, sub, 4, 0x0F).to(tl.float32)
    q = _field(base, 16 + 32 * half + within, 2 * quarter, 3)
    return dl * _float(q) - ml, sub * 16 + element


@triton.jit
def _thirty_two():
    """The legacy formats' blocks: one group [1, 1, 1] of 32 elements [1, 1, 32], and each element's byte of the
    16 that hold its nibble (low nibbles are elements 0..15, high nibbles 16..31) and its shift there."""
    element = tl.arange(0, 32)[None, None, :]
    return element, element % 16, 4 * (element // 16)


@triton.jit
def _q4_0_values(base):
    element, byte, shift = _thirty_two()
    return _half(base, 0) * _float(_field(base, 2 + byte, shift, 0x0F), 8), element


@triton.jit
def _q4_1_values(base):
    element, byte, shift = _thirty_two()
    q = _field(base, 4 + byte, shift, 0x0F)
    return _half(base, 0) * _float(q) + _half(base, 2), element


@triton.jit
def _q5_0_values(base):
    element, byte, shift = _thirty_two()
    q = _field(base, 6 + byte, shift, 0x0F) | (_field(base, 2 + element // 8, element % 8, 1) << 4)
    return _half(base, 0) * _float(q, 16), element


@triton.jit
def _q5_1_values(base):
    element, byte, shift = _thirty_two()
    q = _field(base, 8 + byte, shift, 0x0F) | (_field(base, 4 + element // 8, element % 8, 1) << 4)
    return _half(base, 0) * _float(q) + _half(base, 2), element


@triton.jit
def _q8_0_values(base):
    element = tl.arange(0, 32)[None, None, :]
    q = _field(base, 2 + element, 0, 0xFF) ^ 0x80  # the int8 code + 128
    return _float(q, 128) * _half(base, 0), element


@triton.jit
def _dequantize(blocks, out, count, VALUES: tl.constexpr, BYTES: tl.constexpr, BLOCKS: tl.constexpr):
    """This program's blocks of `blocks` (BYTES each) dequantized into `out` by the format's VALUES."""
    index, exists, read = _rows(count, BLOCKS)
    value, first = VALUES(blocks + read * BYTES)
    _store(out, index, first, value, exists)


@triton.jit
def _add(a, b):
    """The sum's step (tl.reduce, a builtin: Triton's interpreter runs it where the standard library's tl.sum,
    defined before TRITON_INTERPRET was set, cannot run)."""
    return a + b


@triton.jit
def _matvec(blocks, x, out, offsets, row_blocks, columns, rows, group_rows, tokens, OFFSETS: tl.constexpr,
            ALIGN: tl.constexpr, VALUES: tl.constexpr, BYTES: tl.constexpr, ELEMENTS: tl.constexpr,
            BLOCKS: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr):
    """ROWS rows of a matrix in blocks (`row_blocks` a row, a multiple of BLOCKS) from row ROWS * (`program_id` //
    `tokens`) times row `program_id` % `tokens` of x [tokens, columns], into that row of out [tokens, rows]. The program
    reads BLOCKS blocks of each of its rows at a time, its rows sharing each load of the inputs, and adds values times
    inputs into float32 sums per element place, summed across places once at the end. Rows past the matrix read its last
    row, so that no load needs a mask (only the store has one). STAGES > 1: Triton's pipeliner issues the loads of the
    windows ahead (more bytes in flight), STAGES - 1 of them. Grouped (`matvec_grouped`): each `group_rows` rows have
    inputs of their own, x [rows / group_rows, columns] (ROWS dividing group_rows); else group_rows = rows. OFFSETS:
    group g's rows start `offsets[g]` bytes into `blocks` (int64, multiples of ALIGN; a program's rows lie within
    one group). (A program
    takes one token: with several in one program's tile, [rows, tokens, elements], the compiled kernel summed wrong on
    an H100 for 2-4 tokens where Triton's interpreter summed right.)"""
    program = tl.program_id(0).to(tl.int64)
    token, first_row = program % tokens, program // tokens * ROWS
    group = first_row // group_rows
    x += (token + group) * columns
    pair = tl.arange(0, ROWS * BLOCKS).to(tl.int64)  # (row, block) pairs, row-major
    row, block = tl.minimum(first_row + pair // BLOCKS, rows - 1), pair % BLOCKS
    if OFFSETS:  # rows counted within the group, from where its matrix lies
        blocks += tl.multiple_of(tl.load(offsets + group), ALIGN)
        row -= group * group_rows
    sums = tl.full([ROWS, 1, BLOCKS * ELEMENTS], 0.0, tl.float32)  # the unit axis: a layout measured faster
    for start in tl.range(0, row_blocks, BLOCKS, num_stages=STAGES):
        value, first = VALUES(blocks + ((row * row_blocks + start + block) * BYTES)[:, None, None])
        column = tl.reshape((start + tl.arange(0, BLOCKS).to(tl.int64)[:, None, None]) * ELEMENTS + first,
                            [1, BLOCKS * ELEMENTS])
        sums += tl.reshape(value, [ROWS, 1, BLOCKS * ELEMENTS]) * tl.load(x + column).to(tl.float32)[None, :, :]
    rows_here = first_row + tl.arange(0, ROWS).to(tl.int64)[:, None]
    tl.store(out + token * rows + rows_here, tl.reduce(sums, 2, _add).to(out.dtype.element_ty),
             mask=rows_here < rows)


# each format: its values, its block bytes and its tile of a block [sub-blocks, elements each]
VALUES = {"Q2_K": (_q2_k_values, 84, (16, 16)), "Q3_K": (_q3_k_values, 110, (16, 16)),
          "Q4_K": (_q4_k_values, 144, (8, 32)), "Q5_K": (_q5_k_values, 176, (8, 32)),
          "Q6_K": (_q6_k_values, 210, (16, 16))}
# the matrix-vector kernel's formats: the k-quants and the legacy formats of 32-element blocks
MATVEC_VALUES = {**VALUES, "Q4_0": (_q4_0_values, 18, (1, 32)), "Q4_1": (_q4_1_values, 20, (1, 32)),
                 "Q5_0": (_q5_0_values, 22, (1, 32)), "Q5_1": (_q5_1_values, 24, (1, 32)),
                 "Q8_0": (_q8_0_values, 34, (1, 32))}
