"""`write_store`: a layer store from a stream of per-unit tensors (how a benchmark writes a model too large to keep
twice on disk), with conversion's guarantees: the same bytes, atomic units with checksums, resume, refusals."""
import json
import os

import pytest
import torch

import tierstore
from tierstore.compression import Codec
from tierstore.inference.compose import compress_model
from tierstore.inference.loading.store_writer import write_store

PROMPT = torch.tensor([[5, 9, 33, 7, 81]])


def _from_state(model, asked=None):
    """unit_tensors serving `model`'s own weights (an expert's slice cut from its fused tensor); records the keys
    asked for in `asked`."""
    from tierstore.inference.loading.skeleton import parse_slice

    state = model.state_dict()

    def unit_tensors(key, names):
        if asked is not None:
            asked.append(key)
        tensors = {}
        for name in names:
            tensor, expert = parse_slice(name)
            tensors[name] = state[tensor] if expert is None else state[tensor][expert]
        return tensors
    return unit_tensors


def _checksums(directory):
    with open(os.path.join(directory, "manifest.json")) as handle:
        return {key: unit["checksum"] for key, unit in json.load(handle)["units"].items()}


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_a_written_store_gives_the_models_tokens(model_type, tiny_dirs, tmp_path):
    _, reference = tiny_dirs(model_type)
    reference.set_experts_implementation("grouped_mm") if model_type == "mixtral" else None
    out = write_store(str(tmp_path / "store"), reference.config, _from_state(reference), torch.float32,
                      progress=False)
    config = {"runtime": {"cache_dir": str(tmp_path / "cache")}}
    with tierstore.AutoModel.from_pretrained(out, config=config) as model:
        got = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert got.tolist() == reference.generate(PROMPT, max_new_tokens=6, do_sample=False).tolist()
    if model_type == "mixtral":
        assert any(".experts." in key for key in _checksums(out))


@pytest.mark.parametrize("format,model_type", [("nf4", "llama"), ("int8", "llama"), ("nf4", "mixtral")])
def test_compressed_units_are_the_bytes_compress_writes(format, model_type, tiny_dirs, tmp_path):
    """Quantized while written (no float copy on disk), the units are byte for byte those of converting the
    saved checkpoint and compressing it: a mixture-of-experts model's experts units of their own there too (a
    compressed store written with them inside their layers streamed whole layers)."""
    directory, reference = tiny_dirs(model_type)
    codec = Codec.create(format)
    written = write_store(str(tmp_path / "written"), reference.config, _from_state(reference), torch.float32,
                          codec=codec, progress=False)
    compressed = compress_model(directory, str(tmp_path / "compressed"), format, torch.float32,
                                config={"runtime": {"cache_dir": str(tmp_path / "cache")}}, progress=False)
    assert _checksums(written) == _checksums(compressed)


def test_a_killed_write_resumes_without_asking_for_finished_units(tiny_dirs, tmp_path):
    _, reference = tiny_dirs("llama")
    out = str(tmp_path / "store")
    first = _from_state(reference)
    calls = []

    def dies_after_three(key, names):
        calls.append(key)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return first(key, names)

    with pytest.raises(RuntimeError, match="killed"):
        write_store(out, reference.config, dies_after_three, torch.float32, progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    asked = []
    write_store(out, reference.config, _from_state(reference, asked), torch.float32, progress=False)
    assert not set(asked) & set(calls[:3]) and len(asked) == len(_checksums(out)) - 3
    config = {"runtime": {"cache_dir": str(tmp_path / "cache")}}
    with tierstore.AutoModel.from_pretrained(out, config=config) as model:
        got = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert got.tolist() == reference.generate(PROMPT, max_new_tokens=6, do_sample=False).tolist()


def test_a_tensor_of_the_wrong_shape_is_refused_and_leaves_nothing(tiny_dirs, tmp_path):
    _, reference = tiny_dirs("llama")
    right = _from_state(reference)

    def wrong(key, names):
        tensors = dict(right(key, names))
        name = names[0]
        tensors[name] = tensors[name].reshape(-1)[:-1]
        return tensors

    with pytest.raises(tierstore.InputError, match=r"unit_tensors: .* has shape"):
        write_store(str(tmp_path / "store"), reference.config, wrong, torch.float32, progress=False)
    assert not os.path.exists(tmp_path / "store")
