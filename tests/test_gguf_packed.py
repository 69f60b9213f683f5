"""A GGUF streamed as it is: its layers' quantized matrices keep the file's bytes in every tier, and the model gives
transformers' own tokens from its dequantized load."""
import json
import os

import pytest
import torch
from tierstore.inference.loading.convert import convert
from tierstore.inference.loading.layerstore import read_manifest
from tierstore.inference.loading.resolve import resolve

import tierstore
from tierstore.compression import GGML, Codec, PackedMatrices, bits_per_weight
from tierstore.errors import CheckpointError

gguf = pytest.importorskip("gguf")

PROMPTS = ["What is the capital of the United States?", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def packed_store(smollm2_store, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smollm2-ggml"))
    convert(resolve(smollm2_store[1]), out, progress=False, keep_ggml=True)
    return out


def test_the_store_holds_the_files_matrix_bytes(smollm2_store, packed_store):
    """Every decoder-layer matrix keeps its blocks: the store's packed bytes are the file's, byte for byte."""
    reader = gguf.GGUFReader(smollm2_store[1])
    file_bytes = {t.name: bytes(t.data.tobytes()) for t in reader.tensors
                  if t.name.startswith("blk.") and len(t.shape) == 2}
    manifest = read_manifest(packed_store)
    assert manifest["compression"]["format"] == GGML
    units = {key: info for key, info in manifest["units"].items() if key.startswith("layers.")}
    packed = {key: PackedMatrices.from_dict(info["packed"], key) for key, info in units.items()}
    stored = sum(end - start for p in packed.values() for start, end in map(p.ggml_bytes, p.matrices))
    assert stored == sum(map(len, file_bytes.values()))
    assert bits_per_weight(Codec.ggml(), packed) == 5.0  # Q4_1: 20 bytes per 32 weights
    # an unpermuted matrix (the MLP's down projection) is the file's bytes exactly
    record = manifest["units"]["layers.3"]
    p = packed["layers.3"]
    start, end = p.ggml_bytes("model.layers.3.mlp.down_proj.weight")
    with open(os.path.join(packed_store, record["file"]), "rb") as handle:
        data = handle.read()
    offset = next(t["offset"] for name, t in record["tensors"].items() if name == "tierstore.packed")
    assert data[offset + start:offset + end] == file_bytes["blk.3.ffn_down.weight"]


@pytest.mark.slow
def test_packed_gguf_gives_transformers_tokens_and_logits(smollm2_store, smollm2_reference, tmp_path):
    reference, tokenizer = smollm2_reference
    config = {"runtime": {"cache_dir": str(tmp_path)}, "compression": {"gguf": "packed"}}
    budget = tierstore.Budget(vram="150MB", ram="1GB")  # some layers streamed through the device tier
    with tierstore.AutoModel.from_pretrained(smollm2_store[1], budget=budget, config=config) as model:
        assert model.decompressor is not None and model.decompressor.codec == Codec.ggml()
        assert any("GGUF's own formats (Q4_1 x210" in note for note in model.plan.notes)
        for prompt in PROMPTS:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            want = reference.generate(ids, max_new_tokens=16, do_sample=False)
            got = model.generate(ids, max_new_tokens=16, do_sample=False)
            assert torch.equal(got, want), prompt
            with torch.no_grad():
                assert torch.allclose(model(want).logits, reference(want).logits, atol=1e-4, rtol=0)


def test_auto_keeps_a_gguf_packed_only_on_a_gpu(smollm2_store, monkeypatch):
    from tierstore.inference.loading import convert as conversion

    from tierstore.config import Config

    checkpoint = resolve(smollm2_store[1])
    assert not conversion.keeps_ggml(checkpoint, Config.load({"runtime": {"device": "cpu"}}))
    assert conversion.keeps_ggml(checkpoint, Config.load({"runtime": {"device": "cpu"},
                                                          "compression": {"gguf": "packed"}}))
    monkeypatch.setattr(conversion, "compute_device", lambda name: torch.device("cuda"))  # as on a GPU machine
    assert conversion.keeps_ggml(checkpoint, Config.load({}))
    assert not conversion.keeps_ggml(checkpoint, Config.load({"compression": {"format": "nf4"}}))
    assert not conversion.keeps_ggml(checkpoint, Config.load({"compression": {"gguf": "dequantized"}}))
    with pytest.raises(tierstore.ConfigError, match="compression.gguf: 'q4' is not allowed"):
        Config.load({"compression": {"gguf": "q4"}})


def test_a_corrupt_packed_record_is_refused():
    record = {"numel": 512, "matrices": {"w": [0, [16, 32]]}, "ggml": {"w": ["Q4_1", 0]}}
    assert PackedMatrices.from_dict(record, "u").ggml_bytes("w") == (0, 320)
    with pytest.raises(CheckpointError, match="unsupported ggml matrix formats \\['Q9_9'\\]"):
        PackedMatrices.from_dict({**record, "ggml": {"w": ["Q9_9", 0]}}, "u")
    with pytest.raises(CheckpointError, match="malformed"):
        PackedMatrices.from_dict({**record, "ggml": {"w": "Q4_1"}}, "u")
    assert Codec.from_dict(json.loads(json.dumps(Codec.ggml().to_dict())), "m") == Codec.ggml()


def test_a_unit_of_one_format_is_one_run_and_dequantizes_like_its_matrices():
    from test_ggml import random_blocks

    from tierstore import ggml
    from tierstore.compression import Decompressor, ggml_layout, ggml_runs

    matrices = {"q": ("Q4_K", (256, 512)), "k": ("Q4_K", (256, 512)), "v": ("Q6_K", (256, 512)),
                "o": ("Q4_K", (512, 256))}
    layout, packed = ggml_layout("u", {"norm": (torch.float32, (512,))}, matrices)
    assert [run[0] for run in ggml_runs(packed)] == ["Q4_K", "Q6_K", "Q4_K"]  # q and k: one call
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = layout.views(buffer)
    want = {}
    for seed, (name, (format, shape)) in enumerate(matrices.items()):
        data = torch.from_numpy(random_blocks(format, shape[0] * shape[1] // 256, seed)).reshape(-1)
        start, end = packed.ggml_bytes(name)
        views["tierstore.packed"][start:end].copy_(data)
        want[name] = torch.empty(shape)
        ggml.dequantize(format, data, want[name].view(-1))
    unpack = Decompressor(Codec.ggml(), {"u": packed}, torch.float32, torch.device("cpu"))
    got = unpack.materialize("u", views)
    assert all(torch.equal(got[name], want[name]) for name in matrices)
    assert torch.equal(unpack.materialize_matrix("u", "v", views), want["v"])


def test_convert_keeps_a_gguf_packed_when_the_config_says_so(smollm2_store, tmp_path, capsys):
    from tierstore.inference.front.cli import main

    config = tmp_path / "c.toml"
    config.write_text('[compression]\ngguf = "packed"\n')
    assert main(["convert", smollm2_store[1], str(tmp_path / "s"), "--config", str(config)]) == 0
    assert read_manifest(str(tmp_path / "s"))["compression"]["format"] == GGML
    assert main(["convert", smollm2_store[1], str(tmp_path / "s")]) == 2  # on a CPU auto dequantizes: another store
    assert "already holds a layer store ggml-compressed" in capsys.readouterr().err
