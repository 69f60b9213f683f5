"""Quantizing into GGML's block formats (the inverse of ggml.py): tierstore's own 2- to 8-bit compression.

The k-quants follow llama.cpp's reference quantizers (`quantize_row_q2_K_ref` to `quantize_row_q6_K_ref`),
data-free:
- Q4_K: super-blocks of 256 in 8 sub-blocks of 32, each with a scale and a minimum found by a weighted
  least-squares search over 21 candidate grids (`make_qkx2_quants`), both then quantized to 6 bits against the
  super-block's float16 scale and minimum: 4.5 bits a weight;
- Q5_K: the same with 5-bit codes (16 grids): 5.5 bits;
- Q2_K: 16 sub-blocks of 16, 2-bit codes with a scale and a minimum each (searched as Q4_K's, from -0.5 in 15
  steps), both stored in 4 bits against the super-block's float16 scale and minimum: 2.625 bits;
- Q3_K: 16 sub-blocks of 16, symmetric 3-bit codes, each sub-block's scale searched over 19 grids
  (`make_qx_quants`; llama.cpp's data-free Q3_K refines codes one at a time instead) and stored in 6 bits against
  a float16 super-scale: 3.4375 bits;
- Q6_K: 16 sub-blocks of 16, symmetric 6-bit codes, scales searched as Q3_K's and stored as int8: 6.5625 bits;
- Q8_0: blocks of 32, symmetric 8-bit against a float16 scale: 8.5 bits.
Given an importance per weight (the mean square of the input each weight multiplies, measured over a calibration
text: llama.cpp's importance matrix), the searches weigh each weight's error by it, so that the weights that move the
output most are kept closest. Everything is vectorised over blocks, so a 7B layer quantizes in well under a second
on a GPU. The blocks are the same bytes a GGUF would hold: ggml.py (and the `gguf` package) dequantize them.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from .ggml import BLOCKS, CHUNK_ELEMENTS

QK_K = 256


@dataclasses.dataclass(frozen=True)
class Grid:
    """Where a format's codes may put the values of some blocks: value = step * code - offset, per sub-block of
    `sub` values ([sub-blocks, 1] each), codes in `low`..`high`; `pack` turns codes [sub-blocks, sub] into the
    blocks' bytes (uint8, 1-D). A sub-block whose step is 0 holds -offset wherever its code is 0."""

    step: torch.Tensor
    offset: torch.Tensor
    low: int
    high: int
    sub: int
    pack: Callable[[torch.Tensor], torch.Tensor]

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest codes of `x` (its sub-blocks in order, any shape) on this grid, float [sub-blocks, sub]."""
        safe = torch.where(self.step != 0, self.step, torch.ones_like(self.step))
        codes = torch.round((x.reshape(-1, self.sub) + self.offset) / safe).clamp(self.low, self.high)
        return torch.where(self.step != 0, codes, torch.zeros_like(codes))


def quantize(format: str, values: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """`values` (any float dtype, 1-D, a whole number of blocks) as `format`'s blocks: uint8, on the same device.
    `importance`: one non-negative weight per value, or one per column repeated down the rows (a length that divides
    the values'); None: all equal. Blocks are independent, so the values go CHUNK_ELEMENTS at a time: the searches'
    float32 temporaries are several times their input, and a whole MoE layer's experts are hundreds of millions
    of values (7.4 GB of device memory for a 4 GB budget's q8_0 store, unchunked)."""
    elements, nbytes = BLOCKS[format]
    columns = importance is not None and importance.numel() != values.numel()  # one weight per column
    if columns and values.numel() % importance.numel():
        raise ValueError(f"{importance.numel()} importance weights do not repeat evenly over {values.numel()} values")
    period = math.lcm(elements, importance.numel()) if columns else elements
    step = max(CHUNK_ELEMENTS // period, 1) * period
    out = torch.empty(values.numel() // elements * nbytes, dtype=torch.uint8, device=values.device)
    importance = importance.to(values.device) if importance is not None else None
    for begin in range(0, values.numel(), step):
        part = values[begin:begin + step]
        if importance is None:
            weight = None
        elif columns:
            weight = importance.repeat(part.numel() // importance.numel())
        else:
            weight = importance[begin:begin + step]
        found = grid(format, part, weight)
        first, last = begin // elements * nbytes, (begin + part.numel()) // elements * nbytes
        out[first:last] = found.pack(found.codes(part.float()))
    return out


def grid(format: str, values: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
    """`format`'s grid for `values` (1-D, a whole number of blocks), its scales searched as `quantize` does."""
    x = values.float().reshape(-1)
    weight = None if importance is None else importance.float().reshape(-1).to(x.device)
    return _GRIDS[format](x, weight)


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [n] -> its float16 bytes [n, 2]."""
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _q8_0(x: torch.Tensor, importance: torch.Tensor | None) -> Grid:  # its one scale needs no search
    blocks = x.view(-1, 32)
    d = (blocks.abs().amax(1, keepdim=True) / 127).to(torch.float16).float()

    def pack(codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([_half_bytes(d), codes.to(torch.int8).view(torch.uint8)], 1).reshape(-1)
    return Grid(d, torch.zeros_like(d), -127, 127, 32, pack)


def _scale_min_search(x: torch.Tensor, weights: torch.Tensor, nmax: int, steps: int = 20, rmin: float = -1.0,
                      rdelta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qkx2_quants for rows of `x` [rows, n]: the scale and minimum (x ~ scale * code - minimum,
    codes in 0..nmax) minimizing the weighted squared error over candidate grids. Each grid's error comes from the
    weighted sums its fit needs (sum w (s l + m - x)^2 expanded), not from another pass over the values: a grid
    costs four passes (its codes, and w l, w l l, w l x summed), about half of computing the error directly."""
    low = x.amin(1, keepdim=True).clamp(max=0)
    high = x.amax(1, keepdim=True)
    span = (high - low).clamp(min=1e-30)
    shifted = x - low
    sum_w, sum_x = weights.sum(1, keepdim=True), (weights * x).sum(1, keepdim=True)
    sum_x2 = (weights * x * x).sum(1, keepdim=True)

    def fitted(grid: float) -> tuple[torch.Tensor, ...]:
        """The codes on `grid` levels across the span, and their weighted sums (l, l², x l)."""
        codes = torch.round(shifted * (grid / span)).clamp_(0, nmax)
        weighted = weights * codes
        return (weighted.sum(1, keepdim=True), (weighted * codes).sum(1, keepdim=True),
                (weighted * x).sum(1, keepdim=True))

    def error(scale: torch.Tensor, minimum: torch.Tensor, sum_l: torch.Tensor, sum_l2: torch.Tensor,
              sum_xl: torch.Tensor) -> torch.Tensor:
        return (scale * scale * sum_l2 + 2 * scale * minimum * sum_l + minimum * minimum * sum_w
                - 2 * scale * sum_xl - 2 * minimum * sum_x + sum_x2)

    scale, minimum = span / nmax, low
    best = error(scale, minimum, *fitted(nmax))
    for step in range(steps + 1):
        sum_l, sum_l2, sum_xl = fitted(rmin + rdelta * step + nmax)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(det > 0, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0  # the minimum may not be above zero: fit the scale alone
        this_scale = torch.where(positive, sum_xl / sum_l2.clamp(min=1e-30), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_error = error(this_scale, this_min, sum_l, sum_l2, sum_xl)
        better = (det > 0) & (this_error < best)
        scale, minimum = torch.where(better, this_scale, scale), torch.where(better, this_min, minimum)
        best = torch.where(better, this_error, best)
    flat = high == low
    return torch.where(flat, torch.zeros_like(scale), scale), -minimum


def _scales_mins(x: torch.Tensor, importance: torch.Tensor | None, nmax: int, rmin: float, rdelta: float,
                 steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's super-blocks of 256 in 8 sub-blocks of 32: the float16 scale and minimum (as float32),
    the 12 bytes of 6-bit sub-block scales and minimums, and each sub-block's step and offset [blocks * 8, 1] as
    the dequantizer will use them."""
    sub = x.view(-1, 32)
    n = sub.shape[0] // 8
    if importance is None:
        weights = (sub.pow(2).mean(1, keepdim=True)).sqrt() + sub.abs()
    else:  # llama.cpp's weighting with an importance matrix
        weights = importance.view(-1, 32) * (sub.pow(2).mean(1, keepdim=True) + sub * sub).sqrt()
    scales, mins = _scale_min_search(sub, weights, nmax, steps, rmin, rdelta)
    d, dmin, ls, lm, step, offset = _super_scaled(scales.view(n, 8), mins.view(n, 8), 63)
    packed = torch.empty(n, 12, dtype=torch.uint8, device=x.device)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return d, dmin, packed, step, offset


def _super_scaled(scales: torch.Tensor, mins: torch.Tensor, levels: int) -> tuple[torch.Tensor, ...]:
    """Sub-block scales and minimums [blocks, k] as integers 0..levels against each block's float16 super-scale
    and super-minimum (the largest maps to `levels`): (super-scale, super-minimum as float32 [blocks, 1], the
    integers as uint8 [blocks, k], each sub-block's step and offset [blocks * k, 1] as the dequantizer uses them)."""
    max_scale, max_min = scales.amax(1, keepdim=True), mins.amax(1, keepdim=True)
    ls = torch.round(scales * torch.where(max_scale > 0, levels / max_scale, torch.zeros_like(max_scale)))
    lm = torch.round(mins * torch.where(max_min > 0, levels / max_min, torch.zeros_like(max_min)))
    ls, lm = ls.clamp(0, levels), lm.clamp(0, levels)
    d = (max_scale / levels).to(torch.float16).float()
    dmin = (max_min / levels).to(torch.float16).float()
    step, offset = (d * ls).view(-1, 1), (dmin * lm).view(-1, 1)
    return d, dmin, ls.to(torch.uint8), lm.to(torch.uint8), step, offset


def _pack(fields: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Fields of `bits` bits along `dim` packed into one byte, the first in the lowest bits (uint8, `dim` gone)."""
    shape = [1] * fields.dim()
    shape[dim] = -1
    shifts = bits * torch.arange(fields.shape[dim], device=fields.device).view(shape)
    return (fields.long() << shifts).sum(dim).to(torch.uint8)


def _nibble_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Codes [blocks, 8, 32] below 16 as Q4_K's and Q5_K's 128 bytes: each 64 codes' first 32 in the low nibbles."""
    return _pack(codes.view(codes.shape[0], 4, 2, 32), 2, 4).view(-1, 128)


def _q4_k(x: torch.Tensor, importance: torch.Tensor | None) -> Grid:
    d, dmin, scales, step, offset = _scales_mins(x, importance, 15, -1.0, 0.1, 20)

    def pack(codes: torch.Tensor) -> torch.Tensor:
        codes = codes.to(torch.uint8).view(-1, 8, 32)
        return torch.cat([_half_bytes(d), _half_bytes(dmin), scales, _nibble_pairs(codes)], 1).reshape(-1)
    return Grid(step, offset, 0, 15, 32, pack)


def _q5_k(x: torch.Tensor, importance: torch.Tensor | None) -> Grid:
    """Q4_K with 5-bit codes (llama.cpp's search from -0.5 in 15 steps): the fifth bits in 32 bytes, bit j of byte
    i for sub-block j's code i. 5.5 bits a weight."""
    d, dmin, scales, step, offset = _scales_mins(x, importance, 31, -0.5, 0.1, 15)

    def pack(codes: torch.Tensor) -> torch.Tensor:
        codes = codes.to(torch.uint8).view(-1, 8, 32)
        high = _pack(codes >> 4, 1, 1)
        return torch.cat([_half_bytes(d), _half_bytes(dmin), scales, high, _nibble_pairs(codes & 0x0F)],
                         1).reshape(-1)
    return Grid(step, offset, 0, 31, 32, pack)


def _q2_k(x: torch.Tensor, importance: torch.Tensor | None) -> Grid:
    """16 sub-blocks of 16, codes 0..3 with a scale and a minimum each, both in 4 bits (a byte per sub-block:
    scale low, minimum high) against the float16 super-scale and super-minimum; the codes four to a byte, each 128
    values' 32 bytes holding its four runs of 32 in bit pairs. 2.625 bits a weight."""
    sub = x.view(-1, 16)
    n = sub.shape[0] // 16
    if importance is None:  # llama.cpp's reference weighs each value by its magnitude
        weights = sub.abs()
    else:
        weights = importance.view(-1, 16) * (sub.pow(2).mean(1, keepdim=True) + sub * sub).sqrt()
    scales, mins = _scale_min_search(sub, weights, 3, 15, -0.5, 0.1)
    d, dmin, ls, lm, step, offset = _super_scaled(scales.view(n, 16), mins.view(n, 16), 15)
    packed = ls | (lm << 4)

    def pack(codes: torch.Tensor) -> torch.Tensor:
        qs = _pack(codes.to(torch.uint8).view(n, 2, 4, 32), 2, 2).view(n, 64)
        return torch.cat([packed, qs, _half_bytes(d), _half_bytes(dmin)], 1).reshape(-1)
    return Grid(step, offset, 0, 3, 16, pack)


def _symmetric_search(x: torch.Tensor, nmax: int, importance: torch.Tensor | None) -> torch.Tensor:
    """llama.cpp's make_qx_quants (rmse_type 1) for rows of `x`: the scale of codes in -nmax..nmax-1 minimizing
    the squared error weighted by x² (times the importance, when given), searched over 19 grids."""
    index = x.abs().argmax(1, keepdim=True)
    peak = x.gather(1, index)
    safe_peak = torch.where(peak != 0, peak, torch.ones_like(peak))
    weights = x * x if importance is None else x * x * importance
    weighted_x = weights * x
    best_scale = torch.zeros_like(peak)
    best = torch.full_like(peak, -1.0)
    for step in range(-9, 10):
        inverse = -(nmax + 0.1 * step) / safe_peak
        codes = torch.round(inverse * x).clamp_(-nmax, nmax - 1)
        sum_lx, sum_l2 = (weighted_x * codes).sum(1, keepdim=True), (weights * codes * codes).sum(1, keepdim=True)
        scale = sum_lx / sum_l2.clamp(min=1e-30)
        gain = scale * sum_lx
        better = (sum_l2 > 0) & (gain > best)
        best_scale, best = torch.where(better, scale, best_scale), torch.where(better, gain, best)
    return torch.where(peak != 0, best_scale, torch.zeros_like(best_scale)).view(-1)


def _q6_k(x: torch.Tensor, importance: torch.Tensor | None) -> Grid:
    sub = x.view(-1, 16)
    n = sub.shape[0] // 16
    scales = _symmetric_search(sub, 32, None if importance is None else importance.view(-1, 16)).view(n, 16)
    d, rounded = _signed_scales(scales, 128)
    small = rounded.to(torch.int8)

    def pack(codes: torch.Tensor) -> torch.Tensor:
        codes = (codes + 32).to(torch.uint8).view(n, 256)
        ql = _pack((codes & 0x0F).view(n, 2, 2, 64), 2, 4).view(n, 128)
        qh = _pack((codes >> 4).view(n, 2, 4, 32), 2, 2).view(n, 64)
        return torch.cat([ql, qh, small.view(torch.uint8), _half_bytes(d)], 1).reshape(-1)
    step = (d * small.float()).view(-1, 1)
    return Grid(step, torch.zeros_like(step), -32, 31, 16, pack)


def _signed_scales(scales: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-block scales [blocks, k] as integers in -levels..levels-1 against a float16 super-scale (the largest in
    magnitude maps to -levels, as llama.cpp's Q3_K and Q6_K do): (super-scale as float32, integers)."""
    index = scales.abs().argmax(1, keepdim=True)
    max_scale = scales.gather(1, index)
    inverse = torch.where(max_scale != 0, -levels / max_scale, torch.zeros_like(max_scale))
    d = torch.where(max_scale != 0, 1 / inverse, torch.zeros_like(max_scale)).to(torch.float16).float()
    return d, torch.round(inverse * scales).clamp(-levels, levels - 1)


def _q3_k(x: torch.Tensor, importance: torch.Tensor | None) -> Grid:
    """16 sub-blocks of 16, symmetric 3-bit codes (-4..3), each sub-block's scale searched as Q6_K's, stored in 6
    bits against a float16 super-scale; the codes' low two bits four to a byte, their high bits in a 32-byte mask.
    3.4375 bits a weight."""
    sub = x.view(-1, 16)
    n = sub.shape[0] // 16
    scales = _symmetric_search(sub, 4, None if importance is None else importance.view(-1, 16)).view(n, 16)
    d, small = _signed_scales(scales, 32)
    levels = (small + 32).to(torch.uint8)  # 0..63: low nibbles two to a byte, top two bits four to a byte
    packed = torch.cat([_pack((levels & 0x0F).view(n, 2, 8), 1, 4), _pack((levels >> 4).view(n, 4, 4), 1, 2)], 1)

    def pack(codes: torch.Tensor) -> torch.Tensor:
        codes = (codes + 4).to(torch.uint8).view(n, 256)
        hmask = _pack((codes >> 2).view(n, 8, 32), 1, 1)
        qs = _pack((codes & 3).view(n, 2, 4, 32), 2, 2).view(n, 64)
        return torch.cat([hmask, qs, packed, _half_bytes(d)], 1).reshape(-1)
    step = (d * small).view(-1, 1)
    return Grid(step, torch.zeros_like(step), -4, 3, 16, pack)


_GRIDS = {"Q8_0": _q8_0, "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
FORMATS = tuple(_GRIDS)
