"""4-bit (nf4) and 8-bit block-wise compression: exact plumbing, size, errors, and what it costs in accuracy."""
import copy
import json
import os

import pytest
import torch
from conftest import ARCH_EXTRA

import tierstore
from tierstore.compression import ABSMAX, PACKED, Codec, Decompressor, compress_unit, compressed_layout
from tierstore.errors import CheckpointError, ConfigError
from tierstore.units import UnitLayout, align

F = pytest.importorskip("bitsandbytes.functional")
IDS = torch.tensor([[5, 9, 33, 7, 81, 100, 3]])


def dequantized_like_bitsandbytes(model, codec):
    """The reference: transformers' model whose decoder-layer matrices went through bitsandbytes' own
    quantize/dequantize, one tensor at a time (no tierstore code)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and param.dim() >= 2:
                if codec == "nf4":
                    q, state = F.quantize_4bit(param.data.contiguous(), blocksize=64, quant_type="nf4")
                    param.copy_(F.dequantize_4bit(q, state))
                else:
                    q, state = F.quantize_blockwise(param.data.contiguous(), blocksize=256)
                    param.copy_(F.dequantize_blockwise(q, state))
    return model


def _config(tmp_path, codec):
    return {"runtime": {"cache_dir": str(tmp_path / "cache")}, "compression": {"format": codec}}


@pytest.mark.parametrize("codec", ["nf4", "int8"])
@pytest.mark.parametrize("model_type", sorted(ARCH_EXTRA))
def test_compressed_model_equals_transformers_with_the_same_dequantized_weights(model_type, codec, tiny_dirs,
                                                                                  tmp_path):
    directory, original = tiny_dirs(model_type)
    reference = dequantized_like_bitsandbytes(original, codec)
    # whole layers (mixtral's experts inside theirs; compressed experts as units: test_moe.py)
    config = {**_config(tmp_path, codec), "experts": {"streaming": False}}
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:  # learn the compressed sizes
        sizes = {key: layout.nbytes for key, layout in model.store.layouts.items()}
        scratch = model.plan.device_reserve_bytes  # on the CPU the reserve is just the dequantization buffer
    layer, other = sizes["layers.0"], max(n for key, n in sizes.items() if not key.startswith("layers."))
    # A budget this small dequantizes a layer matrix by matrix (its buffer: the largest matrix), unless its
    # matrices are not all nn.Linear weights (mixtral's fused experts): then the whole layer at once.
    per_matrix = model_type != "mixtral"
    if per_matrix:
        scratch = max(align(p.numel(), 4096) for name, p in original.named_parameters()
                      if ".layers.0." in name and p.dim() >= 2) * 4
    # the dequantization buffer, the largest other unit and 2.5 compressed layers on the device; host: 2 layers
    budget = tierstore.Budget(vram=scratch + other + layer * 5 // 2, ram=other + 2 * layer)
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config) as model:
        assert model.plan.regime != "device"
        assert any(("matrix by matrix" in note) == per_matrix for note in model.plan.notes if "stored as" in note)
        got = model.generate(IDS, max_new_tokens=10, do_sample=False)
        assert got.tolist() == reference.generate(IDS, max_new_tokens=10, do_sample=False).tolist()
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=1e-5)
        for tier, stats in model.report().tiers.items():
            assert stats.budget_bytes is None or stats.peak_bytes <= stats.budget_bytes, tier
        assert any(f"stored as {codec}" in note for note in model.plan.notes)


@pytest.mark.parametrize("codec,bits", [("nf4", 4), ("int8", 8)])
def test_store_holds_the_matrices_in_fewer_bytes_and_is_reused(codec, bits, tiny_dirs, tmp_path):
    directory, original = tiny_dirs("llama")
    config = _config(tmp_path, codec)
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        compressed = model.store.layouts["layers.0"].nbytes
        store_dir = model.store.source.directory
    layer_params = sum(p.numel() for p in original.model.layers[0].parameters())
    matrix_params = sum(p.numel() for p in original.model.layers[0].parameters() if p.dim() >= 2)
    block = Codec.create(codec).blocksize
    exact = (layer_params - matrix_params) * 4 + matrix_params * bits // 8 + matrix_params // block * 4
    assert exact <= compressed <= exact + 4 * 256  # each tensor aligned to 256 bytes
    assert compressed < layer_params * 4 * (bits + 1) / 32
    mtimes = {name: os.stat(os.path.join(store_dir, "units", name)).st_mtime_ns
              for name in os.listdir(os.path.join(store_dir, "units"))}
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        assert model.store.source.directory == store_dir
    assert mtimes == {name: os.stat(os.path.join(store_dir, "units", name)).st_mtime_ns for name in mtimes}


def test_plain_tensors_are_kept_bit_exact_and_matrices_within_the_codec_error():
    torch.manual_seed(0)
    tensors = {"norm": torch.randn(300), "w1": torch.randn(96, 64), "bias": torch.randn(7), "w2": torch.randn(40, 33)}
    layout = UnitLayout.pack("u", {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()})
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for name, view in layout.views(buffer).items():
        view.copy_(tensors[name])
    for codec, bound in ((Codec.create("nf4"), 0.11), (Codec.create("int8"), 0.015)):
        packed_layout, packed_buffer, packed = compress_unit(layout, buffer, {"w1", "w2"}, codec, torch.device("cpu"))
        assert set(packed_layout.slots) == {"norm", "bias", PACKED, ABSMAX}
        assert packed_layout == compressed_layout(layout, {"w1", "w2"}, codec)[0]
        out = Decompressor(codec, {"u": packed}, torch.float32, torch.device("cpu")).materialize(
            "u", packed_layout.views(packed_buffer))
        for name in ("norm", "bias"):
            assert torch.equal(out[name], tensors[name])
        for name in ("w1", "w2"):
            error = ((out[name] - tensors[name]).norm() / tensors[name].norm()).item()
            assert 0 < error < bound, (codec.format, name, error)


def test_a_corrupt_compressed_unit_is_refused_before_any_token(tiny_dirs, tmp_path):
    directory, _ = tiny_dirs("llama")
    config = _config(tmp_path, "nf4")
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        store_dir = model.store.source.directory
    path = os.path.join(store_dir, "units", "layers.2.bin")
    with open(path, "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CheckpointError, match="layers.2.bin: checksum mismatch"):
        with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
            model.generate(IDS, max_new_tokens=2, do_sample=False)


def test_an_interrupted_compression_resumes_to_the_same_store(tiny_dirs, tmp_path):
    from tierstore.inference.loading.checkpoint import load_config
    from tierstore.inference.loading.sources import in_place_source
    from tierstore.inference.loading.store_writer import compress
    from tierstore.inference.loading.resolve import resolve
    from tierstore.inference.loading.skeleton import build_skeleton

    directory, _ = tiny_dirs("llama")
    checkpoint = resolve(directory)
    skeleton = build_skeleton(load_config(checkpoint), torch.float32)
    source = in_place_source(checkpoint, skeleton.units, torch.float32)
    codec = Codec.create("nf4")

    class Killed(Exception):
        pass

    class DiesAfterTwoUnits:
        def __init__(self):
            self.reads = 0

        def layout(self, key):
            return source.layout(key)

        def read_into(self, key, out):
            self.reads += 1
            if self.reads > 2:
                raise Killed()
            source.read_into(key, out)

    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    compress(source, skeleton, checkpoint, whole, codec, torch.device("cpu"), progress=False)
    with pytest.raises(Killed):
        compress(DiesAfterTwoUnits(), skeleton, checkpoint, resumed, codec, torch.device("cpu"), progress=False)
    assert not os.path.exists(os.path.join(resumed, "manifest.json"))
    counting = DiesAfterTwoUnits()
    counting.reads = -100
    compress(counting, skeleton, checkpoint, resumed, codec, torch.device("cpu"), progress=False)
    assert counting.reads == -100 + len(skeleton.units) - 2  # the two finished units were not redone
    manifests = [json.load(open(os.path.join(d, "manifest.json"))) for d in (whole, resumed)]
    assert manifests[0]["units"] == manifests[1]["units"] and manifests[0]["compression"]["format"] == "nf4"


def test_plan_sizes_units_compressed_without_writing_anything(tiny_dirs, tmp_path):
    from tierstore.inference.compose import make_plan_for

    directory, _ = tiny_dirs("llama")
    config = _config(tmp_path, "nf4")
    budget = tierstore.Budget(vram="400KB", ram="1MB")
    plain = make_plan_for(directory, budget, {"runtime": config["runtime"]})
    packed = make_plan_for(directory, budget, config)
    assert len(packed.device_resident) > len(plain.device_resident)
    assert packed.h2d_bytes_per_pass < plain.h2d_bytes_per_pass
    assert not os.path.exists(tmp_path / "cache") or not any("nf4" in name for name in os.listdir(tmp_path / "cache"))
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config) as model:
        assert model.plan.device_resident == packed.device_resident
        assert model.plan.h2d_bytes_per_pass == packed.h2d_bytes_per_pass


def test_bad_compression_settings_are_one_clear_error(tiny_dirs, tmp_path):
    with pytest.raises(ConfigError, match="compression.format: 'nf3' is not allowed"):
        tierstore.Config.from_dict({"compression": {"format": "nf3"}})
    with pytest.raises(ConfigError, match="compression.blocksize: 100 is not allowed"):
        tierstore.Config.from_dict({"compression": {"blocksize": 100}})
    directory, _ = tiny_dirs("llama")
    with tierstore.AutoModel.from_pretrained(directory, config=_config(tmp_path, "nf4")) as model:
        store_dir = model.store.source.directory
    with pytest.raises(ConfigError, match="is stored as nf4-64; compression asks for int8-256"):
        tierstore.AutoModel.from_pretrained(store_dir, config=_config(tmp_path, "int8"))
    with tierstore.AutoModel.from_pretrained(store_dir, config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        assert model.store.source.codec.format == "nf4"  # a compressed store runs compressed whatever the config


def test_cli_convert_compress_then_plan(tiny_dirs, tmp_path, capsys):
    from tierstore.inference.front.cli import main

    directory, _ = tiny_dirs("qwen3")
    out = str(tmp_path / "q")
    assert main(["convert", directory, out, "--compress", "nf4", "--dtype", "float16"]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["compression"]["format"] == "nf4"
    assert manifest["units"]["norm"]["tensors"]["model.norm.weight"]["dtype"] == "F16"
    assert main(["plan", out, "--vram", "1MB", "--ram", "1MB"]) == 0
    assert "stored as nf4" in capsys.readouterr().out.replace("\n", " ")
    assert main(["convert", out, str(tmp_path / "again"), "--compress", "int8"]) == 2
    assert "already compressed" in capsys.readouterr().err


def test_direct_io_reads_the_same_units_and_says_how_it_reads(tiny_dirs, tmp_path):
    """io.direct_io: O_DIRECT where the filesystem allows it (whole blocks into page-aligned buffers, the tail
    through the page cache), else posix_fadvise; the report's plan notes say which."""
    from tierstore.inference.loading.layerstore import direct_io_works

    directory, _ = tiny_dirs("llama")
    config = _config(tmp_path, "nf4")
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        want = model.generate(IDS, max_new_tokens=8, do_sample=False).tolist()
        store_dir = model.store.source.directory
    assert any(os.path.getsize(os.path.join(store_dir, "units", name)) % 4096
               for name in os.listdir(os.path.join(store_dir, "units")))  # the tails are exercised
    config["io"] = {"direct_io": True}
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        mode = model.store.source.read_mode
        assert mode == ("O_DIRECT" if direct_io_works(store_dir) else "posix_fadvise(DONTNEED)")
        assert f"disk reads: {mode}" in model.plan.notes
        assert model.generate(IDS, max_new_tokens=8, do_sample=False).tolist() == want


@pytest.mark.parametrize("recipe", ["q2_k", "q3_k", "q4_k_m", "q5_k", "q8_0"])
@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_ggml_recipes_equal_transformers_with_the_gguf_packages_dequantized_weights(model_type, recipe, tiny_dirs,
                                                                                    tmp_path):
    """tierstore's own GGML quantization: the model equals transformers' whose layer matrices are the same blocks
    dequantized by the `gguf` package's reference code (no tierstore dequantizer in the reference)."""
    gguf = pytest.importorskip("gguf")
    from tierstore import ggml, ggml_quantize
    from tierstore.compression import recipe_formats

    directory, original = tiny_dirs(model_type)
    reference = copy.deepcopy(original)
    # each expert is a unit of its own, its matrices quantized (each expert's a whole number of blocks: as when the
    # fused tensor is); the router stays as it is, as llama.cpp keeps ffn_gate_inp
    shapes = {name: tuple(p.shape) for name, p in reference.named_parameters()
              if ".layers." in name and p.dim() >= 2 and ".mlp.gate." not in name}
    formats = recipe_formats(recipe, shapes, set(shapes))
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in formats:
                blocks = ggml_quantize.quantize(formats[name], param.data.reshape(-1)).numpy()
                blocks = blocks.reshape(-1, ggml.BLOCKS[formats[name]][1])
                values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[formats[name]])
                param.copy_(torch.from_numpy(values).reshape(param.shape))
    with tierstore.AutoModel.from_pretrained(directory, config=_config(tmp_path, recipe)) as model:
        assert any(f"stored as {recipe} (" in note for note in model.plan.notes)
        got = model.generate(IDS, max_new_tokens=10, do_sample=False)
        assert got.tolist() == reference.generate(IDS, max_new_tokens=10, do_sample=False).tolist()
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=1e-5)


def test_q4_k_m_gives_some_value_and_down_matrices_more_bits():
    from tierstore.compression import recipe_formats

    names = [f"model.layers.{i}.{m}.weight" for i in range(16) for m in ("self_attn.v_proj", "mlp.down_proj",
                                                                         "mlp.up_proj")]
    formats = recipe_formats("q4_k_m", {name: (256, 256) for name in names}, set(names))
    six = sorted({int(name.split(".")[2]) for name, f in formats.items() if f == "Q6_K"})
    assert six == [0, 1, 4, 7, 10, 13, 14, 15]  # llama.cpp's use_more_bits for 16 layers
    assert all(formats[name] == "Q4_K" for name in names if "up_proj" in name)
    odd = recipe_formats("q4_k", {"model.layers.0.mlp.up_proj.weight": (32, 3)}, set())
    assert odd == {"model.layers.0.mlp.up_proj.weight": "Q8_0"}  # 96 elements: not whole Q4_K blocks
    with pytest.raises(ConfigError, match="has 33 elements, not a multiple of 32"):
        recipe_formats("q4_k", {"model.layers.0.w": (3, 11)}, set())
    with pytest.raises(ConfigError, match="compression.blocksize applies to nf4 and int8"):
        Codec.create("q4_k", 64)


def test_mixed_formats_spend_their_bits_where_the_error_falls_most():
    """The allocation (no model): no matrix below the largest format within the bits, the matrix whose error falls
    most per bit upgraded first, the total within the bits asked for, a format that costs more bits for no less
    error skipped, and bits below the smallest formats refused in one line."""
    from tierstore.allocation import allocate

    errors = {"hard": {"Q3_K": 100.0, "Q4_K": 40.0, "Q5_K": 10.0, "Q6_K": 5.0, "Q8_0": 1.0},
              "easy": {"Q3_K": 10.0, "Q4_K": 4.0, "Q5_K": 1.0, "Q6_K": 0.5, "Q8_0": 0.1},
              "flat": {"Q3_K": 5.0, "Q4_K": 5.0, "Q5_K": 5.0, "Q6_K": 5.0, "Q8_0": 5.0}}
    numel = dict.fromkeys(errors, 256 * 64)
    chosen = allocate(errors, numel, bits=5.0)
    assert chosen["flat"] == "Q4_K"  # the floor at 5 bits; more bits buy it nothing
    order = ["Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    assert order.index(chosen["hard"]) > order.index(chosen["easy"])
    from tierstore.ggml import bits_per_weight
    spent = sum(bits_per_weight(f) * numel[name] for name, f in chosen.items()) / sum(numel.values())
    assert spent <= 5.0
    assert allocate(errors, numel, bits=8.5) == {"hard": "Q8_0", "easy": "Q8_0", "flat": "Q8_0"}
    assert allocate(errors, numel, bits=4.0)["flat"] == "Q3_K" and chosen != allocate(errors, numel, bits=4.0)
    with pytest.raises(ConfigError, match="compression.bits = 3.0: the smallest formats already take 3.44"):
        allocate(errors, numel, bits=3.0)


def test_mixed_formats_meet_their_bits_and_the_store_keeps_its_allocation(tiny_dirs, tmp_path):
    """`compression.format = "mixed"` on a tiny Llama: formats chosen per matrix (more than one), bits per weight
    within `compression.bits`, tokens equal transformers' with the same blocks dequantized, and the store (with
    its allocation) reused by the next open; a bad bits value and mixed under --tp are one clear line each."""
    from tierstore import ggml, ggml_quantize
    from tierstore.compression import bits_per_weight

    directory, original = tiny_dirs("llama")
    config = {"runtime": {"cache_dir": str(tmp_path / "cache")}, "compression": {"format": "mixed", "bits": 5.0}}
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        codec, packed = model.store.source.codec, model.store.source.packed
        store_dir = model.store.source.directory
        got = model.generate(IDS, max_new_tokens=10, do_sample=False).tolist()
    allocation = dict(codec.allocation)
    assert len(set(allocation.values())) > 1, allocation
    assert 3.4 < bits_per_weight(codec, packed) <= 5.0
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in allocation:
                flat = param.data.reshape(-1)
                restored = torch.empty_like(flat)
                ggml.dequantize(allocation[name], ggml_quantize.quantize(allocation[name], flat), restored)
                param.copy_(restored.reshape(param.shape))
    assert got == reference.generate(IDS, max_new_tokens=10, do_sample=False).tolist()
    with tierstore.AutoModel.from_pretrained(directory, config=config) as again:
        assert again.store.source.directory == store_dir and dict(again.store.source.codec.allocation) == allocation
    with pytest.raises(ConfigError, match="compression.bits: 2.5 is not allowed; use a number from 2.625 to 8.5"):
        tierstore.Config.from_dict({"compression": {"format": "mixed", "bits": 2.5}})
    with pytest.raises(tierstore.InputError, match="compression.format = mixed measures one process's model"):
        tierstore.AutoModel.from_pretrained(directory, config=config, tensor_parallel=2)


def test_rotation_is_refused_where_it_cannot_apply(tiny_dirs, tmp_path, capsys):
    """A rotation with nf4, without GPTQ (it loses quality there; mixed formats too), or an unknown word: one
    line each, exit 2 from the CLI."""
    from tierstore.inference.front.cli import main

    directory, _ = tiny_dirs("llama")
    for compression, words in [('format = "nf4"\nrotation = "hadamard"', "applies to the GGML formats"),
                               ('format = "mixed"\nrotation = "hadamard"', "needs compression.rounding = gptq"),
                               ('format = "q3_k"\nrotation = "hadamard"', "needs compression.rounding = gptq"),
                               ('format = "q4_k"\nrotation = "givens"', "compression.rotation: 'givens'")]:
        path = tmp_path / "c.toml"
        path.write_text(f'[runtime]\ncache_dir = "{tmp_path / "cache"}"\n[compression]\n{compression}\n')
        assert main(["generate", directory, "--prompt", "hi", "--max-new-tokens", "2", "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_rotation_is_refused_with_tensor_parallelism():
    """Ranks hold blocks of columns each; a rotation mixes 64 columns at a time: refused before anything runs."""
    from tierstore.inference.compose import _check_tensor_parallel

    config = tierstore.Config.from_dict({"compression": {"format": "q4_k", "rotation": "hadamard",
                                                         "calibration": "bundled", "rounding": "gptq"}})
    with pytest.raises(tierstore.InputError, match="leave rotation unset with --tp"):
        _check_tensor_parallel(config, 2, None)
    _check_tensor_parallel(config, 1, None)
