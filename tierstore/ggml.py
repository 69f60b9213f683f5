"""GGML's quantized block formats (what GGUF files hold), dequantized with torch ops on whatever device the bytes are.

Each format packs a matrix row by row in blocks of 32 or 256 elements, with the block's scales inside it, so a
quantized matrix keeps its file's bytes in every tier and is expanded only where it computes. The arithmetic follows
the `gguf` package's reference dequantizers step by step in float32, so the values are the same bits as
transformers' own dequantized load (tests/test_ggml.py checks every format against them on random blocks). Only the
last cast goes to the compute dtype. On a GPU the k-quants run Triton kernels written for their layout
(ggml_triton.py), and the other formats' steps are compiled into one kernel each (torch.compile), so a matrix is read
once and written once; where either fails, the next one down runs: compiled, then one op at a time.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

QK_K = 256
# format -> (elements per block, bytes per block); the `gguf` package's GGML_QUANT_SIZES for the formats here
BLOCKS: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "IQ4_NL": (32, 18), "IQ4_XS": (256, 136),
}
# where each format keeps its block's float16 scales (and minimums); the rest is codes and packed sub-scales
HALF_SCALES: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82), "Q3_K": (108,),
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,),
}
# the formats ggml_triton.py multiplies in their blocks (its MATVEC_VALUES; a test keeps the two alike)
MATVEC_FORMATS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# the matrix-vector kernel: "values" (ggml_triton: each weight's value, then its product), or "dots" (ggml_dots, an
# experiment: Q4_K and Q2_K codes times inputs summed by sub-block, where its words are aligned; the rest as
# "values"; on an H100 faster only for dense Q4_K, 1.16x). Benchmarks set it to compare the two in a model's steps.
MATVEC_KERNEL = "values"
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def packed_bytes(format: str, numel: int) -> int:
    """Bytes of `numel` elements in `format` (a whole number of blocks)."""
    elements, nbytes = BLOCKS[format]
    if numel % elements:
        raise ValueError(f"{format} packs {elements} elements a block; {numel} is not a multiple")
    return numel // elements * nbytes


def bits_per_weight(format: str) -> float:
    elements, nbytes = BLOCKS[format]
    return 8 * nbytes / elements


def dequantize(format: str, packed: torch.Tensor, out: torch.Tensor) -> None:
    """Fill `out` (1-D, contiguous, any float dtype, on `packed`'s device) with the elements the uint8 `packed`
    holds: on a GPU in one kernel (no temporaries), elsewhere one op at a time in chunks."""
    if packed.is_cuda and (_dequantize_triton(format, packed, out) or dequantize_compiled(format, packed, out)):
        return
    dequantize_eager(format, packed, out)


def dequantize_compiled(format: str, packed: torch.Tensor, out: torch.Tensor) -> bool:
    """`dequantize` by `format`'s steps compiled into one kernel, CHUNK_ELEMENTS at a time: the compiled function
    may write `out` through a result of its own and keep intermediates, each as large as its call (a whole MoE
    layer's experts are hundreds of millions of elements); False (and a warning, once) where compiling fails."""
    elements, nbytes = BLOCKS[format]
    blocks, target = packed.view(-1, nbytes), out.view(-1, elements)
    fused = _fused(format)
    if fused is None:
        return False
    step = CHUNK_ELEMENTS // elements
    try:
        for first in range(0, blocks.shape[0], step):
            part, into = blocks[first:first + step], target[first:first + step]
            torch._dynamo.maybe_mark_dynamic(part, 0)  # the block count varies; a block's layout does not
            torch._dynamo.maybe_mark_dynamic(into, 0)
            fused(part, into)
        return True
    except Exception as exc:  # noqa: BLE001 (a compiler failure of any kind): run the ops one at a time
        log.warning("dequantizing %s: torch.compile failed (%s); running its ops one at a time",
                    format, type(exc).__name__)
        _FUSED[format] = None
        return False


def _dequantize_triton(format: str, packed: torch.Tensor, out: torch.Tensor) -> bool:
    """`dequantize` by the format's Triton kernel; False where it has none, or Triton fails (a warning, once)."""
    if format in _NO_TRITON:
        return False
    try:
        from .ggml_triton import FORMATS, dequantize as dequantize_triton
    except ImportError:  # a build of torch without Triton
        _NO_TRITON.update(BLOCKS)
        return False
    if format not in FORMATS:
        _NO_TRITON.add(format)
        return False
    elements, nbytes = BLOCKS[format]
    try:
        dequantize_triton(format, packed.view(-1, nbytes), out.view(-1, elements))
        return True
    except Exception as exc:  # noqa: BLE001 (a compiler or launch failure of any kind): compile the steps instead
        log.warning("dequantizing %s: its Triton kernel failed (%s: %s); compiling its steps instead",
                    format, type(exc).__name__, exc)
        _NO_TRITON.add(format)
        return False


def multiplies_packed(format: str, columns: int) -> bool:
    """Whether `matvec` can multiply a matrix of `format` whose rows are `columns` long on a GPU: a format with a
    Triton kernel for it (the k-quants and the legacy ones), its rows whole blocks, and that kernel not found
    failing."""
    return format in MATVEC_FORMATS and columns % BLOCKS[format][0] == 0 and format not in _NO_MATVEC


def matvec(format: str, packed: torch.Tensor, x: torch.Tensor, out: torch.Tensor, grouped: bool = False,
           offsets: torch.Tensor | None = None, offsets_align: int = 1) -> bool:
    """out [tokens, rows] = x [tokens, columns] times the transposed matrix that `packed` holds in `format` (rows
    of whole blocks), on a GPU by the format's Triton kernel, reading the packed bytes only; False where Triton is
    missing or fails (a warning, once: the caller dequantizes instead). `grouped`: `packed` holds one matrix per
    row of x back to back, each multiplied by its own row (ggml_triton.matvec_grouped: experts gathered), or with
    `offsets` (int64, a row of x each; multiples of `offsets_align`) matrix g starts `offsets[g]` bytes into
    `packed` (bytes, 1-D)."""
    if not multiplies_packed(format, x.shape[-1]):
        return False
    try:
        single, several = _matvec_kernels(format, packed, offsets_align if offsets is not None else None)
        if offsets is not None:
            several(format, packed, x, out, offsets, offsets_align)
        else:
            (several if grouped else single)(format, packed.view(-1, BLOCKS[format][1]), x, out)
        return True
    except Exception as exc:  # noqa: BLE001 (an import, compiler or launch failure of any kind): dequantize instead
        log.warning("multiplying %s in its blocks: its Triton kernel failed (%s: %s); dequantizing instead",
                    format, type(exc).__name__, exc)
        _NO_MATVEC.add(format)
        return False


def _matvec_kernels(format: str, packed: torch.Tensor, offsets_align: int | None) -> tuple[Callable, Callable]:
    """The matrix-vector kernel's (matvec, matvec_grouped) for these blocks: MATVEC_KERNEL's where it takes them."""
    if MATVEC_KERNEL == "dots":
        from .ggml_dots import matvec, matvec_grouped, takes
        if takes(format, packed, offsets_align):
            return matvec, matvec_grouped
    from .ggml_triton import matvec, matvec_grouped
    return matvec, matvec_grouped


def dequantize_eager(format: str, packed: torch.Tensor, out: torch.Tensor) -> None:
    """`dequantize` one op at a time, CHUNK_ELEMENTS at a time so that no step's temporaries outgrow a few tens of
    MB (what a CPU runs; a benchmark's baseline on a GPU)."""
    elements, nbytes = BLOCKS[format]
    blocks, target = packed.view(-1, nbytes), out.view(-1, elements)
    step = CHUNK_ELEMENTS // elements
    for first in range(0, blocks.shape[0], step):
        _DEQUANTIZE[format](blocks[first:first + step], target[first:first + step])


CHUNK_ELEMENTS = 1 << 24
_FUSED: dict[str, Callable[[torch.Tensor, torch.Tensor], None] | None] = {}
_NO_TRITON: set[str] = set()  # formats without a Triton kernel here, or whose kernel failed
_NO_MATVEC: set[str] = set()  # formats whose matrix-vector kernel failed


def _fused(format: str) -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """`format`'s dequantization and cast compiled into one kernel on first use (None once that failed). Each
    format is its own function, so each is compiled (and guarded) on its own."""
    if format not in _FUSED:
        _FUSED[format] = torch.compile(_DEQUANTIZE[format], fullgraph=True)
    return _FUSED[format]


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at bytes start..start+2 of each block, as float32 [blocks, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _shifts(values: tuple[int, ...], device: torch.device, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device).view(shape)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Low nibbles of each `group` bytes, then their high nibbles: [blocks, 2 * qs bytes], uint8."""
    n = qs.shape[0]
    return ((qs.reshape(n, -1, 1, group) >> _shifts((0, 4), qs.device, (1, 1, 2, 1))) & 0x0F).reshape(n, -1)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """Bit i of the little-endian bit string `qh` [blocks, count // 8] at position i: [blocks, count], uint8."""
    n = qh.shape[0]
    return ((qh.reshape(n, -1, 1) >> _shifts(tuple(range(8)), qh.device, (1, 1, 8))) & 1).reshape(n, count)


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_f16(b, 0) * (_nibbles(b[:, 2:], 16).to(torch.int8) - 8).float())


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_f16(b, 0) * _nibbles(b[:, 4:], 16).float() + _f16(b, 2))


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 6:], 16) | (_bits(b[:, 2:6], 32) << 4)
    out.copy_(_f16(b, 0) * (q.to(torch.int8) - 16).float())


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 8:], 16) | (_bits(b[:, 4:8], 32) << 4)
    out.copy_(_f16(b, 0) * q.float() + _f16(b, 2))


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0))


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = (qs.reshape(n, -1, 1, 32) >> _shifts((0, 2, 4, 6), b.device, (1, 1, 4, 1))) & 3
    out.copy_((dl * q.reshape(n, 16, 16).float() - ml).reshape(n, QK_K))


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b, 108)
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts((0, 4), b.device, (1, 2, 1))).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts((0, 2, 4, 6), b.device, (1, 4, 1))).reshape(n, 16)
    scale = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * scale.float()).view(n, 16, 1)
    ql = ((qs.reshape(n, -1, 1, 32) >> _shifts((0, 2, 4, 6), b.device, (1, 1, 4, 1))) & 3).reshape(n, 16, 16)
    qh = ((hmask.reshape(n, 1, 1, 32) >> _shifts(tuple(range(8)), b.device, (1, 1, 8, 1))) & 1).reshape(n, 16, 16)
    q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)
    out.copy_((dl * q.float()).reshape(n, QK_K))


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's eight 6-bit scales and minimums packed in 12 bytes."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).view(n, -1, 1)
    dm = (_f16(b, 2) * mn.float()).view(n, -1, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, -1, 32).float()
    out.copy_((d * q - dm).reshape(n, QK_K))


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).view(n, -1, 1)
    dm = (_f16(b, 2) * mn.float()).view(n, -1, 1)
    qh = ((b[:, 16:48].reshape(n, 1, 1, 32) >> _shifts(tuple(range(8)), b.device, (1, 1, 8, 1))) & 1).reshape(n, 8, 32)
    q = (_nibbles(b[:, 48:], 32).reshape(n, 8, 32) | (qh << 4)).float()
    out.copy_((d * q - dm).reshape(n, QK_K))


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = (_f16(b, 208) * scales.contiguous().view(torch.int8).float()).view(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, 8, 32)
    high = ((qh.reshape(n, -1, 1, 32) >> _shifts((0, 2, 4, 6), b.device, (1, 1, 4, 1))) & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    out.copy_((d * q).reshape(n, QK_K))


def _iq4_nl(b: torch.Tensor, out: torch.Tensor) -> None:
    values = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=b.device)
    out.copy_(_f16(b, 0) * values[_nibbles(b[:, 2:], 16).long()])


def _iq4_xs(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    high = ((b[:, 2:4].reshape(n, 2, 1) >> _shifts((0, 2, 4, 6), b.device, (1, 1, 4))) & 0x03).reshape(n, 8)
    low = ((b[:, 4:8].reshape(n, 4, 1) >> _shifts((0, 4), b.device, (1, 1, 2))) & 0x0F).reshape(n, 8)
    dl = (_f16(b, 0) * ((low | (high << 4)).to(torch.int8) - 32).float()).view(n, 8, 1)
    values = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=b.device)
    q = values[_nibbles(b[:, 8:], 16).long()].reshape(n, 8, 32)
    out.copy_((dl * q).reshape(n, QK_K))


_DEQUANTIZE: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q2_K": _q2_k, "Q3_K": _q3_k,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs,
}
