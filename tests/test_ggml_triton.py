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
    assert set(kernels.KERNELS) == set(kernels.FORMATS)
