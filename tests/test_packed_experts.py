"""Compressed experts streamed as units: packed in every tier (device slots included), dequantized where they
compute, and the model equal to transformers' with the same weights quantized and dequantized by the libraries
themselves (bitsandbytes, the `gguf` package), no tierstore code in the reference."""
import copy
import functools

import pytest
import torch
from test_architectures import PROMPT
from test_moe import NEW_TOKENS, _reference, _saved

import tierstore
from tierstore.compression import PACKED
from tierstore.policies.experts import ExpertCosts

ROUTERS = (".mlp.gate.",)  # kept as they are (a unit of their own, read to predict; llama.cpp keeps ffn_gate_inp)


def _quantized_reference(model, codec):
    """`model` with every decoder-layer matrix but the routers quantized and dequantized by bitsandbytes (nf4) or
    by the `gguf` package (GGML blocks tierstore wrote: its quantizer is tested against gguf's elsewhere). A fused
    experts tensor is quantized whole: each expert's slice is a whole number of blocks, so its blocks are the
    expert's own."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if ".layers." not in name or param.dim() < 2 or any(router in name for router in ROUTERS):
                continue
            flat = param.data.contiguous().reshape(-1)
            if codec == "nf4":
                functional = pytest.importorskip("bitsandbytes.functional")
                q, state = functional.quantize_4bit(flat, blocksize=64, quant_type="nf4")
                param.copy_(functional.dequantize_4bit(q, state).reshape(param.shape))
            else:
                gguf = pytest.importorskip("gguf")
                from tierstore import ggml, ggml_quantize

                blocks = ggml_quantize.quantize("Q4_K", flat).numpy().reshape(-1, ggml.BLOCKS["Q4_K"][1])
                values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
                param.copy_(torch.from_numpy(values).reshape(param.shape))
    return reference


def _config(tmp_path, codec, **experts):
    return {"runtime": {"cache_dir": str(tmp_path / "cache"), "device": "cpu"}, "compression": {"format": codec},
            "experts": {"compute": "device", "prefetch": "none", **experts}}


def _streaming_budget(directory, config, every_expert_in_ram=False):
    """Room on the device for the reserve (the dequantization buffer and the experts' window), every dense unit
    and a third of the experts; in RAM for the dense units and half the experts (the rest read from disk), or all
    of them."""
    with tierstore.AutoModel.from_pretrained(directory, config=config) as whole:
        reserve, experts = whole.plan.device_reserve_bytes, whole.plan.experts
        dense = sum(layout.nbytes for layout in whole.store.layouts.values())
    in_ram = experts.total_experts if every_expert_in_ram else experts.total_experts // 2
    return tierstore.Budget(vram=reserve + dense + experts.total_experts // 3 * experts.expert_bytes,
                            ram=dense + in_ram * experts.expert_bytes)


@pytest.mark.parametrize("compute", ["device", "host", "mapped"])
@pytest.mark.parametrize("codec", ["nf4", "q4_k"])
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_compressed_experts_stream_packed_and_equal_transformers_with_the_same_weights(model_type, codec, compute,
                                                                                        tmp_path):
    """Missed experts copied packed into slots and dequantized there (device), dequantized and computed by the
    CPU (host), or a decode step's experts read in place, packed, from their slots or host RAM and dequantized
    together (mapped); the slots hold packed bytes, a few times fewer than the experts' own."""
    model, directory = _saved(model_type, tmp_path)
    want = _reference(_quantized_reference(model, codec))
    config = _config(tmp_path, codec, compute=compute)
    budget = _streaming_budget(directory, config, every_expert_in_ram=compute == "mapped")
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config) as streamed:
        experts = streamed.plan.experts
        assert experts.window >= experts.top_k and experts.device_slots < experts.total_experts
        assert any("dequantized on the device" in note for note in streamed.plan.notes)
        first = streamed.experts.groups[0]
        assert PACKED in streamed.experts.store.layouts[first.keys[0]].slots
        plain_bytes = sum(model.get_submodule(first.name)._parameters[attr][0].nbytes for attr, _ in first.attrs)
        assert experts.expert_bytes * 3 < plain_bytes  # float32 experts: 4-bit is about a seventh
        if compute == "host":  # rates as a probe gives them: the run learns what the CPU's dequantization costs
            streamed.experts.costs = ExpertCosts(link_gbps=10.0, host_gbps=10.0, host_gbps_32=10.0)
        got = streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
        report = streamed.report()
        costs = streamed.experts.costs
    assert got == want
    assert (report.experts["host_computed"] > 0) == (compute == "host")
    assert (report.experts["mapped_pairs"] > 0) == (compute == "mapped")
    assert report.tiers["experts device"].bytes_in % experts.expert_bytes == 0  # packed experts crossed
    if compute == "host":  # the CPU's dequantization is timed apart, and the split's costs learn it
        assert 0 < report.experts["host_unpack_s"] < report.experts["host_s"]
        assert costs.host_unpack_s > 0


@pytest.mark.parametrize("alike", [True, False])
def test_a_call_routed_to_more_experts_than_the_window_runs_the_kernel_once_per_window(tmp_path, monkeypatch, alike):
    """A window of 2 dequantized experts: a prompt routed to all 4 of a layer's runs the kernel twice per layer,
    with the same tokens; the window filled from the slots a tensor at a time for all its experts (alike), or an
    expert at a time (as for experts in different formats, or rotated)."""
    from tierstore.inference.runtime import experts as runner
    from tierstore.inference.runtime import packed_experts

    monkeypatch.setattr(packed_experts, "WINDOW_EXPERTS", 2)
    monkeypatch.setattr(packed_experts, "gather_pairs", lambda top_k: top_k)  # no in-place reads here
    monkeypatch.setattr(runner, "stored_alike", lambda codec, packed, keys: alike)
    filled = []
    for method in ("fill", "fill_slots"):
        real_fill = getattr(packed_experts.ExpertUnpacker, method)

        def recorded(self, *args, _real=real_fill, _method=method):
            filled.append(_method)
            return _real(self, *args)
        monkeypatch.setattr(packed_experts.ExpertUnpacker, method, recorded)
    model, directory = _saved("mixtral", tmp_path)
    prompt = torch.arange(3, 40).unsqueeze(0)
    want = _reference(_quantized_reference(model, "nf4"), prompt=prompt)
    experts_class = type(model.model.layers[0].mlp.experts)
    real = experts_class.forward
    calls = []

    @functools.wraps(real)  # still transformers' experts interface to tierstore's skeleton
    def counted(module, *args, **kwargs):
        calls.append(module.gate_up_proj.shape[0])  # the experts the kernel call sees
        return real(module, *args, **kwargs)

    monkeypatch.setattr(experts_class, "forward", counted)
    config = _config(tmp_path, "nf4")
    with tierstore.AutoModel.from_pretrained(directory, budget={"vram": "1GB", "ram": "1GB"}, config=config) as whole:
        assert whole.plan.experts.window == 2
        got = whole.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
        layer_calls = whole.report().experts["calls"]
    assert got == want
    assert set(calls) == {2}  # every kernel call sees the window, never more
    assert len(calls) > layer_calls  # some layer calls (the prompt's, routed to 3 or 4 experts) took two windows
    assert set(filled) == {"fill_slots" if alike else "fill"}


def test_reading_compressed_experts_in_place_needs_them_alike_and_is_refused_in_one_line_otherwise(tmp_path,
                                                                                                   monkeypatch):
    """A decode step reading experts in place dequantizes them on the device without knowing which they are: all
    must be in the same formats, unrotated."""
    from tierstore.inference.runtime import experts as runner

    monkeypatch.setattr(runner, "stored_alike", lambda codec, packed, keys: False)
    _, directory = _saved("mixtral", tmp_path)
    with pytest.raises(tierstore.ConfigError, match="mapped dequantizes the experts it reads all alike"):
        tierstore.AutoModel.from_pretrained(directory, budget={"vram": "1GB", "ram": "1GB"},
                                            config=_config(tmp_path, "nf4", compute="mapped"))


def _write_moe_gguf(path, formats):
    """A tiny Qwen3-MoE written as a GGUF (llama.cpp's tensor names), its matrices in ggml blocks tierstore's
    quantizer makes: `formats` maps a GGUF tensor kind ("attn", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps") to
    its block format. transformers maps no GGUF field to the experts' width: they keep its default (768)."""
    gguf = pytest.importorskip("gguf")
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tierstore import ggml_quantize

    config = Qwen3MoeConfig(vocab_size=512, hidden_size=256, moe_intermediate_size=768, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8,
                            num_experts_per_tok=2, max_position_embeddings=512, norm_topk_prob=True,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    state = {name: tensor.detach().float() * (4.0 if tensor.dim() > 1 else 1.0)
             for name, tensor in model.state_dict().items()}
    arch = "qwen3moe"
    writer = gguf.GGUFWriter(path, arch)
    for key, value in (("context_length", 512), ("embedding_length", 256), ("block_count", 2),
                       ("feed_forward_length", 768), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                       ("attention.key_length", 64), ("expert_count", 8), ("expert_used_count", 2),
                       ("expert_feed_forward_length", 768), ("vocab_size", 512)):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", 1e6)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)

    def blocks(name, tensor, format):
        packed = ggml_quantize.quantize(format, tensor.contiguous().reshape(-1)).numpy()
        writer.add_tensor(name, packed.reshape(*tensor.shape[:-1], -1), raw_dtype=gguf.GGMLQuantizationType[format])

    for name, source in (("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("output", "lm_head")):
        writer.add_tensor(f"{name}.weight", state[f"{source}.weight"].numpy())
    for i in range(2):
        layer = f"model.layers.{i}."
        for name, source in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"),
                             ("attn_output", "o_proj")):
            blocks(f"blk.{i}.{name}.weight", state[f"{layer}self_attn.{source}.weight"], formats["attn"])
        for name, source in (("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm"),
                             ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                             ("ffn_gate_inp", "mlp.gate")):
            writer.add_tensor(f"blk.{i}.{name}.weight", state[f"{layer}{source}.weight"].numpy())
        gate_up = state[f"{layer}mlp.experts.gate_up_proj"]
        blocks(f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :768], formats["ffn_gate_exps"])
        blocks(f"blk.{i}.ffn_up_exps.weight", gate_up[:, 768:], formats["ffn_up_exps"])
        blocks(f"blk.{i}.ffn_down_exps.weight", state[f"{layer}mlp.experts.down_proj"], formats["ffn_down_exps"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("compute", ["device", "host"])
def test_a_gguf_moe_keeps_its_expert_stacks_packed_and_equals_transformers_own_gguf_load(tmp_path, compute):
    """Gate and up stacks in one format become each expert's packed gate_up matrix, the down stack (another
    format) its down matrix; the experts cross at the file's bytes and the model equals transformers' own
    dequantized load of the file."""
    from transformers import AutoModelForCausalLM

    _write_moe_gguf(str(tmp_path / "moe.gguf"), {"attn": "Q4_K", "ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q4_K",
                                                "ffn_down_exps": "Q6_K"})
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="moe.gguf").eval()
    want = _reference(reference)
    config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "device": "cpu"}, "compression": {"gguf": "packed"},
              "experts": {"compute": compute, "prefetch": "none"}}
    with tierstore.AutoModel.from_pretrained(str(tmp_path / "moe.gguf"), budget={"vram": "24MB", "ram": "1GB"},
                                             config=config) as streamed:
        experts = streamed.plan.experts
        assert experts.window and experts.device_slots < experts.total_experts
        # an expert as the file holds it: 1536 x 256 weights in Q4_K (144 bytes a 256-block), 256 x 768 in Q6_K
        # (210), aligned: about 5.5 bits a weight where the float32 expert takes 32
        assert 1536 * 144 + 256 * 3 * 210 <= experts.expert_bytes < (1536 * 256 + 256 * 768) * 6 // 8
        layout = streamed.experts.store.layouts[streamed.experts.groups[0].keys[0]]
        assert PACKED in layout.slots
        got = streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
        torch.testing.assert_close(streamed(PROMPT).logits, reference(PROMPT).logits, atol=1e-4, rtol=1e-4)
        report = streamed.report()
    assert got == want
    assert (report.experts["host_computed"] > 0) == (compute == "host")


def test_a_gguf_moe_whose_gate_and_up_differ_in_format_dequantizes_them_and_still_equals_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    _write_moe_gguf(str(tmp_path / "moe.gguf"), {"attn": "Q8_0", "ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q5_K",
                                                "ffn_down_exps": "Q8_0"})
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="moe.gguf").eval()
    config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "device": "cpu"}, "compression": {"gguf": "packed"},
              "experts": {"compute": "device", "prefetch": "none"}}
    with tierstore.AutoModel.from_pretrained(str(tmp_path / "moe.gguf"), budget={"vram": "40MB", "ram": "1GB"},
                                             config=config) as streamed:
        layout = streamed.experts.store.layouts[streamed.experts.groups[0].keys[0]]
        assert PACKED in layout.slots  # the down matrix is packed ...
        assert any(name.endswith("gate_up_proj[0]") for name in layout.slots)  # ... gate_up dequantized
        got = streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
    assert got == _reference(reference)


def test_experts_in_different_formats_or_rotated_are_not_dequantized_as_if_stored_alike():
    from tierstore.compression import Codec, PackedMatrices
    from tierstore.inference.runtime.packed_experts import stored_alike

    def expert(format):
        return PackedMatrices(256 * 64, {"w": (0, (256, 64))}, {"w": (format, 0)})

    plain = Codec.create("q4_k")
    rotated = Codec.create("q4_k", calibration="digest", rounding="gptq", rotation="hadamard")
    assert stored_alike(plain, {"a": expert("Q4_K"), "b": expert("Q4_K")}, ["a", "b"])
    assert not stored_alike(plain, {"a": expert("Q4_K"), "b": expert("Q6_K")}, ["a", "b"])
    assert not stored_alike(rotated, {"a": expert("Q4_K"), "b": expert("Q4_K")}, ["a", "b"])


@pytest.mark.parametrize("compute,at_offsets", [("device", False), ("device", True), ("mapped", True)])
def test_a_decode_steps_gguf_experts_are_multiplied_in_their_blocks_and_give_the_dequantizing_runs_tokens(
        tmp_path, monkeypatch, compute, at_offsets):
    """On a device with the matrix-vector kernels, a decode step's experts are not dequantized into the window:
    each (token, expert) pair's blocks are multiplied in them, one grouped launch a projection (2 pairs a token
    here): gathered from the slots back to back, or (`at_offsets`, where the kernel was checked reading them so)
    where they lie, given each pair's first byte, in the device slots (`device`) or in the span of slots and host
    RAM that experts read in place come from (`mapped`: nothing gathered). Tokens equal, and one token's logits
    within float32 summation error, of the same store run without. The multiply is the reference (the gguf
    package's values times the inputs, each matrix cut from the bytes at its offset): the grouped kernel is
    checked against it in test_ggml_triton.py."""
    gguf = pytest.importorskip("gguf")
    from tierstore import compression, ggml
    from tierstore.compression import Decompressor
    from tierstore.inference.runtime import packed_experts

    _write_moe_gguf(str(tmp_path / "moe.gguf"), {"attn": "Q4_K", "ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q4_K",
                                                "ffn_down_exps": "Q6_K"})
    config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "device": "cpu"}, "compression": {"gguf": "packed"},
              "experts": {"compute": compute, "prefetch": "none"}}
    calls: list[tuple[str, int, bool, bool]] = []

    def reference(format, packed, x, out, grouped=False, offsets=None, offsets_align=1):
        elements, nbytes = ggml.BLOCKS[format]
        if offsets is not None:  # matrix g at offsets[g] in the bytes
            size = out.shape[1] * x.shape[1] // elements * nbytes
            assert all(at % offsets_align == 0 for at in offsets.tolist())
            packed = torch.cat([packed[at:at + size] for at in offsets.tolist()])
        calls.append((format, x.shape[0], grouped, offsets is not None))
        values = torch.from_numpy(gguf.quants.dequantize(packed.numpy().reshape(-1, nbytes),
                                                         gguf.GGMLQuantizationType[format]))
        if grouped:  # one matrix per row of x
            out.copy_(torch.einsum("grc,gc->gr", values.reshape(x.shape[0], out.shape[1], x.shape[1]), x))
        else:
            out.copy_(x @ values.reshape(out.shape[1], x.shape[1]).T)
        return True

    monkeypatch.setattr(packed_experts, "AT_OFFSETS_DEVICES", ("cpu",) if at_offsets else ())

    def run(devices):
        monkeypatch.setattr(Decompressor, "MATVEC_DEVICES", devices)
        monkeypatch.setattr(compression, "ggml_matvec", reference)
        monkeypatch.setattr(packed_experts, "ggml_matvec", reference)
        vram = "24MB" if compute == "device" else "28MB"  # reading in place reserves a gather's buffer too
        with tierstore.AutoModel.from_pretrained(str(tmp_path / "moe.gguf"), budget={"vram": vram, "ram": "1GB"},
                                                 config=config) as streamed:
            assert streamed.experts._unpacker.in_blocks == ("cpu" in devices)
            assert streamed.plan.experts.device_slots < streamed.plan.experts.total_experts
            tokens = streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
            mapped = streamed.report().experts["mapped_pairs"]
            return tokens, streamed(PROMPT[:, :1]).logits, mapped

    plain_tokens, plain_logits, _ = run(("cuda",))
    assert calls == []
    blocks_tokens, blocks_logits, mapped = run(("cuda", "cpu"))
    assert (mapped > 0) == (compute == "mapped")
    # each decode step (and the one-token forward): 2 layers x (gate_up in Q4_K, down in Q6_K), 2 pairs each, every
    # matrix read at its pairs' offsets; read in place, the prompt's pairs too
    grouped = [(format, pairs) for format, pairs, is_grouped, _ in calls if is_grouped]
    assert grouped.count(("Q4_K", 2)) == grouped.count(("Q6_K", 2)) == 2 * NEW_TOKENS
    assert len(grouped) == 4 * NEW_TOKENS + (4 if compute == "mapped" else 0)
    assert all(at == at_offsets for _, _, is_grouped, at in calls if is_grouped)
    assert blocks_tokens == plain_tokens
    torch.testing.assert_close(blocks_logits, plain_logits, atol=1e-4, rtol=1e-4)
