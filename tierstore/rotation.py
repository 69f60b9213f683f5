"""A matrix's inputs rotated before it is quantized (incoherence processing, as QuIP and QuaRot do): W = Q Rᵀ.

A linear computes W x. With R orthogonal, W x = (W R)(Rᵀ x), so a store may hold W R quantized and give back
(W R) Rᵀ = W up to the quantization error. R here is a random sign per input column followed by a Hadamard
transform within each run of BLOCK columns: it spreads each weight's outliers over its block, so a block's scale
fits its weights better, and it spreads the input's energy evenly, which is what GPTQ's error feedback works with
best. Measured on SmolLM2 off its grid (`tierstore eval`): q3_k with GPTQ 65.9% top-1, rotated 71.5%; but q4_k
with GPTQ 89.8%, rotated 87.2% (those weights still lie near a 4-bit grid, which the rotation scatters), and
without GPTQ a rotation loses everywhere (q3_k 53.2% against 44.2%: the error lands evenly on every input,
the loud ones too), so it is only offered with GPTQ. The signs come from the matrix's name (seeded), so nothing
is stored but the codec's word; the dequantized matrix is turned back in place, one small matmul per BLOCK
columns.
"""
from __future__ import annotations

import functools
import math
import zlib

import torch

BLOCK = 64  # columns one Hadamard transform mixes
HADAMARD = "hadamard"  # compression.rotation's word for it ("none": not rotated)
CHUNK_ELEMENTS = 1 << 24


def applies(shape: tuple[int, ...]) -> bool:
    """Whether a matrix of `shape` (rows, columns) is rotated: whole blocks of columns."""
    return len(shape) == 2 and shape[1] % BLOCK == 0


def rotate(weight: torch.Tensor, name: str) -> torch.Tensor:
    """W R for matrix `name` (rows, columns), in float32."""
    w = weight.float() * _signs(name, weight.shape[1], weight.device)
    return (w.view(w.shape[0], -1, BLOCK) @ _hadamard(w.device)).view(w.shape)


def rotate_hessian(hessian: torch.Tensor, name: str) -> torch.Tensor:
    """Rᵀ H R: the inputs' second moment as the rotated matrix sees them (Rᵀ x)."""
    h = rotate(hessian, name)  # H R (H is symmetric)
    return rotate(h.T.contiguous(), name)  # (H R)ᵀ R = Rᵀ H R


def unrotate_(matrix: torch.Tensor, name: str) -> None:
    """Turn a dequantized W R (rows, columns; any float dtype, on any device) back into W, in place."""
    rows, columns = matrix.shape
    hadamard = _hadamard(matrix.device, matrix.dtype)  # its own inverse: symmetric and orthonormal
    signs = _signs(name, columns, matrix.device, matrix.dtype).view(-1, BLOCK)  # [column blocks, BLOCK]
    step = max(1, CHUNK_ELEMENTS // columns)  # rows at a time: the product's temporary stays small
    for first in range(0, rows, step):
        blocks = matrix[first:first + step].view(-1, columns // BLOCK, BLOCK)
        torch.mul(blocks @ hadamard, signs, out=blocks)  # one pass back over the rows: product, then signs


@functools.cache
def _hadamard(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The BLOCK x BLOCK Hadamard matrix (Sylvester's), orthonormal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < BLOCK:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(BLOCK)).to(device, dtype)


@functools.lru_cache(maxsize=4096)  # a few KB each; made anew, each pass paid a host draw and a blocking copy
def _signs(name: str, columns: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Matrix `name`'s random signs, one per column, the same on every machine (seeded by the name)."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randint(0, 2, (columns,), generator=generator) * 2 - 1).to(device, dtype)
