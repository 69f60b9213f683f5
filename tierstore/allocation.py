"""Mixed precision: a block format per matrix, chosen by measured sensitivity to meet a bits-per-weight target.

Each matrix is quantized in every candidate format from the target's floor up (below it none is ever chosen) and
its error measured relative to its output: the squared weight error of column j weighed by the mean square of
input feature j (the importance matrix, importance.py; without a calibration text every feature weighs 1), over
the same sum for the weights themselves. Times the
matrix's sensitivity (the KL divergence of the model's next-token distribution per unit of relative error added
to that matrix's output, measured over the calibration text: importance.py), that predicts what quantizing it
costs, as HIGGS' linearity theorem has it. That holds for small errors, and the step down from the format the
target affords (Q4_K at 4.5 bits) is not small: measured on SmolLM2, a 4.5-bit mix that put 16 matrices in Q3_K to
pay for upgrades elsewhere lost 1.8 points of top-1 against Q4_K everywhere. So every matrix starts at the largest
format within the target (the floor) and upgrades, one step at a time, the matrix whose predicted cost falls
most per bit it adds (over the lower convex hull of its formats' (bits, cost) points), while the total stays within
`bits` per weight: the greedy solution of the knapsack that HIGGS' dynamic programming and llama.cpp's
`--target-bpw` solve. Pure bookkeeping beside the quantizers; data comes in as tensors.
"""
from __future__ import annotations

import heapq
from collections.abc import Mapping

import torch

from .errors import ConfigError
from .ggml import BLOCKS, dequantize
from .ggml import bits_per_weight as format_bits
from .ggml_quantize import quantize

SENSITIVITY = ":sensitivity"  # a matrix's name + this, beside its importance: KL per relative error (importance.py)
CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")  # the formats tierstore writes, fewest bits first
LOWEST_BITS, HIGHEST_BITS = format_bits(CANDIDATES[0]), format_bits(CANDIDATES[-1])


def candidates(numel: int, bits: float | None = None) -> tuple[str, ...]:
    """The candidate formats a matrix of `numel` elements fills with whole blocks; with a target of `bits` per
    weight, only those from its floor up (the allocation never goes below the floor: see above)."""
    least = floor(bits) if bits is not None else 0.0
    return tuple(format for format in CANDIDATES if numel % BLOCKS[format][0] == 0 and format_bits(format) >= least)


def floor(bits: float) -> float:
    """The bits per weight of the largest candidate format within `bits` (every matrix starts there)."""
    return max((format_bits(format) for format in CANDIDATES if format_bits(format) <= bits), default=0.0)


def matrix_errors(weight: torch.Tensor, importance: torch.Tensor | None, bits: float | None = None) -> dict[str, float]:
    """Each candidate format's importance-weighted squared error of `weight` (rows, columns), quantized with that
    importance as the quantizers weigh it (column j's importance on every row)."""
    flat = weight.float().reshape(-1)
    columns = weight.shape[-1]
    feature = importance.float().to(flat.device) if importance is not None and importance.numel() == columns \
        else torch.ones(columns, device=flat.device)
    weights = feature.repeat(flat.numel() // columns)
    energy = float((flat ** 2 * weights).sum()) or 1.0  # the output's expected square: errors are relative to it
    errors = {}
    for format in candidates(flat.numel(), bits):
        restored = torch.empty_like(flat)
        dequantize(format, quantize(format, flat, weights if importance is not None else None), restored)
        errors[format] = float(((restored - flat) ** 2 * weights).sum()) / energy
    return errors


def allocate(errors: Mapping[str, Mapping[str, float]], numel: Mapping[str, int], bits: float) -> dict[str, str]:
    """The format of each matrix (name -> its formats' errors, its element count) with the least total error whose
    stored bits per weight stay within `bits`, none below the floor (the largest candidate within `bits`) where
    it has a choice. ConfigError when `bits` is below what the smallest formats take."""
    least = floor(bits)
    hulls = {name: _lower_hull({format: error for format, error in by_format.items()
                                if format_bits(format) >= least} or by_format)
             for name, by_format in errors.items()}
    chosen = {name: 0 for name in hulls}  # index into each hull
    spent = sum(format_bits(hulls[name][0][0]) * numel[name] for name in hulls)
    total = sum(numel[name] for name in hulls)
    if spent > bits * total * (1 + 1e-9):
        raise ConfigError(f"compression.bits = {bits}: the smallest formats already take {spent / total:.2f} bits "
                          f"per weight here")
    upgrades = [_upgrade(name, 0, hulls[name], numel[name]) for name in hulls]
    heap = [item for item in upgrades if item is not None]
    heapq.heapify(heap)
    while heap:
        _, name, step, cost = heapq.heappop(heap)
        if step != chosen[name] or spent + cost > bits * total:
            continue  # stale, or too dear: a cheaper upgrade of another matrix may still fit
        spent += cost
        chosen[name] = step + 1
        following = _upgrade(name, step + 1, hulls[name], numel[name])
        if following is not None:
            heapq.heappush(heap, following)
    return {name: hulls[name][index][0] for name, index in chosen.items()}


def _lower_hull(by_format: Mapping[str, float]) -> list[tuple[str, float]]:
    """The formats on the lower convex hull of (bits, error), fewest bits first: a format that costs more bits for
    less than the slope to a dearer one is never worth stopping at."""
    points = sorted(by_format.items(), key=lambda item: format_bits(item[0]))
    hull: list[tuple[str, float]] = []
    for format, error in points:
        if hull and error >= hull[-1][1]:
            continue  # more bits, no less error
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], (format, error)):
            hull.pop()  # the middle one gains less per bit than going straight on
        hull.append((format, error))
    return hull


def _slope(a: tuple[str, float], b: tuple[str, float]) -> float:
    """Error removed per bit per weight going from format a to format b."""
    return (a[1] - b[1]) / (format_bits(b[0]) - format_bits(a[0]))


def _upgrade(name: str, step: int, hull: list[tuple[str, float]], numel: int) -> tuple[float, str, int, float] | None:
    """The heap entry for moving `name` from hull point `step` to the next: (minus error removed per bit, name,
    step, bits it adds)."""
    if step + 1 >= len(hull):
        return None
    return (-_slope(hull[step], hull[step + 1]) / numel, name, step,
            (format_bits(hull[step + 1][0]) - format_bits(hull[step][0])) * numel)
