"""Quantizing into GGML's block formats (the inverse of ggml.py): tierstore's own 4-, 6- and 8-bit compression.

The k-quants follow llama.cpp's reference quantizers (`quantize_row_q4_K_ref`, `quantize_row_q6_K_ref`), data-free:
- Q4_K: super-blocks of 256 in 8 sub-blocks of 32, each with a scale and a minimum found by a weighted
  least-squares search over 21 candidate grids (`make_qkx2_quants`), both then quantized to 6 bits against the
  super-block's float16 scale and minimum: 4.5 bits a weight;
- Q6_K: 16 sub-blocks of 16, symmetric 6-bit codes, each sub-block's scale searched over 19 grids
  (`make_qx_quants`) and stored as int8 against a float16 super-scale: 6.5625 bits;
- Q8_0: blocks of 32, symmetric 8-bit against a float16 scale: 8.5 bits.
Given an importance per weight (the mean square of the input each weight multiplies, measured over a calibration
text: llama.cpp's importance matrix), the searches weigh each weight's error by it, so that the weights that move the
output most are kept closest. Everything is vectorised over blocks, so a 7B layer quantizes in well under a second
on a GPU. The blocks are the same bytes a GGUF would hold: ggml.py (and the `gguf` package) dequantize them.
"""
from __future__ import annotations

import torch

QK_K = 256


def quantize(format: str, values: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """`values` (any float dtype, 1-D, a whole number of blocks) as `format`'s blocks: uint8, on the same device.
    `importance`: one non-negative weight per value (None: all equal)."""
    x = values.float().reshape(-1)
    weight = None if importance is None else importance.float().reshape(-1).to(x.device)
    return _QUANTIZE[format](x, weight)


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [n] -> its float16 bytes [n, 2]."""
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _q8_0(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:  # its one scale needs no search
    blocks = x.view(-1, 32)
    d = blocks.abs().amax(1) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inverse[:, None]).clamp(-127, 127).to(torch.int8).view(torch.uint8)
    return torch.cat([_half_bytes(d), q], 1).reshape(-1)


def _scale_min_search(x: torch.Tensor, weights: torch.Tensor, nmax: int, steps: int = 20, rmin: float = -1.0,
                      rdelta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qkx2_quants for rows of `x` [rows, n]: codes in 0..nmax, scale and minimum (x ~ scale * code
    - minimum), minimizing the weighted squared error over candidate grids."""
    low = x.amin(1, keepdim=True).clamp(max=0)
    high = x.amax(1, keepdim=True)
    span = (high - low).clamp(min=1e-30)
    codes = torch.round((x - low) * (nmax / span)).clamp(0, nmax)
    scale, minimum = span / nmax, low
    best = (weights * (scale * codes + minimum - x) ** 2).sum(1, keepdim=True)
    sum_w, sum_x = weights.sum(1, keepdim=True), (weights * x).sum(1, keepdim=True)
    for step in range(steps + 1):
        trial = torch.round((x - low) * ((rmin + rdelta * step + nmax) / span)).clamp(0, nmax)
        sum_l, sum_l2 = (weights * trial).sum(1, keepdim=True), (weights * trial * trial).sum(1, keepdim=True)
        sum_xl = (weights * trial * x).sum(1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(det > 0, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0  # the minimum may not be above zero: fit the scale alone
        this_scale = torch.where(positive, sum_xl / sum_l2.clamp(min=1e-30), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        error = (weights * (this_scale * trial + this_min - x) ** 2).sum(1, keepdim=True)
        better = (det > 0) & (error < best)
        codes = torch.where(better, trial, codes)
        scale, minimum = torch.where(better, this_scale, scale), torch.where(better, this_min, minimum)
        best = torch.where(better, error, best)
    flat = high == low
    return codes, torch.where(flat, torch.zeros_like(scale), scale), -minimum


def _q4_k(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    sub = x.view(-1, 32)
    n = sub.shape[0] // 8
    if importance is None:
        weights = (sub.pow(2).mean(1, keepdim=True)).sqrt() + sub.abs()
    else:  # llama.cpp's weighting with an importance matrix
        weights = importance.view(-1, 32) * (sub.pow(2).mean(1, keepdim=True) + sub * sub).sqrt()
    _, scales, mins = _scale_min_search(sub, weights, 15)
    scales, mins = scales.view(n, 8), mins.view(n, 8)
    max_scale, max_min = scales.amax(1, keepdim=True), mins.amax(1, keepdim=True)
    ls = torch.round(scales * torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))).clamp(0, 63)
    lm = torch.round(mins * torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))).clamp(0, 63)
    d = (max_scale / 63).to(torch.float16).float()
    dmin = (max_min / 63).to(torch.float16).float()
    step, offset = (d * ls).view(-1, 1), (dmin * lm).view(-1, 1)  # what the dequantizer will use, per sub-block
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.where(step > 0, torch.round((sub + offset) / safe).clamp(0, 15), torch.zeros_like(sub))
    codes = codes.to(torch.uint8).view(n, 4, 2, 32)
    qs = (codes[:, :, 0] | (codes[:, :, 1] << 4)).view(n, 128)
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    packed = torch.empty(n, 12, dtype=torch.uint8, device=x.device)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat([_half_bytes(d), _half_bytes(dmin), packed, qs], 1).reshape(-1)


def _symmetric_search(x: torch.Tensor, nmax: int, importance: torch.Tensor | None) -> torch.Tensor:
    """llama.cpp's make_qx_quants (rmse_type 1) for rows of `x`: the scale of codes in -nmax..nmax-1 minimizing
    the squared error weighted by x² (times the importance, when given), searched over 19 grids."""
    index = x.abs().argmax(1, keepdim=True)
    peak = x.gather(1, index)
    safe_peak = torch.where(peak != 0, peak, torch.ones_like(peak))
    weights = x * x if importance is None else x * x * importance
    best_scale = torch.zeros_like(peak)
    best = torch.full_like(peak, -1.0)
    for step in range(-9, 10):
        inverse = -(nmax + 0.1 * step) / safe_peak
        codes = torch.round(inverse * x).clamp(-nmax, nmax - 1)
        sum_lx, sum_l2 = (weights * x * codes).sum(1, keepdim=True), (weights * codes * codes).sum(1, keepdim=True)
        scale = sum_lx / sum_l2.clamp(min=1e-30)
        gain = scale * sum_lx
        better = (sum_l2 > 0) & (gain > best)
        best_scale, best = torch.where(better, scale, best_scale), torch.where(better, gain, best)
    return torch.where(peak != 0, best_scale, torch.zeros_like(best_scale)).view(-1)


def _q6_k(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    sub = x.view(-1, 16)
    n = sub.shape[0] // 16
    scales = _symmetric_search(sub, 32, None if importance is None else importance.view(-1, 16)).view(n, 16)
    index = scales.abs().argmax(1, keepdim=True)
    max_scale = scales.gather(1, index)
    inverse = torch.where(max_scale != 0, -128 / max_scale, torch.zeros_like(max_scale))
    d = torch.where(max_scale != 0, 1 / inverse, torch.zeros_like(max_scale)).to(torch.float16).float()
    small = torch.round(inverse * scales).clamp(max=127).to(torch.int8)
    step = (d * small.float()).view(-1, 1)
    safe = torch.where(step != 0, step, torch.ones_like(step))
    codes = torch.where(step != 0, torch.round(sub / safe).clamp(-32, 31), torch.zeros_like(sub)) + 32
    codes = codes.to(torch.uint8).view(n, 256)
    low = (codes & 0x0F).view(n, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).view(n, 128)
    high = (codes >> 4).view(n, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).view(n, 64)
    return torch.cat([ql, qh, small.view(torch.uint8), _half_bytes(d)], 1).reshape(-1)


_QUANTIZE = {"Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k}
FORMATS = tuple(_QUANTIZE)
