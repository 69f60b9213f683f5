"""transformers' RMSNorm run by torch's fused rms_norm (inference/runtime/fused_norms.py): exactly the modules whose
forward is LlamaRMSNorm's, with transformers' logits."""
import pytest
import torch
from conftest import ARCH_EXTRA, tiny_model

import tierstore
from tierstore.inference.runtime.fused_norms import FusedNorms

IDS = torch.tensor([[5, 9, 33, 7, 81, 100, 3]])


@pytest.mark.parametrize("model_type", sorted(ARCH_EXTRA))
def test_every_llama_norm_and_no_other_module_runs_fused_with_transformers_logits(model_type):
    """Each architecture's RMSNorm modules change while attached unless their forward is not LlamaRMSNorm's
    (Gemma's scales by 1 + weight), in float32 and bfloat16, giving transformers' logits (norm weights random, so
    that the weight's multiply counts); `detach` gives each module its class's forward back."""
    reference = tiny_model(model_type)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    norms = [module for module in reference.modules() if type(module).__name__.endswith("RMSNorm")]
    assert len(norms) >= 2 * reference.config.num_hidden_layers + 1
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        model = reference.to(dtype)
        with torch.no_grad():
            want = model(IDS).logits
            fused = FusedNorms(model.modules())
            assert fused.modules == ([] if model_type == "gemma" else norms)
            got = model(IDS).logits
        fused.detach()
        assert not any("forward" in vars(module) for module in norms)
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


def test_an_open_model_runs_its_norms_fused_unless_turned_off_and_says_so(tiny_dirs, cache_config):
    """`runtime.fused_norms` auto: the open model's RMSNorm modules run fused, the plan's note counts them, and
    closing the model gives them their forward back; off: transformers' forward and no note; the same tokens."""
    directory, reference = tiny_dirs("llama")
    want = reference.generate(IDS, max_new_tokens=8, do_sample=False).tolist()
    for setting, count in (("auto", 2 * reference.config.num_hidden_layers + 1), ("off", 0)):
        config = {"runtime": {**cache_config["runtime"], "fused_norms": setting}}
        with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
            norms = [module for module in model.model.modules() if type(module).__name__.endswith("RMSNorm")]
            assert sum("forward" in vars(module) for module in norms) == count
            assert any(f"fused rms_norm ({count} RMSNorm modules)" in note for note in model.plan.notes) == bool(count)
            assert model.generate(IDS, max_new_tokens=8, do_sample=False).tolist() == want, setting
        assert not any("forward" in vars(module) for module in norms)
