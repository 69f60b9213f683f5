"""GGUF's quantized formats dequantized by tierstore's torch code give the `gguf` package's reference values, bit for
bit, for every block layout."""
import math

import numpy as np
import pytest
import torch

from tierstore import ggml

gguf = pytest.importorskip("gguf")  # a test dependency: pyproject's [test] extra installs it


def random_blocks(format: str, blocks: int, seed: int = 0) -> np.ndarray:
    """Random codes with finite random float16 scales."""
    rng = np.random.default_rng(seed)
    _, nbytes = ggml.BLOCKS[format]
    data = rng.integers(0, 256, size=(blocks, nbytes), dtype=np.uint8)
    for start in ggml.HALF_SCALES[format]:
        data[:, start:start + 2] = rng.normal(0, 0.05, size=(blocks, 1)).astype(np.float16).view(np.uint8)
    return data


@pytest.mark.parametrize("format", sorted(ggml.BLOCKS))
def test_every_format_matches_the_gguf_reference_bit_for_bit(format):
    assert ggml.BLOCKS[format] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[format]]
    data = random_blocks(format, 64)
    want = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[format]).reshape(-1)
    out = torch.empty(want.size, dtype=torch.float32)
    ggml.dequantize(format, torch.from_numpy(data).reshape(-1), out)
    assert torch.equal(out, torch.from_numpy(want))
    half = torch.empty(want.size, dtype=torch.bfloat16)  # the compute dtype's copy is the float32 values, cast
    ggml.dequantize(format, torch.from_numpy(data).reshape(-1), half)
    assert torch.equal(half, torch.from_numpy(want).to(torch.bfloat16))


def test_sizes_and_bits_per_weight():
    assert ggml.packed_bytes("Q4_K", 512) == 288 and ggml.bits_per_weight("Q4_K") == 4.5
    assert ggml.bits_per_weight("Q4_1") == 5.0 and ggml.bits_per_weight("Q6_K") == 6.5625
    with pytest.raises(ValueError, match="Q8_0 packs 32 elements a block; 33"):
        ggml.packed_bytes("Q8_0", 33)


@pytest.mark.parametrize("format", ["Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_tierstores_quantizers_write_blocks_the_reference_reads_back_close(format):
    """Quantized by tierstore, dequantized by the `gguf` package: valid blocks, and the error of a good quantizer
    (llama.cpp's searches: Q4_K beats nf4's error at the same 4.5 bits)."""
    from tierstore import ggml_quantize

    torch.manual_seed(0)
    values = torch.randn(256 * 64) * 0.02
    values[::97] *= 8  # a few outliers, as real weights have
    packed = ggml_quantize.quantize(format, values)
    assert packed.dtype == torch.uint8 and packed.numel() == ggml.packed_bytes(format, values.numel())
    blocks = packed.numpy().reshape(-1, ggml.BLOCKS[format][1])
    back = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[format]).reshape(-1))
    error = ((back - values).norm() / values.norm()).item()
    assert error < {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.05, "Q4_K": 0.1, "Q3_K": 0.21, "Q2_K": 0.36}[format]
    zeros = ggml_quantize.quantize(format, torch.zeros(256))  # an all-zero block stays zero, not NaN
    out = torch.empty(256)
    ggml.dequantize(format, zeros, out)
    assert torch.equal(out, torch.zeros(256))


def test_an_importance_matrix_keeps_the_important_weights_closer():
    """Weights whose inputs matter more are quantized with less error when the search weighs them so."""
    from tierstore import ggml_quantize

    torch.manual_seed(1)
    values = torch.randn(256 * 32) * 0.02
    importance = torch.ones(256 * 32)
    importance[::2] = 100.0  # every other weight's input is ten times larger
    for format in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        errors = []
        for weights in (None, importance):
            out = torch.empty_like(values)
            ggml.dequantize(format, ggml_quantize.quantize(format, values, weights), out)
            errors.append(((out - values) ** 2 * importance).sum().item())
        assert errors[1] < errors[0] * (0.95 if format == "Q5_K" else 0.9), (format, errors)  # Q5_K: 0.914 here


def test_the_compiled_dequantization_runs_in_bounded_chunks(monkeypatch):
    """The compiled kernel (what a GPU runs for the formats without a Triton kernel) is called CHUNK_ELEMENTS at a
    time, so its own result buffer and intermediates stay small whatever the matrix; the chunks cover it exactly.
    (The compiled function is stood in for by the same steps run eagerly: the chunking is what is tested.)"""
    format = "Q8_0"
    elements, _ = ggml.BLOCKS[format]
    calls = []

    def eager(blocks, target):
        calls.append(blocks.shape[0])
        ggml._DEQUANTIZE[format](blocks, target)

    monkeypatch.setitem(ggml._FUSED, format, eager)
    monkeypatch.setattr(ggml, "CHUNK_ELEMENTS", 3 * elements)
    data = random_blocks(format, 10)
    want = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[format]).reshape(-1)
    out = torch.empty(want.size, dtype=torch.float32)
    assert ggml.dequantize_compiled(format, torch.from_numpy(data).reshape(-1), out)
    assert calls == [3, 3, 3, 1]
    assert torch.equal(out, torch.from_numpy(want))


@pytest.mark.parametrize("format", ["Q8_0", "Q3_K", "Q4_K"])
def test_quantizing_in_chunks_writes_the_blocks_of_one_whole_call(monkeypatch, format):
    """The quantizer goes a bounded number of values at a time (a whole MoE layer's experts would need several
    times their size in float32 temporaries at once): its blocks equal those of a call that takes them all at once,
    with no importance, one per value, and one per column repeated down the rows (chunks then hold whole rows)."""
    from tierstore import ggml_quantize

    torch.manual_seed(2)
    rows, columns = 12, 512
    values = torch.randn(rows * columns) * 0.02
    per_value, per_column = torch.rand(rows * columns) + 0.5, torch.rand(columns) + 0.5
    whole = {name: ggml_quantize.quantize(format, values, weights)
             for name, weights in (("none", None), ("value", per_value), ("column", per_column))}
    assert torch.equal(whole["column"], ggml_quantize.quantize(format, values, per_column.repeat(rows)))
    monkeypatch.setattr(ggml_quantize, "CHUNK_ELEMENTS", 3 * columns)  # four chunks of three rows
    for name, weights in (("none", None), ("value", per_value), ("column", per_column)):
        assert torch.equal(ggml_quantize.quantize(format, values, weights), whole[name]), name
    with pytest.raises(ValueError, match="repeat evenly"):
        ggml_quantize.quantize(format, values, torch.ones(1000))


@pytest.mark.parametrize("at_once", [1, 5, 32])
@pytest.mark.parametrize("format", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_the_scale_searches_write_the_same_blocks_whatever_grids_and_rows_they_take_at_once(monkeypatch, format,
                                                                                          at_once):
    """The searches take some candidate grids at a time (a CPU one, a GPU all of them) over a bounded number of
    rows at a time: chunks of 7 to 26 rows and 1, 5 (the last few grids a smaller group) or every grid at once
    write the blocks of the CPU's default, with and without an importance matrix."""
    from tierstore import ggml_quantize

    torch.manual_seed(3)
    values = torch.randn(256 * 8) * 0.02
    values[::61] *= 10
    importance = torch.rand(values.numel()) + 0.1
    whole = [ggml_quantize.quantize(format, values, weights) for weights in (None, importance)]
    monkeypatch.setattr(ggml_quantize, "GRIDS_AT_ONCE", (at_once, at_once))
    monkeypatch.setattr(ggml_quantize, "GRID_ELEMENTS", (7 * 32 * at_once, 7 * 32 * at_once))
    assert torch.equal(ggml_quantize.quantize(format, values), whole[0])
    assert torch.equal(ggml_quantize.quantize(format, values, importance), whole[1])


def test_the_scale_and_minimum_search_keeps_the_best_of_llama_cpps_grids():
    """`_scale_min_search` against make_qkx2_quants transcribed row by row in float64: each row keeps the
    candidate (the span's own scale and minimum on the nmax grid, or a grid's least-squares fit) with the least
    weighted error of its grid's codes, up to float32 rounding (the search finds each error from its sums)."""
    from tierstore import ggml_quantize

    torch.manual_seed(4)
    x = torch.randn(64, 32) * 0.02
    x[0] = 0.0
    x[1] = torch.linspace(0.01, 0.02, 32)  # all above zero: the minimum is clamped to zero
    weights = x.abs() + x.pow(2).mean(1, keepdim=True).sqrt()
    scale, neg_min = ggml_quantize._scale_min_search(x, weights, 15, 20, -1.0, 0.1)
    for row in range(x.shape[0]):
        v, w = x[row].double(), weights[row].double()
        low, high = min(v.min().item(), 0.0), v.max().item()
        if high == low:
            assert scale[row].item() == 0
            continue

        def codes_on(grid):
            return torch.round((v - low) * grid / (high - low)).clamp(0, 15)

        def error(s, m, codes):
            return (w * (s * codes + m - v) ** 2).sum().item()
        candidates = [((high - low) / 15, low, error((high - low) / 15, low, codes_on(15)))]
        for step in range(21):
            codes = codes_on(-1.0 + 0.1 * step + 15)
            sw, sl, sl2 = w.sum(), (w * codes).sum(), (w * codes * codes).sum()
            sx, sxl = (w * v).sum(), (w * v * codes).sum()
            det = sw * sl2 - sl * sl
            if det <= 0:
                continue
            s, m = ((sw * sxl - sx * sl) / det).item(), ((sl2 * sx - sl * sxl) / det).item()
            s, m = (sxl / sl2).item() if m > 0 else s, min(m, 0.0)
            candidates.append((s, m, error(s, m, codes)))
        best = min(err for _, _, err in candidates)
        kept = [err for s, m, err in candidates
                if math.isclose(s, scale[row].item(), rel_tol=1e-4) and math.isclose(m, -neg_min[row].item(),
                                                                                   rel_tol=1e-4, abs_tol=1e-9)]
        cancelled = 1e-5 * (w * v * v).sum().item()  # the float32 search's errors are differences of such sums
        assert kept and min(kept) <= best + cancelled, (row, kept, best)
