"""GPTQ onto GGML's grids: a matrix's codes chosen column by column, each column's rounding error folded into the
columns not yet rounded (Frantar et al., "GPTQ", 2023, the method only; written here).

A linear's output error for inputs x is (W - Q) x, so over a calibration text the loss to keep small is
tr((W - Q) H (W - Q)^T) with H = sum of x x^T, the inputs' second moment. Rounding one column alone ignores how
the inputs correlate; GPTQ rounds column j, then moves the columns after it by the error times H^-1's row j, which
is the least-squares correction for the columns still free. The grid (each sub-block's scale and offset) is the
format's own, searched once on the matrix as the data-free quantizer would search it with the importance H's
diagonal gives (`ggml_quantize.grid`), so the blocks written are ordinary GGML blocks: any dequantizer reads them,
and the bits per weight are the format's. Columns go in order of falling importance (GPTQ's "act order"): the
columns whose inputs are largest are rounded first, while every other column can still absorb their error.
"""
from __future__ import annotations

import torch

from .ggml import dequantize
from .ggml_quantize import grid

DAMPING = 0.1  # added to H's diagonal, as a fraction of its mean: with a few thousand calibration tokens, H is
# estimated poorly and GPTQ fits the calibration text (SmolLM2, 1.5k tokens: 0.01 lost to nearest rounding, 0.1
# to 0.3 gained; RESULTS.md)
COLUMNS_PER_BATCH = 128  # columns rounded before their error reaches the rest (GPTQ's lazy batch updates)


def quantize_gptq(format: str, weight: torch.Tensor, hessian: torch.Tensor, damping: float = DAMPING,
                  act_order: bool = True) -> torch.Tensor:
    """`weight` [rows, columns] as `format`'s blocks (uint8, 1-D, on weight's device), its codes chosen by GPTQ
    for inputs whose second moment is `hessian` [columns, columns] (any positive multiple of it)."""
    rows, columns = weight.shape
    if hessian.shape != (columns, columns):
        raise ValueError(f"hessian is {tuple(hessian.shape)}; a matrix of {columns} columns needs "
                         f"({columns}, {columns})")
    w = weight.float()
    h = hessian.to(w.device, torch.float32).clone()
    diagonal = h.diagonal()
    unseen = diagonal <= 0
    diagonal[unseen] = 1  # an input never seen: its column is rounded plainly, no other column leans on it
    importance = diagonal / diagonal.mean()
    found = grid(format, w.reshape(-1), importance.repeat(rows))
    step = found.step.expand(-1, found.sub).reshape(rows, columns)
    offset = found.offset.expand(-1, found.sub).reshape(rows, columns)
    order = torch.argsort(diagonal, descending=True) if act_order else torch.arange(columns, device=w.device)
    h = h[order][:, order]
    h.diagonal().add_(damping * float(h.diagonal().mean()))
    upper = _inverse_cholesky(h)
    # the columns in order, as rows of the transposes (each a fresh copy: `w` is changed in the loop)
    codes = _round_columns(w.t()[order], upper, step.t()[order], offset.t()[order], found.low, found.high)
    return found.pack(codes[torch.argsort(order)].t().reshape(-1, found.sub))


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1, whose row j holds what rounding column j does to the later columns."""
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _round_columns(w: torch.Tensor, upper: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, low: int,
                   high: int) -> torch.Tensor:
    """GPTQ's loop over the columns of a matrix given as its transposes `w`, `step`, `offset` [columns, rows]
    (`w` changed in place): codes [columns, rows] as floats. A column is a contiguous row, each step written in
    place: a column is about ten small kernels, and the rank-1 update of the batch's later columns one (`addr_`),
    with no temporaries."""
    columns = w.shape[0]
    flat = step == 0
    safe = torch.where(flat, torch.ones_like(step), step)
    codes = torch.empty_like(w)
    for first in range(0, columns, COLUMNS_PER_BATCH):
        last = min(first + COLUMNS_PER_BATCH, columns)
        errors = torch.empty(last - first, w.shape[1], device=w.device)
        for j in range(first, last):
            code = torch.add(w[j], offset[j], out=codes[j]).div_(safe[j]).round_().clamp_(low, high)
            code.masked_fill_(flat[j], 0)
            # (w - (code * step - offset)) / upper[j, j]: the column's error, leaned on by the later columns
            error = torch.mul(code, step[j], out=errors[j - first]).sub_(offset[j]).neg_().add_(w[j])
            error.div_(upper[j, j])
            w[j + 1:last].addr_(upper[j, j + 1:last], error, alpha=-1)
        w[last:].addmm_(upper[first:last, last:].t(), errors, alpha=-1)
    return codes


def blocks_key(name: str, format: str) -> str:
    """Where a calibration's results keep matrix `name`'s GPTQ blocks in `format` (uint8, 1-D)."""
    return f"{name}:gptq:{format}"


def error_key(name: str, format: str) -> str:
    """Where they keep those blocks' relative output error (a 0-d float32 tensor, `output_error`)."""
    return f"{name}:gptq-error:{format}"


def output_error(format: str, blocks: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """The squared output error of `blocks` against `weight` [rows, columns] over inputs of second moment
    `hessian`, relative to the output's own: tr(D H D^T) / tr(W H W^T), D the dequantized blocks minus W."""
    w = weight.float()
    h = hessian.to(w.device, torch.float32)
    restored = torch.empty(w.numel(), device=w.device)
    dequantize(format, blocks.to(w.device), restored)
    difference = restored.view_as(w) - w
    energy = float(((w @ h) * w).sum()) or 1.0
    return float(((difference @ h) * difference).sum()) / energy
