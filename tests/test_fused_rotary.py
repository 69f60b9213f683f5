"""transformers' rotary embedding in one Triton kernel (inference/runtime/rotary_kernel.py, fused_rotary.py), run by
Triton's interpreter on the CPU: transformers' values bit for bit, and only where the model's function is its
formula. (On a GPU, tests/test_cuda.py checks the compiled kernel in bfloat16 too.)"""
import importlib
import sys
import types

import pytest
import torch
from conftest import ARCH_EXTRA, tiny_model

import tierstore
from tierstore.inference.runtime import fused_rotary
from tierstore.inference.runtime.fused_rotary import FusedRotary

pytest.importorskip("triton")  # a test dependency on Linux (pyproject's [test] extra); torch's CUDA builds ship it

IDS = torch.tensor([[5, 9, 33, 7, 81, 100, 3]])
KERNEL = "tierstore.inference.runtime.rotary_kernel"


@pytest.fixture
def kernel(monkeypatch):
    """rotary_kernel imported with TRITON_INTERPRET=1, and the CPU counted among the kernel's devices; each call of
    `rotate` recorded in `kernel.calls`."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delitem(sys.modules, KERNEL, raising=False)
    module = importlib.import_module(KERNEL)
    monkeypatch.setattr(fused_rotary, "DEVICES", ("cuda", "cpu"))
    module.calls = []
    rotate = module.rotate

    def counted(q, k, cos, sin):
        module.calls.append(tuple(q.shape))
        return rotate(q, k, cos, sin)
    monkeypatch.setattr(module, "rotate", counted)
    yield module
    sys.modules.pop(KERNEL, None)  # the next import compiles for a GPU again


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("width", [64, 80])
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_the_kernel_gives_transformers_values_bit_for_bit(kernel, dtype, width, cos_batch):
    """Queries laid out as attention makes them ([batch, positions, heads, width] transposed), keys of fewer heads,
    cos and sin for every batch row or one: the kernel's q and k equal transformers' apply_rotary_pos_emb exactly,
    a width whose half is no power of two (80) included. (bfloat16: the interpreter truncates where a GPU rounds.)"""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(width + cos_batch)
    q = torch.randn(2, 3, 4, width, generator=generator).to(dtype).transpose(1, 2)
    k = torch.randn(2, 2, 3, width, generator=generator).to(dtype)
    cos, sin = (torch.randn(cos_batch, 3, width, generator=generator).to(dtype) for _ in range(2))
    assert fused_rotary.fits_kernel(q, k, cos, sin, 1)
    assert not fused_rotary.fits_kernel(q.detach().requires_grad_(), k, cos, sin, 1)  # no backward: transformers'
    got_q, got_k = kernel.rotate(q, k, cos, sin)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert got_q.stride() == q.stride()  # laid out as the queries are


@pytest.mark.parametrize("model_type", sorted(ARCH_EXTRA))
def test_each_architecture_runs_the_kernel_where_its_function_is_transformers_formula(kernel, model_type):
    """Attached to a model of each architecture of the sweep (float32), the kernel runs once a layer where the
    modeling module's function gives transformers' formula (Llama's and its copies: at least Llama's, Mistral's,
    Mixtral's, Qwen2's and Qwen3's) and the logits equal transformers' own bit for bit; `detach` puts the module's
    own function back."""
    model = tiny_model(model_type)
    with torch.no_grad():
        want = model(IDS).logits
        names = fused_rotary.modeling_modules(model.modules())
        originals = {name: getattr(sys.modules[name], "apply_rotary_pos_emb") for name in names}
        fused = FusedRotary(model.modules(), torch.device("cpu"))
        changed = list(fused.names)
        try:
            got = model(IDS).logits
        finally:
            fused.detach()
    assert torch.equal(got, want)
    assert len(kernel.calls) == (model.config.num_hidden_layers if changed else 0)
    if model_type in ("llama", "mistral", "mixtral", "qwen2", "qwen3"):
        assert changed
    assert all(getattr(sys.modules[name], "apply_rotary_pos_emb") is original for name, original in originals.items())


def test_a_change_shared_by_two_models_lasts_until_the_second_detaches(kernel):
    model = tiny_model("llama")
    (name,) = fused_rotary.modeling_modules(model.modules())
    original = getattr(sys.modules[name], "apply_rotary_pos_emb")
    first, second = FusedRotary(model.modules(), torch.device("cpu")), FusedRotary(model.modules(), torch.device("cpu"))
    assert first.names == second.names == [name]
    first.detach()
    assert getattr(sys.modules[name], "apply_rotary_pos_emb") is not original
    second.detach()
    assert getattr(sys.modules[name], "apply_rotary_pos_emb") is original


def test_another_formula_or_another_device_is_left_alone(kernel, monkeypatch):
    """A modeling module whose function is not transformers' formula keeps it; on a device the kernel does not run
    on, nothing changes."""
    module = types.ModuleType("modeling_other")
    exec("import torch\n"
         "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):\n"
         "    return q * cos.unsqueeze(1), k * cos.unsqueeze(1)\n"
         "class OtherAttention(torch.nn.Module):\n"
         "    def forward(self, q, k, cos, sin):\n"
         "        return apply_rotary_pos_emb(q, k, cos, sin)\n", module.__dict__)
    monkeypatch.setitem(sys.modules, "modeling_other", module)
    own = module.apply_rotary_pos_emb
    assert fused_rotary.modeling_modules([module.OtherAttention()]) == {"modeling_other"}
    assert FusedRotary([module.OtherAttention()], torch.device("cpu")).names == []
    assert module.apply_rotary_pos_emb is own
    model = tiny_model("llama")
    monkeypatch.setattr(fused_rotary, "DEVICES", ("cuda",))
    assert FusedRotary(model.modules(), torch.device("cpu")).names == []


def test_an_open_model_runs_the_kernel_unless_turned_off_and_says_so(kernel, tiny_dirs, cache_config):
    """`runtime.fused_rotary` auto (the CPU counted as the kernel's device here): the open model's decode steps run
    the kernel, the plan's note names the modeling module, and closing the model puts its function back; off:
    transformers' function and no note; transformers' tokens either way."""
    directory, reference = tiny_dirs("llama")
    want = reference.generate(IDS, max_new_tokens=6, do_sample=False).tolist()
    (name,) = fused_rotary.modeling_modules(reference.modules())
    original = getattr(sys.modules[name], "apply_rotary_pos_emb")
    for setting in ("auto", "off"):
        kernel.calls.clear()
        config = {"runtime": {**cache_config["runtime"], "fused_rotary": setting}}
        with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
            noted = any(note.startswith("rotary embedding: one kernel a layer (modeling_llama)")
                        for note in model.plan.notes)
            assert noted == (setting == "auto")
            assert model.generate(IDS, max_new_tokens=6, do_sample=False).tolist() == want, setting
        assert bool(kernel.calls) == (setting == "auto")
        assert getattr(sys.modules[name], "apply_rotary_pos_emb") is original


def test_a_compiled_model_traces_transformers_function_not_the_kernel(kernel):
    """Under torch.compile (a compiled draft), the changed name hands the tracer transformers' own function, whose
    steps the compiler fuses itself: no kernel call is traced, the logits are transformers'."""
    model = tiny_model("llama")
    with torch.no_grad():
        want = model(IDS).logits
        fused = FusedRotary(model.modules(), torch.device("cpu"))
        try:
            assert fused.names
            got = torch.compile(model, backend="eager", fullgraph=True)(IDS).logits
        finally:
            fused.detach()
    assert kernel.calls == []
    assert torch.equal(got, want)
