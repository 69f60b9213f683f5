"""Resolving what users type: aliases, files, directories and Hub repo ids through the local cache (offline)."""
import os
import shutil

import pytest
import torch
from tierstore.inference.loading.resolve import resolve

import tierstore


def _hub_cache(root, repo_id, source_dir):
    """A cache laid out as huggingface_hub lays it out: blobs, a snapshot of links, refs/main."""
    repo = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = os.path.join(repo, "snapshots", revision)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo, "blobs"))
    for name in os.listdir(source_dir):
        blob = os.path.join(repo, "blobs", f"blob-{name}")
        shutil.copy(os.path.join(source_dir, name), blob)
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as handle:
        handle.write(revision)
    return snapshot


def test_hub_repo_id_resolves_through_the_local_cache(tiny_dirs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    directory, reference = tiny_dirs("llama")
    snapshot = _hub_cache(str(tmp_path / "hub"), "acme/tiny-llama", directory)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = resolve("acme/tiny-llama")
    assert found.kind == "safetensors" and os.path.realpath(found.path) == os.path.realpath(snapshot)
    with tierstore.AutoModel.from_pretrained("acme/tiny-llama",
                                             config={"runtime": {"cache_dir": str(tmp_path / "c")}}) as model:
        ids = torch.tensor([[5, 9, 33]])
        assert model.generate(ids, max_new_tokens=4, do_sample=False).tolist() == \
            reference.generate(ids, max_new_tokens=4, do_sample=False).tolist()


def test_repo_id_missing_from_the_cache_says_so(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(tierstore.ModelError, match="not in the local Hugging Face cache"):
        resolve("acme/absent-model")


def test_alias_and_gguf_file(tmp_path):
    from conftest import smollm2_path

    assert resolve("smollm2").kind == "gguf" and resolve("smollm2").path == smollm2_path()
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 10)
    with pytest.raises(tierstore.CheckpointError, match="not a GGUF"):
        resolve(str(bad))
