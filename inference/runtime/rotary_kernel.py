"""transformers' rotary position embedding of the queries and keys in one Triton kernel, with its roundings.

`apply_rotary_pos_emb(q, k, cos, sin)` (Llama's, copied by most decoders) computes `q * cos + rotate_half(q) * sin`
and the same for k: on a GPU ten kernels (two multiplies, a negation, a concatenation and an add for each), each a
launch for a decode step's few hundred values. This kernel does both in one launch, one program a (batch, head,
position) row, and rounds where transformers' steps round: each product to the tensors' dtype, then their sum. A
product of two bfloat16 or float16 values is exact in float32, so each rounding is the one torch's kernel makes;
in float32, multiplies and adds stay apart (no fused multiply-add). The values are transformers' bit for bit.

Importing this module imports Triton; `TRITON_INTERPRET=1` runs the kernel on the CPU (tests/test_fused_rotary.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin, the same for k) for q [batch, heads, positions, width], k [batch, kv heads,
    positions, width] and cos, sin [batch or 1, positions, width], one dtype, the last dimension contiguous: new
    tensors laid out as q and k are."""
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    batch, heads, positions, width = q.shape
    q_rows, k_rows = batch * heads * positions, batch * k.shape[1] * positions
    if q_rows + k_rows:
        _rotate[(q_rows + k_rows,)](
            q, k, cos, sin, q_out, k_out, q_rows, heads, k.shape[1], positions,
            *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
            cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), sin.stride(0) if sin.shape[0] > 1 else 0,
            sin.stride(1), HALF=width // 2, BLOCK=triton.next_power_of_2(width // 2), enable_fp_fusion=False)
    return q_out, k_out


@triton.jit
def _row(x, cos, sin, out, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """One row: out[:HALF] = x[:HALF] * cos[:HALF] + (-x[HALF:]) * sin[:HALF] and out[HALF:] = x[HALF:] * cos[HALF:]
    + x[:HALF] * sin[HALF:], each product and the sum rounded to the row's dtype."""
    place = tl.arange(0, BLOCK)
    inside = place < HALF
    dtype = out.dtype.element_ty
    first = tl.load(x + place, mask=inside).to(tl.float32)
    second = tl.load(x + HALF + place, mask=inside).to(tl.float32)
    cos_first = tl.load(cos + place, mask=inside).to(tl.float32)
    cos_second = tl.load(cos + HALF + place, mask=inside).to(tl.float32)
    sin_first = tl.load(sin + place, mask=inside).to(tl.float32)
    sin_second = tl.load(sin + HALF + place, mask=inside).to(tl.float32)
    low = (first * cos_first).to(dtype).to(tl.float32) + (-second * sin_first).to(dtype).to(tl.float32)
    high = (second * cos_second).to(dtype).to(tl.float32) + (first * sin_second).to(dtype).to(tl.float32)
    tl.store(out + place, low.to(dtype), mask=inside)
    tl.store(out + HALF + place, high.to(dtype), mask=inside)


@triton.jit
def _rotate(q, k, cos, sin, q_out, k_out, q_rows, heads, k_heads, positions,
            q_batch, q_head, q_position, k_batch, k_head, k_position,
            qo_batch, qo_head, qo_position, ko_batch, ko_head, ko_position,
            cos_batch, cos_position, sin_batch, sin_position, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """Program r < q_rows rotates q's row r (batch-major, then head, then position), the others k's rows."""
    row = tl.program_id(0).to(tl.int64)
    if row < q_rows:
        batch, head, position = row // (heads * positions), row // positions % heads, row % positions
        _row(q + batch * q_batch + head * q_head + position * q_position,
             cos + batch * cos_batch + position * cos_position, sin + batch * sin_batch + position * sin_position,
             q_out + batch * qo_batch + head * qo_head + position * qo_position, HALF, BLOCK)
    else:
        row -= q_rows
        batch, head, position = row // (k_heads * positions), row // positions % k_heads, row % positions
        _row(k + batch * k_batch + head * k_head + position * k_position,
             cos + batch * cos_batch + position * cos_position, sin + batch * sin_batch + position * sin_position,
             k_out + batch * ko_batch + head * ko_head + position * ko_position, HALF, BLOCK)
