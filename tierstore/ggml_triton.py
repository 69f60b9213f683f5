"""The k-quants (Q2_K to Q6_K) dequantized on a GPU by Triton kernels written for their block layout.

torch.compile turns ggml.py's steps into one kernel that decodes a sub-block's packed 6-bit scale again for every
element it scales, and reads the block bytes one at a time: on an H200 it dequantized a 7B layer of Q4_K in
0.97 ms, 4× Q4_0 over the same bytes (benchmarks/RESULTS.md). These kernels hold each program's blocks as a tile
[blocks, sub-blocks, elements]: the scales are decoded once per sub-block and broadcast, and the codes are read as
runs of contiguous bytes. The arithmetic is ggml.py's (the `gguf` package's reference) operation for operation in
float32, then one cast to the output dtype.

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


def dequantize(format: str, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Fill `out` ([blocks, 256], any float dtype) with the elements of `format`'s uint8 `blocks` [blocks, bytes]
    (both contiguous, on one device). Multiplies and adds stay apart (no fused multiply-add), so that the values
    are the reference's bits."""
    count = blocks.shape[0]
    if count:
        grid = (triton.cdiv(count, BLOCKS_PER_PROGRAM),)
        KERNELS[format][grid](blocks, out, count, BLOCKS=BLOCKS_PER_PROGRAM, enable_fp_fusion=False)


@triton.jit
def _half(base, at, exists):
    """The float16 at bytes at, at+1 of each block (base: [B, 1] byte pointers), as float32."""
    low = tl.load(base + at, mask=exists, other=0).to(tl.uint16)
    high = tl.load(base + at + 1, mask=exists, other=0).to(tl.uint16)
    return (low | (high << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _rows(count, BLOCKS: tl.constexpr):
    """This program's block indices [B, 1] (int64: a unit may hold more than 2**31 elements), and which exist."""
    first = tl.program_id(0).to(tl.int64) * BLOCKS
    index = first + tl.arange(0, BLOCKS).to(tl.int64)[:, None]
    return index, index < count


@triton.jit
def _k_scale_min(base, sub, exists):
    """Q4_K's and Q5_K's 6-bit scale and minimum of sub-blocks `sub` (0..7), from the 12 bytes at 4."""
    low = sub < 4
    a = tl.load(base + 4 + sub, mask=exists, other=0)
    b = tl.load(base + 8 + sub, mask=exists, other=0)
    c = tl.load(base + 4 + tl.where(low, sub, sub - 4), mask=exists, other=0)
    scale = tl.where(low, a & 63, (b & 0x0F) | ((c >> 6) << 4))
    minimum = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _q4_k(blocks, out, count, BLOCKS: tl.constexpr):
    index, exists = _rows(count, BLOCKS)
    base = blocks + index * 144  # [B, 1]
    sub = tl.arange(0, 8)[None, :]  # [1, 8]: 32 elements each
    scale, minimum = _k_scale_min(base, sub, exists)
    d = _half(base, 0, exists) * scale
    dm = _half(base, 2, exists) * minimum
    element = tl.arange(0, 32)[None, None, :]
    sub3 = sub[:, :, None]
    packed = tl.load(base[:, :, None] + 16 + 32 * (sub3 // 2) + element, mask=exists[:, :, None], other=0)
    q = ((packed >> (4 * (sub3 % 2)).to(tl.uint8)) & 0x0F).to(tl.float32)
    value = d[:, :, None] * q - dm[:, :, None]
    tl.store(out + index[:, :, None] * 256 + sub3 * 32 + element, value.to(out.dtype.element_ty),
             mask=exists[:, :, None])


@triton.jit
def _q5_k(blocks, out, count, BLOCKS: tl.constexpr):
    index, exists = _rows(count, BLOCKS)
    base = blocks + index * 176
    sub = tl.arange(0, 8)[None, :]
    scale, minimum = _k_scale_min(base, sub, exists)
    d = _half(base, 0, exists) * scale
    dm = _half(base, 2, exists) * minimum
    element = tl.arange(0, 32)[None, None, :]
    sub3 = sub[:, :, None]
    mask = exists[:, :, None]
    packed = tl.load(base[:, :, None] + 48 + 32 * (sub3 // 2) + element, mask=mask, other=0)
    high = tl.load(base[:, :, None] + 16 + element, mask=mask, other=0)
    q = ((packed >> (4 * (sub3 % 2)).to(tl.uint8)) & 0x0F) | (((high >> sub3.to(tl.uint8)) & 1) << 4)
    value = d[:, :, None] * q.to(tl.float32) - dm[:, :, None]
    tl.store(out + index[:, :, None] * 256 + sub3 * 32 + element, value.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _q6_k(blocks, out, count, BLOCKS: tl.constexpr):
    index, exists = _rows(count, BLOCKS)
    base = blocks + index * 210
    sub = tl.arange(0, 16)[None, :]  # 16 elements each
    scale = tl.load(base + 192 + sub, mask=exists, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    d = _half(base, 208, exists) * scale
    sub3 = sub[:, :, None]
    element = tl.arange(0, 16)[None, None, :]
    block_half, quarter = sub3 // 8, (sub3 % 8) // 2
    within = 16 * (sub3 % 2) + element  # 0..31 within the quarter
    mask = exists[:, :, None]
    low = tl.load(base[:, :, None] + 64 * block_half + 32 * (quarter % 2) + within, mask=mask, other=0)
    high = tl.load(base[:, :, None] + 128 + 32 * block_half + within, mask=mask, other=0)
    low = (low >> (4 * (quarter // 2)).to(tl.uint8)) & 0x0F
    high = (high >> (2 * quarter).to(tl.uint8)) & 3
    q = (low | (high << 4)).to(tl.int32) - 32
    value = d[:, :, None] * q.to(tl.float32)
    tl.store(out + index[:, :, None] * 256 + sub3 * 16 + element, value.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _q3_k(blocks, out, count, BLOCKS: tl.constexpr):
    index, exists = _rows(count, BLOCKS)
    base = blocks + index * 110
    sub = tl.arange(0, 16)[None, :]
    low = tl.load(base + 96 + sub % 8, mask=exists, other=0)
    low = (low >> (4 * (sub // 8)).to(tl.uint8)) & 0x0F
    high = tl.load(base + 104 + sub % 4, mask=exists, other=0)
    high = (high >> (2 * (sub // 4)).to(tl.uint8)) & 3
    scale = (low | (high << 4)).to(tl.int32) - 32
    d = _half(base, 108, exists) * scale.to(tl.float32)
    sub3 = sub[:, :, None]
    element = tl.arange(0, 16)[None, None, :]
    block_half, quarter = sub3 // 8, (sub3 % 8) // 2
    within = 16 * (sub3 % 2) + element
    mask = exists[:, :, None]
    codes = tl.load(base[:, :, None] + 32 + 32 * block_half + within, mask=mask, other=0)
    codes = (codes >> (2 * quarter).to(tl.uint8)) & 3
    hmask = tl.load(base[:, :, None] + within, mask=mask, other=0)
    hbit = (hmask >> (4 * block_half + quarter).to(tl.uint8)) & 1
    q = codes.to(tl.int32) - 4 * (1 - hbit.to(tl.int32))
    value = d[:, :, None] * q.to(tl.float32)
    tl.store(out + index[:, :, None] * 256 + sub3 * 16 + element, value.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _q2_k(blocks, out, count, BLOCKS: tl.constexpr):
    index, exists = _rows(count, BLOCKS)
    base = blocks + index * 84
    sub = tl.arange(0, 16)[None, :]
    scales = tl.load(base + sub, mask=exists, other=0)
    dl = _half(base, 80, exists) * (scales & 0x0F).to(tl.float32)
    ml = _half(base, 82, exists) * (scales >> 4).to(tl.float32)
    sub3 = sub[:, :, None]
    element = tl.arange(0, 16)[None, None, :]
    block_half, quarter = sub3 // 8, (sub3 % 8) // 2
    mask = exists[:, :, None]
    codes = tl.load(base[:, :, None] + 16 + 32 * block_half + 16 * (sub3 % 2) + element, mask=mask, other=0)
    q = ((codes >> (2 * quarter).to(tl.uint8)) & 3).to(tl.float32)
    value = dl[:, :, None] * q - ml[:, :, None]
    tl.store(out + index[:, :, None] * 256 + sub3 * 16 + element, value.to(out.dtype.element_ty), mask=mask)


KERNELS = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
