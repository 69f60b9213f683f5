"""A checkpoint that ships its own modeling code (ChatGLM-, Baichuan-, InternLM-style `auto_map`), offline: run with
trust_remote_code=True it gives its own code's tokens; without, it is refused before any of that code runs."""
import json
import textwrap

import pytest
import torch

import tierstore

CONFIGURATION = textwrap.dedent('''
    import os

    from transformers import LlamaConfig

    if os.environ.get("TINY_REMOTE_MARKER"):  # proof that this code ran
        open(os.environ["TINY_REMOTE_MARKER"], "w").close()

    class TinyRemoteConfig(LlamaConfig):
        model_type = "tiny_remote"
''')
MODELING = textwrap.dedent('''
    from transformers import LlamaForCausalLM
    from .configuration_tiny_remote import TinyRemoteConfig

    class TinyRemoteForCausalLM(LlamaForCausalLM):
        config_class = TinyRemoteConfig
''')
PROMPT = torch.tensor([[5, 9, 33, 7, 81]])


@pytest.fixture
def remote_checkpoint(tiny_dirs, tmp_path):
    """The tiny Llama's weights under a config whose model_type transformers does not know, with the code for it."""
    source, reference = tiny_dirs("llama")
    directory = tmp_path / "tiny-remote"
    directory.mkdir()
    (directory / "configuration_tiny_remote.py").write_text(CONFIGURATION)
    (directory / "modeling_tiny_remote.py").write_text(MODELING)
    config = reference.config.to_dict()
    config.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(open(f"{source}/model.safetensors", "rb").read())
    return str(directory), reference


def test_remote_code_runs_when_trusted(remote_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    marker = tmp_path / "the checkpoint's code ran"
    monkeypatch.setenv("TINY_REMOTE_MARKER", str(marker))
    directory, reference = remote_checkpoint
    want = reference.generate(PROMPT, max_new_tokens=6, do_sample=False).tolist()
    config = {"runtime": {"cache_dir": str(tmp_path / "cache")}}
    with tierstore.AutoModel.from_pretrained(directory, budget=tierstore.Budget(vram="400KB", ram="1MB"),
                                             config=config, trust_remote_code=True) as model:
        assert type(model.model).__name__ == "TinyRemoteForCausalLM" and model.plan.regime != "device"
        assert model.generate(PROMPT, max_new_tokens=6, do_sample=False).tolist() == want
    assert marker.exists()


def test_remote_code_is_refused_without_the_flag(remote_checkpoint, tmp_path, monkeypatch):
    directory, _ = remote_checkpoint
    marker = tmp_path / "the checkpoint's code ran"
    monkeypatch.setenv("TINY_REMOTE_MARKER", str(marker))
    with pytest.raises(tierstore.ModelError, match="needs the checkpoint's own code; pass trust_remote_code=True"):
        tierstore.AutoModel.from_pretrained(directory, config={"runtime": {"cache_dir": str(tmp_path / "cache")}})
    assert not marker.exists()
