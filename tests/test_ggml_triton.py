"""The k-quants' Triton kernels (tierstore/ggml_triton.py), run by Triton's interpreter on the CPU, give the `gguf`
package's reference values bit for bit. (On a GPU, tests/test_cuda.py checks the compiled kernels the same way.)"""
import importlib
import sys

import pytest
import torch
from test_ggml import random_blocks

from tierstore import ggml

gguf = pytest.importorskip("gguf")
pytest.importorskip("triton")  # a test dependency on Linux (pyproject's [test] extra); torch's CUDA builds ship it


@pytest.fixture
def kernels(monkeypatch):
    """tierstore.ggml_triton imported with TRITON_INTERPRET=1 (Triton reads it as each kernel is defined)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delitem(sys.modules, "tierstore.ggml_triton", raising=False)
    module = importlib.import_module("tierstore.ggml_triton")
    yield module
    sys.modules.pop("tierstore.ggml_triton", None)  # the next import compiles for a GPU again


@pytest.fixture
def dots(kernels, monkeypatch):
    """tierstore.ggml_dots imported over the interpreted ggml_triton."""
    monkeypatch.delitem(sys.modules, "tierstore.ggml_dots", raising=False)
    yield importlib.import_module("tierstore.ggml_dots")
    sys.modules.pop("tierstore.ggml_dots", None)


@pytest.mark.parametrize("format", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_each_k_quant_kernel_gives_the_reference_values(kernels, format):
    assert format in kernels.FORMATS
    count = 2 * kernels.BLOCKS_PER_PROGRAM + 3  # a last program with blocks that do not exist: masked
    data = random_blocks(format, count, seed=1)
    want = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[format])).reshape(count, 256)
    out = torch.full((count + 1, 256), float("nan"))  # one row past the blocks: must stay untouched
    kernels.dequantize(format, torch.from_numpy(data), out[:count])
    assert torch.equal(out[:count], want)
    assert out[count].isnan().all()
    half = torch.empty(count, 256, dtype=torch.float16)  # the cast is the output's (bfloat16: the interpreter
    kernels.dequantize(format, torch.from_numpy(data), half)  # truncates where a GPU rounds, so float16 here)
    assert torch.equal(half, want.half())


def test_every_k_quant_has_a_kernel_and_the_others_do_not(kernels):
    """The formats ggml.dequantize sends to Triton on a GPU; the rest are compiled from their torch steps."""
    assert set(kernels.FORMATS) == {format for format in ggml.BLOCKS if format.endswith("_K")}
    assert set(kernels.VALUES) == set(kernels.FORMATS)


@pytest.mark.parametrize("format", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_the_fused_matrix_vector_product_is_the_reference_matrix_times_the_inputs(kernels, monkeypatch, format,
                                                                                  tokens):
    """A matrix of 5 rows of two windows and two blocks (so that a program reads 2 blocks of a row at a time, in
    proportionally more rows: with 8 or more, the last program partly past the matrix), times a few token rows, at
    the kernel's tile and at one row a program reading 2,048 elements at once: the reference's values multiplied in
    float64, within float32 summation error; the output's neighbours untouched."""
    assert set(kernels.MATVEC_VALUES) == set(ggml.MATVEC_FORMATS)
    elements = ggml.BLOCKS[format][0]
    for rows_each, elements_each in ((kernels.MATVEC_ROWS, kernels.MATVEC_ELEMENTS), (1, 2048)):
        monkeypatch.setattr(kernels, "MATVEC_ROWS", rows_each)
        monkeypatch.setattr(kernels, "MATVEC_ELEMENTS", elements_each)
        rows, row_blocks = 5, 2 * max(elements_each // elements, 1) + 2
        data = random_blocks(format, rows * row_blocks, seed=2)
        matrix = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[format])).reshape(rows, -1)
        x = torch.randn(tokens, row_blocks * elements, generator=torch.Generator().manual_seed(3))
        want = x.double() @ matrix.double().T
        out = torch.full((tokens + 1, rows), float("nan"))
        kernels.matvec(format, torch.from_numpy(data).reshape(rows * row_blocks, -1), x, out[:tokens])
        scale = (x.double().abs() @ matrix.double().abs().T).max()
        assert (out[:tokens].double() - want).abs().max() <= 1e-5 * scale, (rows_each, elements_each)
        assert out[tokens].isnan().all()


@pytest.mark.parametrize("format", ["Q4_K", "Q6_K", "Q4_0"])
def test_grouped_matrices_are_each_multiplied_by_their_own_inputs(kernels, format):
    """Three matrices of 24 rows back to back (experts gathered from their slots), each times its own input row in
    one launch: each group's product by the reference values; a program's rows stay within one group (24 rows:
    8 a program at most)."""
    elements = ggml.BLOCKS[format][0]
    groups, rows, row_blocks = 3, 24, 2
    data = random_blocks(format, groups * rows * row_blocks, seed=4)
    matrices = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[format]))
    matrices = matrices.reshape(groups, rows, row_blocks * elements)
    x = torch.randn(groups, row_blocks * elements, generator=torch.Generator().manual_seed(5))
    want = torch.einsum("grc,gc->gr", matrices.double(), x.double())
    out = torch.full((groups, rows), float("nan"))
    kernels.matvec_grouped(format, torch.from_numpy(data).reshape(groups * rows * row_blocks, -1), x, out)
    scale = torch.einsum("grc,gc->gr", matrices.double().abs(), x.double().abs()).max()
    assert (out.double() - want).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("format", ["Q4_K", "Q6_K", "Q4_0"])
def test_grouped_matrices_are_read_where_they_lie_at_their_offsets(kernels, format):
    """Experts read in place: three matrices scattered through a buffer (out of order, gaps between them, one
    used twice), each group's found at its byte offset and multiplied by its own input row: each product by the
    reference values; the offsets 16-byte aligned as the compiler is told, and unaligned (a block's odd size)."""
    elements, nbytes = ggml.BLOCKS[format]
    rows, row_blocks = 24, 2
    matrix_bytes = rows * row_blocks * nbytes
    data = random_blocks(format, 3 * rows * row_blocks, seed=8).reshape(-1)
    matrices = torch.from_numpy(gguf.quants.dequantize(data.reshape(-1, nbytes), gguf.GGMLQuantizationType[format]))
    matrices = matrices.reshape(3, rows, row_blocks * elements)
    for align, gap in ((16, 48), (1, nbytes // 2 + 1)):
        places = [2, 0, 1, 2]  # where each group's matrix lies among three slots of the buffer
        buffer = torch.zeros(3 * (matrix_bytes + gap) + gap, dtype=torch.uint8)
        offsets = [gap + place * (matrix_bytes + gap) for place in range(3)]
        for place, at in enumerate(offsets):
            buffer[at:at + matrix_bytes] = torch.from_numpy(data[place * matrix_bytes:(place + 1) * matrix_bytes])
        x = torch.randn(len(places), row_blocks * elements, generator=torch.Generator().manual_seed(9))
        chosen = matrices[places].double()
        want = torch.einsum("grc,gc->gr", chosen, x.double())
        out = torch.full((len(places), rows), float("nan"))
        kernels.matvec_grouped(format, buffer, x, out, torch.tensor([offsets[place] for place in places]),
                               offsets_align=align if gap % 16 == 0 else 1)
        scale = torch.einsum("grc,gc->gr", chosen.abs(), x.double().abs()).max()
        assert (out.double() - want).abs().max() <= 1e-5 * scale, align


def test_a_decode_step_multiplies_k_quant_matrices_in_their_blocks_and_gives_the_dequantized_runs_tokens(
        monkeypatch, tmp_path):
    """A store of k-quants (q4_k_m: Q4_K and Q6_K) with every matrix a whole number of blocks a row: a prompt's
    forward dequantizes each unit (more than PACKED_MATVEC_TOKENS tokens), each decode step multiplies the packed
    matrices instead; tokens equal, logits within float32 summation error, of the same store run without. The
    multiply here is the reference (the gguf package's values times the inputs): the kernel is checked against it
    above, and through a model on a GPU in test_cuda.py (Triton's interpreter takes minutes for a model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import tierstore
    from tierstore import compression
    from tierstore.compression import Decompressor

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    settings = {"runtime": {"cache_dir": str(tmp_path / "cache")}, "compression": {"format": "q4_k_m"}}
    ids = torch.tensor([[5, 9, 33, 7, 81, 100]])
    calls: list[tuple[str, int]] = []

    def reference(format: str, packed: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> bool:
        calls.append((format, x.shape[0]))
        values = gguf.quants.dequantize(packed.numpy().reshape(-1, ggml.BLOCKS[format][1]),
                                        gguf.GGMLQuantizationType[format])
        out.copy_(x @ torch.from_numpy(values).reshape(out.shape[1], x.shape[1]).T)
        return True

    def run(devices: tuple[str, ...]) -> tuple[list[int], torch.Tensor]:
        monkeypatch.setattr(Decompressor, "MATVEC_DEVICES", devices)
        monkeypatch.setattr(compression, "ggml_matvec", reference)
        with tierstore.AutoModel.from_pretrained(str(tmp_path / "model"), config=settings) as model:
            said = any("multiply 2 of 2 units' matrices in their blocks" in note for note in model.plan.notes)
            assert said == ("cpu" in devices), model.plan.notes  # the plan says so
            tokens = model.generate(ids, max_new_tokens=3, do_sample=False).tolist()[0]
            return tokens, model(ids[:, :1]).logits

    plain_tokens, plain_logits = run(("cuda",))
    assert calls == []
    fused_tokens, fused_logits = run(("cuda", "cpu"))
    assert fused_tokens == plain_tokens
    torch.testing.assert_close(fused_logits, plain_logits, atol=1e-5, rtol=1e-5)
    # seven matrices in each of two layers, for two decode steps and the one-token forward, one token each; the
    # prompt's six tokens none
    assert len(calls) == 7 * 2 * 3 and {tokens for _, tokens in calls} == {1}
    assert {format for format, _ in calls} == {"Q4_K", "Q6_K"}


@pytest.mark.parametrize("format", ["Q4_K", "Q2_K"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_sums_by_sub_block_are_the_reference_matrix_times_the_inputs(dots, monkeypatch, format, tokens):
    """ggml_dots (codes times inputs summed by sub-block, then scaled) on 5 rows of 12 random blocks, at tiles
    reading windows of 4, 4, 1 and 4 blocks in programs of 4, 2, 16 and 16 rows (the last program partly or wholly
    past the matrix): the reference's values multiplied in float64, within float32 summation error; the output's
    neighbours untouched; and which blocks it takes (4-byte aligned words of its formats)."""
    assert set(dots.DOTS) == {"Q4_K", "Q2_K"}
    rows, row_blocks = 5, 12
    data = random_blocks(format, rows * row_blocks, seed=2)
    matrix = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[format])).reshape(rows, -1)
    x = torch.randn(tokens, row_blocks * 256, generator=torch.Generator().manual_seed(3))
    want = x.double() @ matrix.double().T
    scale = (x.double().abs() @ matrix.double().abs().T).max()
    blocks = torch.from_numpy(data).reshape(rows * row_blocks, -1)
    assert dots.takes(format, blocks) and not dots.takes("Q6_K", blocks) and not dots.takes(format, blocks, 2)
    for tile in ((4, 1024, 4), (1, 2048, 4), (16, 256, 2), dots.TILE):
        monkeypatch.setattr(dots, "TILE", tile)
        out = torch.full((tokens + 1, rows), float("nan"))
        dots.matvec(format, blocks, x, out[:tokens])
        assert (out[:tokens].double() - want).abs().max() <= 1e-6 * scale, tile
        assert out[tokens].isnan().all()


@pytest.mark.parametrize("format", ["Q4_K", "Q2_K"])
def test_sums_by_sub_block_of_grouped_matrices_read_where_they_lie(dots, format):
    """ggml_dots' grouped launch: three matrices of 24 rows scattered through a buffer at 16-byte aligned
    offsets (one used twice, out of order), each times its own input row: the reference values' products."""
    nbytes = ggml.BLOCKS[format][1]
    rows, row_blocks, gap = 24, 3, 48
    matrix_bytes = rows * row_blocks * nbytes
    data = random_blocks(format, 3 * rows * row_blocks, seed=8).reshape(-1)
    matrices = torch.from_numpy(gguf.quants.dequantize(data.reshape(-1, nbytes), gguf.GGMLQuantizationType[format]))
    matrices = matrices.reshape(3, rows, row_blocks * 256)
    places = [2, 0, 1, 2]
    buffer = torch.zeros(3 * (matrix_bytes + gap) + gap, dtype=torch.uint8)
    offsets = [gap + place * (matrix_bytes + gap) for place in range(3)]
    for place, at in enumerate(offsets):
        buffer[at:at + matrix_bytes] = torch.from_numpy(data[place * matrix_bytes:(place + 1) * matrix_bytes])
    x = torch.randn(len(places), row_blocks * 256, generator=torch.Generator().manual_seed(9))
    chosen = matrices[places].double()
    out = torch.full((len(places), rows), float("nan"))
    dots.matvec_grouped(format, buffer, x, out, torch.tensor([offsets[place] for place in places]), 16)
    scale = torch.einsum("grc,gc->gr", chosen.abs(), x.double().abs()).max()
    assert (out.double() - torch.einsum("grc,gc->gr", chosen, x.double())).abs().max() <= 1e-6 * scale


def test_the_dots_setting_sends_aligned_q4_k_and_q2_k_to_its_kernel_and_the_rest_to_the_values_kernel(dots,
                                                                                                     monkeypatch):
    """ggml.MATVEC_KERNEL = "dots": a Q4_K matrix and aligned grouped experts go to ggml_dots' kernel, experts at
    offsets not known 4-byte aligned and a Q6_K matrix to ggml_triton's; each product the reference's."""
    taken = []
    for name in ("matvec", "matvec_grouped"):
        original = getattr(dots, name)
        monkeypatch.setattr(dots, name, lambda format, *args, _original=original, **kwargs:
                            (taken.append(format), _original(format, *args, **kwargs))[1])
    monkeypatch.setattr(ggml, "MATVEC_KERNEL", "dots")
    rows, row_blocks = 8, 2
    for format, grouped_align, to_dots in (("Q4_K", None, True), ("Q2_K", 16, True), ("Q4_K", 2, False),
                                           ("Q6_K", None, False)):
        data = random_blocks(format, rows * row_blocks, seed=5).reshape(-1)
        matrix = torch.from_numpy(gguf.quants.dequantize(data.reshape(-1, ggml.BLOCKS[format][1]),
                                                         gguf.GGMLQuantizationType[format])).reshape(rows, -1)
        x = torch.randn(1, row_blocks * 256, generator=torch.Generator().manual_seed(6))
        out = torch.empty(1, rows)
        taken.clear()
        if grouped_align is None:
            assert ggml.matvec(format, torch.from_numpy(data), x, out)
        else:
            assert ggml.matvec(format, torch.from_numpy(data), x, out, grouped=True, offsets=torch.tensor([0]),
                               offsets_align=grouped_align)
        assert taken == ([format] if to_dots else []), (format, grouped_align)
        want = x.double() @ matrix.double().T
        assert (out.double() - want).abs().max() <= 1e-5 * (x.double().abs() @ matrix.double().abs().T).max()
