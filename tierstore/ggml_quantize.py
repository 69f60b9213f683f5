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
import functools
import math
from collections.abc import Callable

import torch

from .ggml import BLOCKS, CHUNK_ELEMENTS

QK_K = 256
# The scale searches' candidate grids taken at once, and their [rows, grids, values] temporaries' elements, on the
# CPU and on a GPU: the CPU goes a grid at a time over rows that stay near its caches; a GPU takes every grid of
# many rows at once, so that a small matrix (an MoE's expert) is a few hundred kernels, not a few thousand
GRIDS_AT_ONCE = (1, 32)
GRID_ELEMENTS = (1 << 20, 1 << 24)
CPU_CHUNK_ELEMENTS = 1 << 20  # values a CPU quantizes at a time (a GPU: CHUNK_ELEMENTS): their temporaries stay in
# its caches (28 M values in Q4_K on two cores: 1.46 s in chunks of 2^24, 0.79 s in chunks of 2^20)


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
    of values (7.4 GB of device memory for a 4 GB budget's q8_0 store, unchunked); a CPU goes CPU_CHUNK_ELEMENTS
    at a time."""
    elements, nbytes = BLOCKS[format]
    columns = importance is not None and importance.numel() != values.numel()  # one weight per column
    if columns and values.numel() % importance.numel():
        raise ValueError(f"{importance.numel()} importance weights do not repeat evenly over {values.numel()} values")
    period = math.lcm(elements, importance.numel()) if columns else elements
    chunk = CHUNK_ELEMENTS if values.device.type == "cuda" else min(CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS)
    step = max(chunk // period, 1) * period
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


def _in_row_chunks(search: Callable[..., tuple[torch.Tensor, ...]], grids: int,
                   *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`search` over `rows` (tensors [rows, n] of one row count) a chunk of rows at a time, its results
    concatenated: a chunk's [rows, grids at once (of `grids`), n] temporaries stay within GRID_ELEMENTS."""
    count, width = rows[0].shape
    on_gpu = rows[0].device.type == "cuda"
    chunk = max(GRID_ELEMENTS[on_gpu] // (width * min(GRIDS_AT_ONCE[on_gpu], grids)), 1)
    parts = [search(*(r[begin:begin + chunk] for r in rows)) for begin in range(0, count, chunk)]
    return tuple(torch.cat(column) for column in zip(*parts)) if len(parts) > 1 else parts[0]


def _over_grids(factors: torch.Tensor, values: torch.Tensor,
                codes_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                sums_of: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Each candidate grid's weighted sums [rows, grids], GRIDS_AT_ONCE grids at a time: `codes_of(factor, out)`
    writes the codes of the values [rows, 1, n] on grids `factor` [rows, g, 1] into `out` [rows, g, n], and
    `sums_of(codes, scratch)` gives their sums (each [rows, g]) using `scratch` (like `out`). The two buffers are
    reused from grid to grid: a fresh temporary a grid was a fresh mapping of memory on a CPU, which cost more
    than the arithmetic."""
    at_once = min(GRIDS_AT_ONCE[factors.device.type == "cuda"], factors.shape[1])
    buffers = torch.empty(2, values.shape[0], at_once, values.shape[2], device=values.device)
    parts = []
    for begin in range(0, factors.shape[1], at_once):
        factor = factors[:, begin:begin + at_once].unsqueeze(2)
        out, scratch = buffers[:, :, :factor.shape[1]]  # the last grids may be fewer
        parts.append(sums_of(codes_of(factor, out), scratch))
    return tuple(torch.cat(column, 1) for column in zip(*parts)) if len(parts) > 1 else parts[0]


def _first_best(candidates: torch.Tensor, valid: torch.Tensor, lowest: bool) -> torch.Tensor:
    """Per row of `candidates` [rows, k], the index [rows, 1] of the first lowest (else highest) valid one, as a
    sequential search that replaces its best only when strictly better does: column 0 (the starting point) always
    counts, and a NaN never wins over it."""
    worst = math.inf if lowest else -math.inf
    scored = torch.where(valid & ~candidates.isnan(), candidates, torch.full_like(candidates, worst))
    scored[:, 0] = torch.where(candidates[:, 0].isnan(), -worst, candidates[:, 0])  # a NaN start stays
    return (scored.argmin(1) if lowest else scored.argmax(1)).unsqueeze(1)


def _scale_min_search(x: torch.Tensor, weights: torch.Tensor, nmax: int, steps: int = 20, rmin: float = -1.0,
                      rdelta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qkx2_quants for rows of `x` [rows, n]: the scale and minimum (x ~ scale * code - minimum,
    codes in 0..nmax) minimizing the weighted squared error over candidate grids. Each grid's error comes from the
    weighted sums its fit needs (sum w (s l + m - x)^2 expanded), not from another pass over the values; the fits
    and the choice are made for all grids at once."""
    grids = torch.tensor([nmax] + [rmin + rdelta * step + nmax for step in range(steps + 1)], device=x.device)
    return _in_row_chunks(functools.partial(_scale_min_rows, nmax=nmax, grids=grids), len(grids), x, weights)


def _scale_min_rows(x: torch.Tensor, weights: torch.Tensor, nmax: int,
                    grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low = x.amin(1, keepdim=True).clamp(max=0)
    high = x.amax(1, keepdim=True)
    span = (high - low).clamp(min=1e-30)
    sum_w, sum_x = weights.sum(1, keepdim=True), (weights * x).sum(1, keepdim=True)
    sum_x2 = (weights * x * x).sum(1, keepdim=True)
    shifted, weights, x = (x - low).unsqueeze(1), weights.unsqueeze(1), x.unsqueeze(1)

    def codes(factor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mul(shifted, factor, out=out).round_().clamp_(0, nmax)

    def sums(codes: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weighted = torch.mul(weights, codes, out=scratch)  # then l, l², x l (the codes are not needed after l²)
        return weighted.sum(2), codes.mul_(weighted).sum(2), weighted.mul_(x).sum(2)
    sum_l, sum_l2, sum_xl = _over_grids(span.reciprocal() * grids, shifted, codes, sums)

    def error(scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        return (scale * scale * sum_l2 + 2 * scale * minimum * sum_l + minimum * minimum * sum_w
                - 2 * scale * sum_xl - 2 * minimum * sum_x + sum_x2)

    # each grid's least-squares fit (the first grid's candidate: the span's own scale and minimum, unfitted)
    det = sum_w * sum_l2 - sum_l * sum_l
    safe = torch.where(det > 0, det, torch.ones_like(det))
    scale = (sum_w * sum_xl - sum_x * sum_l) / safe
    minimum = (sum_l2 * sum_x - sum_l * sum_xl) / safe
    positive = minimum > 0  # the minimum may not be above zero: fit the scale alone
    scale = torch.where(positive, sum_xl / sum_l2.clamp(min=1e-30), scale)
    minimum = torch.where(positive, torch.zeros_like(minimum), minimum)
    scale[:, :1], minimum[:, :1] = span / nmax, low
    best = _first_best(error(scale, minimum), det > 0, lowest=True)
    scale, minimum = scale.gather(1, best), minimum.gather(1, best)
    return torch.where(high == low, torch.zeros_like(scale), scale), -minimum


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
    weights = x * x if importance is None else x * x * importance
    levels = torch.tensor([-(nmax + 0.1 * step) for step in range(-9, 10)], device=x.device)
    search = functools.partial(_symmetric_rows, nmax=nmax, levels=levels)
    return _in_row_chunks(search, len(levels), x, weights)[0].view(-1)


def _symmetric_rows(x: torch.Tensor, weights: torch.Tensor, nmax: int, levels: torch.Tensor) -> tuple[torch.Tensor]:
    index = x.abs().argmax(1, keepdim=True)
    peak = x.gather(1, index)
    safe_peak = torch.where(peak != 0, peak, torch.ones_like(peak))
    weighted_x, weights, values = (weights * x).unsqueeze(1), weights.unsqueeze(1), x.unsqueeze(1)

    def codes(inverse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mul(inverse, values, out=out).round_().clamp_(-nmax, nmax - 1)

    def sums(codes: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x l, l²
        sum_lx = torch.mul(weighted_x, codes, out=scratch).sum(2)
        return sum_lx, torch.mul(weights, codes, out=scratch).mul_(codes).sum(2)
    sum_lx, sum_l2 = _over_grids(safe_peak.reciprocal() * levels, values, codes, sums)
    scale = sum_lx / sum_l2.clamp(min=1e-30)
    # a first column for the start: scale 0, gain -1 (any grid that fits beats it)
    scale = torch.cat([torch.zeros_like(peak), scale], 1)
    gain = torch.cat([torch.full_like(peak, -1.0), scale[:, 1:] * sum_lx], 1)
    valid = torch.cat([torch.ones_like(peak, dtype=torch.bool), sum_l2 > 0], 1)
    best = scale.gather(1, _first_best(gain, valid, lowest=False))
    return (torch.where(peak != 0, best, torch.zeros_like(best)),)


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
