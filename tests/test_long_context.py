"""Long prompts within the budget: fed in chunks, they give transformers' own greedy tokens and logits."""
import dataclasses
import json

import pytest
import torch
from tierstore.inference.placement.prefill import activation_bytes_per_token, plan_prefill
from tierstore.inference.runtime import chunk_attention
from tierstore.policies.dense import slot_bytes
from tierstore.policies.planner import make_plan

import tierstore
from tierstore.errors import BudgetError

PROMPT = torch.tensor([[(7 * i + 3) % 250 + 3 for i in range(61)]])


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts the chunk attention's calls that attended lower-right without a mask."""
    calls = []
    real = chunk_attention.causal_lower_right

    def counted(*size):
        calls.append(size)
        return real(*size)
    monkeypatch.setattr(chunk_attention, "causal_lower_right", counted)
    return calls


def _config(cache_config, chunk):
    return {**cache_config, "runtime": {**cache_config["runtime"], "prefill_chunk": chunk}}


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "mixtral"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 60])
def test_chunked_prompt_gives_transformers_tokens(model_type, chunk, tiny_dirs, cache_config, attention_calls):
    directory, reference = tiny_dirs(model_type)
    want = reference.generate(PROMPT, max_new_tokens=8, do_sample=False)
    with tierstore.AutoModel.from_pretrained(directory, config=_config(cache_config, chunk)) as model:
        got = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
    assert got.tolist() == want.tolist()
    chunks = -(-(PROMPT.shape[1] - 1) // chunk)
    if chunks > 1 and chunk > 1:  # every chunk after the first attends lower-right, in each layer, without a mask
        assert len(attention_calls) == (chunks - 1) * reference.config.num_hidden_layers
        assert all(queries < keys for queries, keys in attention_calls)


def test_sliding_window_chunks_keep_the_window(tiny_dirs, cache_config, attention_calls, tmp_path):
    """A window shorter than the prompt: chunks across it still see only the window (transformers' mask)."""
    from conftest import tiny_model

    reference = tiny_model("mistral")
    reference.config.sliding_window = 12
    directory = tmp_path / "mistral-window"
    reference.save_pretrained(directory)
    assert not chunk_attention.takes_lower_right(reference.config, PROMPT.shape[1])
    want = reference.generate(PROMPT, max_new_tokens=8, do_sample=False)
    for chunk in (5, 16):
        with tierstore.AutoModel.from_pretrained(str(directory), config=_config(cache_config, chunk)) as model:
            assert model.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist() == want.tolist()
    assert attention_calls == []
    full = reference.generate(PROMPT, max_new_tokens=8, do_sample=False, use_cache=False)
    assert full.tolist() == want.tolist()  # the window matters: transformers agrees with itself without a cache


def test_chunked_logits_match_one_pass(tiny_dirs, cache_config):
    from tierstore.inference.decoding.prefill import prefill
    from transformers import DynamicCache

    directory, reference = tiny_dirs("llama")
    with torch.no_grad():
        want = reference(PROMPT).logits[:, -1]
    with tierstore.AutoModel.from_pretrained(directory, config=cache_config) as model:
        cache = DynamicCache(config=model.model.config)
        with torch.no_grad():
            prefill(model.model, PROMPT, cache, 9, stop=PROMPT.shape[1] - 1)
            got = model(PROMPT[:, -1:], past_key_values=cache).logits[:, -1]
        assert cache.get_seq_length() == PROMPT.shape[1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_in_chunks_equals_each_alone(tiny_dirs, cache_config):
    directory, reference = tiny_dirs("qwen2")
    prompts = [PROMPT[0, :40].tolist(), PROMPT[0, 5:19].tolist(), PROMPT[0, :3].tolist()]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with tierstore.AutoModel.from_pretrained(directory, config=_config(cache_config, 6)) as model:
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        alone = reference.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert batch[row, width:].tolist() == alone[0, len(prompt):].tolist()


def test_prefill_chunk_is_validated():
    with pytest.raises(tierstore.ConfigError, match="runtime.prefill_chunk"):
        tierstore.Config.from_dict({"runtime": {"prefill_chunk": 0}})


def test_chunks_are_planned_within_the_device_budget(tiny_dirs, cache_config):
    """On a GPU-like budget: a short prompt runs in one pass; a long one in chunks whose activations, the KV
    cache's reserve and the weights' plan all fit the device budget; when the budget holds every weight beside the
    chunks, they all stay resident."""
    directory, reference = tiny_dirs("llama")
    with tierstore.AutoModel.from_pretrained(directory, config=cache_config) as model:
        gpu = dataclasses.replace(model.kv_budget, separate_device=True)
        per_token = activation_bytes_per_token(reference.config, torch.float32, 0)
        weights = sum(unit.nbytes for unit in gpu.plan_input.units)
        assert plan_prefill(gpu, model.plan, 100, 1, False, None).chunk_tokens == 100
        reserve, rows = 300 * 2**20, 2000  # a batch of 2000 rows: chunk activations far above the slack
        streaming = reserve + slot_bytes(gpu.plan_input.units, 1) + 100 * rows * per_token
        for device_bytes, all_resident in ((streaming, False), (reserve + weights + 2**30, True)):
            planned_input = dataclasses.replace(gpu.plan_input, device_budget_bytes=device_bytes,
                                                device_reserve_bytes=reserve)
            plan = make_plan(planned_input)
            budget = dataclasses.replace(gpu, plan_input=planned_input)
            long = plan_prefill(budget, plan, 10**6, rows, False, None)
            assert 64 <= long.chunk_tokens < 10**6 and long.plan is not None and "chunks of" in long.note
            chunk_bytes = long.chunk_tokens * rows * per_token
            assert long.plan.device_reserve_bytes == plan.device_reserve_bytes + chunk_bytes
            assert long.plan.device_reserve_bytes + long.plan.device_weights_bytes <= device_bytes
            assert (len(long.plan.device_resident) == len(gpu.plan_input.units)) == all_resident
            masked = plan_prefill(budget, plan, 5000, rows, True, None)  # a mask row grows with the prompt
            assert masked.chunk_tokens < plan_prefill(budget, plan, 5000, rows, False, None).chunk_tokens
        with pytest.raises(BudgetError, match="activations take"):
            plan_prefill(budget, plan, 10**6, rows, True, None)


def test_reserved_cache_writes_in_place_and_survives_replacement():
    from tierstore.inference.runtime.reserved_cache import ReservedLayer

    layer = ReservedLayer(10)
    chunks = [torch.randn(2, 3, n, 4) for n in (4, 5)]
    for chunk in chunks:
        keys, values = layer.update(chunk, -chunk)
    buffer = layer._buffers[0]
    assert keys.data_ptr() == buffer.data_ptr() and buffer.shape[-2] == 10
    torch.testing.assert_close(keys, torch.cat(chunks, dim=-2))
    layer.keys, layer.values = layer.keys[1:], layer.values[1:]  # rows selected: the next update copies them out
    more = torch.randn(1, 3, 3, 4)  # past its capacity, too
    keys, values = layer.update(more, -more)
    torch.testing.assert_close(keys, torch.cat([chunks[0][1:], chunks[1][1:], more], dim=-2))
    torch.testing.assert_close(values, -keys)
    assert layer._buffers[0].shape[-2] > 12


def _prefix_config(cache_config, directory):
    return {**cache_config, "runtime": {**cache_config["runtime"], "prefix_cache_dir": str(directory)}}


def test_a_repeated_prefix_is_served_from_the_cache(tiny_dirs, cache_config, tmp_path):
    """A second turn that starts with the first turn's prompt and answer skips their prefill (counted), with the
    tokens transformers gives; a new process finds the entry on disk."""
    directory, reference = tiny_dirs("llama")
    config = _prefix_config(cache_config, tmp_path / "prefixes")
    first = PROMPT[:, :40]
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        turn = model.generate(first, max_new_tokens=6, do_sample=False)
        assert turn.tolist() == reference.generate(first, max_new_tokens=6, do_sample=False).tolist()
        second = torch.cat([turn, PROMPT[:, 40:52]], dim=1)
        got = model.generate(second, max_new_tokens=6, do_sample=False)
        stats = model.prefix_cache().stats
        assert stats.hits == 1 and stats.tokens_saved == turn.shape[1] - 1
        assert any("prefix cache" in note for note in model.report().notes)
    assert got.tolist() == reference.generate(second, max_new_tokens=6, do_sample=False).tolist()
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:  # from disk, in a new run
        assert model.generate(second, max_new_tokens=6, do_sample=False).tolist() == got.tolist()
        assert model.prefix_cache().stats.hits == 1 and model.prefix_cache().stats.refused == 0


def test_a_corrupt_or_partial_prefix_entry_is_never_served(tiny_dirs, cache_config, tmp_path):
    from tierstore.inference.runtime.prefix_cache import SUFFIX

    directory, reference = tiny_dirs("llama")
    store = tmp_path / "prefixes"
    config = _prefix_config(cache_config, store)
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        model.generate(PROMPT[:, :40], max_new_tokens=4, do_sample=False)
    (entry,) = [p for p in store.iterdir() if p.name.endswith(SUFFIX)]
    data = bytearray(entry.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the last layer's values
    entry.write_bytes(bytes(data))
    (store / ".tmp-killed.kv.safetensors").write_bytes(bytes(data[:100]))  # a write a killed run left
    want = reference.generate(PROMPT, max_new_tokens=4, do_sample=False)
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        assert model.generate(PROMPT, max_new_tokens=4, do_sample=False).tolist() == want.tolist()
        stats = model.prefix_cache().stats
        assert stats.hits == 0 and stats.refused == 1
    assert not (store / ".tmp-killed.kv.safetensors").exists() and not entry.exists()


def _layers(tokens, layers=3, seed=0):
    """One sequence's KV cache [1, heads 2, tokens, head_dim 8] per layer, each tensor cut from a wider batch (not
    contiguous, as the batcher's rows are)."""
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(3, 2, tokens + 5, 8, generator=generator)[1:2, :, 5:] for _ in range(2))
            for _ in range(layers)]


def test_an_entry_is_copied_into_one_host_buffer():
    from tierstore.inference.runtime.host_copy import ALIGN_BYTES, copy_to_host, host_bytes

    layers = _layers(37)
    buffer = torch.empty(host_bytes(layers), dtype=torch.uint8)
    copied = copy_to_host(layers, buffer)
    assert [(k.tolist(), v.tolist()) for k, v in copied] == [(k.tolist(), v.tolist()) for k, v in layers]
    offsets = [t.data_ptr() - buffer.data_ptr() for pair in copied for t in pair]
    assert offsets == sorted(offsets) and all(offset % ALIGN_BYTES == 0 for offset in offsets)
    assert offsets[-1] + copied[-1][1].nbytes <= buffer.numel()


def test_entries_live_in_one_arena_within_the_ram_bytes():
    """Entries are pieces of the cache's one arena: the least recently used leaves (its piece reused) when a new
    one needs the room, and an entry larger than the RAM is not kept there."""
    from tierstore.inference.runtime.host_copy import host_bytes
    from tierstore.inference.runtime.prefix_cache import PrefixCache

    entry = -(-host_bytes(_layers(40)) // 4096) * 4096  # pieces come in pages
    prefixes = PrefixCache("key", ram_bytes=2 * entry)
    arena = prefixes._arena.buffer
    tokens = [[seed * 100 + i for i in range(40)] for seed in range(3)]
    try:
        for seed in range(3):
            prefixes.store(tokens[seed], _layers(40, seed=seed))
            prefixes.settle()
        assert prefixes.lookup(tokens[0] + [7]) is None  # the least recently used made room
        for seed in (1, 2):
            got = prefixes.lookup(tokens[seed] + [7])
            assert got is not None and got[0] == 40 and torch.equal(got[1][2][1], _layers(40, seed=seed)[2][1])
            start = got[1][0][0].data_ptr() - arena.data_ptr()
            assert 0 <= start < arena.numel()
        prefixes.store(list(range(1000, 1090)), _layers(90))  # larger than the RAM: no disk, so not kept
        prefixes.settle()
        assert prefixes.lookup(list(range(1000, 1091))) is None and prefixes.stats.stored == 3
        assert prefixes.lookup(tokens[2] + [7]) is not None  # and nothing made room for it
    finally:
        prefixes.close()


def test_the_sequence_kept_on_the_device_serves_the_next_lookup_only():
    from tierstore.inference.runtime.prefix_cache import PrefixCache

    prefixes = PrefixCache("key", ram_bytes=2**20)
    tokens = list(range(50, 90))
    try:
        prefixes.store(tokens, _layers(40))
        kept = _layers(40, seed=5)
        prefixes.keep_on_device(tokens, kept)
        got = prefixes.lookup(tokens + [3])
        assert got is not None and got[0] == 40 and got[1][1][0].data_ptr() == kept[1][0].data_ptr()
        assert prefixes.stats.on_device == 1 and prefixes._on_device is None
        got = prefixes.lookup(tokens + [3])  # from RAM now
        assert got is not None and got[1][1][0].data_ptr() != kept[1][0].data_ptr()
        prefixes.keep_on_device(tokens, kept)
        assert prefixes.lookup([1] * 30) is None and prefixes._on_device is None  # let go on a miss too
        assert (prefixes.stats.hits, prefixes.stats.on_device, prefixes.stats.misses) == (2, 1, 1)
    finally:
        prefixes.close()


def test_a_server_turn_that_repeats_a_finished_one_skips_its_prefill(smollm2_store, smollm2_reference, tmp_path):
    """Through the batcher (as the server runs): a second turn that starts with a finished sequence (prompt and
    answer) joins from its KV cache, beside a request that does not, and both get transformers' tokens; the same
    turn again is served from RAM."""
    import threading
    import time

    from tierstore.inference.front.batcher import Batcher, SamplingParams

    reference, tokenizer = smollm2_reference
    turn = [{"role": "user", "content": "Name three colours of the rainbow."}]
    first = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=False)
    with tierstore.AutoModel.from_pretrained(smollm2_store[0], config={"runtime": {"cache_dir": str(tmp_path)}}) \
            as model:
        batcher = Batcher(model, max_batch=4, max_queue=4, max_seq_tokens=400)
        try:
            def run(prompts, max_tokens=12):
                done = [threading.Event() for _ in prompts]
                sequences = [batcher.submit(p, SamplingParams(max_tokens=max_tokens, temperature=0),
                                            lambda event, i=i: event.finish_reason and done[i].set())
                             for i, p in enumerate(prompts)]
                deadline = time.monotonic() + 120
                while not all(d.is_set() for d in done) and time.monotonic() < deadline:
                    time.sleep(0.01)
                return [s.tokens for s in sequences]

            (answer,) = run([first])
            second = first + answer + tokenizer("And three more?", add_special_tokens=False).input_ids
            other = tokenizer("The capital of France is", add_special_tokens=False).input_ids
            got = run([second, other])
            stats = batcher.prefixes.stats
            assert stats.hits == 1 and stats.on_device == 1  # the drained batch's cache, kept where it was
            assert stats.tokens_saved == len(first) + len(answer) - 1
            assert run([second]) == [got[0]]  # from RAM: two rows left the last batch, none was kept on the device
            assert (stats.hits, stats.on_device) == (2, 1)
            passes = []
            hook = model.model.register_forward_pre_hook(lambda *_: passes.append(1))
            assert run([second], max_tokens=1) == [got[0][:1]]
            hook.remove()
            assert len(passes) == 1  # and no pass over an empty batch after it
        finally:
            batcher.close()
    for prompt, tokens in zip([second, other], got):
        want = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
        assert tokens == want[:len(tokens)].tolist()


def test_a_server_prompt_too_long_for_one_pass_joins_in_chunks(smollm2_store, smollm2_reference, tmp_path):
    """Through the batcher: a prompt whose one pass would not fit is fed apart in chunks (as generate feeds it),
    beside a running short one, and both get transformers' tokens."""
    import time

    from tierstore.inference.front.batcher import Batcher, SamplingParams

    reference, tokenizer = smollm2_reference
    long = tokenizer(" ".join(f"word{i}" for i in range(60)), add_special_tokens=False).input_ids
    short = tokenizer("The capital of France is", add_special_tokens=False).input_ids
    config = {"runtime": {"cache_dir": str(tmp_path), "prefill_chunk": 32, "prefix_cache_ram": 0}}
    with tierstore.AutoModel.from_pretrained(smollm2_store[0], config=config) as model:
        batcher = Batcher(model, max_batch=4, max_queue=4, max_seq_tokens=400)
        try:
            assert batcher.prefixes is None
            first = batcher.submit(short, SamplingParams(max_tokens=12, temperature=0), lambda event: None)
            second = batcher.submit(long, SamplingParams(max_tokens=8, temperature=0), lambda event: None)
            deadline = time.monotonic() + 120
            while not (first.finish_reason and second.finish_reason) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            batcher.close()
    assert len(long) > 64
    for prompt, sequence in ((short, first), (long, second)):
        want = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
        assert sequence.tokens == want[:len(sequence.tokens)].tolist() and len(sequence.tokens) >= 8


def test_the_report_says_where_the_kv_cache_was_and_what_the_prompt_reused(tiny_dirs, cache_config, tmp_path):
    directory, _ = tiny_dirs("llama")
    config = _prefix_config(_config(cache_config, 16), tmp_path / "prefixes")
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        assert model.report().kv is None
        out = model.generate(PROMPT, max_new_tokens=4, do_sample=False)
        model.generate(torch.cat([out, PROMPT[:, :20]], dim=1), max_new_tokens=4, do_sample=False)
        kv = model.report().to_dict()["kv"]
        assert kv["tier"] == "device" and kv["moved_bytes_per_pass"] == 0
        assert kv["cache_tokens"] == out.shape[1] + 20 + 4 and kv["bytes"] == model.kv_budget.cache_bytes(
            kv["cache_tokens"])
        assert kv["prefix_tokens_reused"] == out.shape[1] - 1 and kv["prompt_chunk_tokens"] == 16
        assert kv["prefix"]["hits"] == 1 and kv["prefix"]["misses"] == 1
        assert "KV cache" in str(model.report())


def test_generate_takes_a_prefix_cache_directory(smollm2_store, tmp_path):
    """`tierstore generate --prefix-cache DIR`: the second run starts from the first run's entry; a file given as
    the directory is refused in one line."""
    import subprocess
    import sys

    store, _ = smollm2_store
    base = [sys.executable, "-m", "tierstore", "generate", store, "--max-new-tokens", "4", "--prefix-cache",
            str(tmp_path / "prefixes"), "--report-json"]
    for run in range(2):
        out = subprocess.run([*base, str(tmp_path / f"r{run}.json"), "--prompt", "What is the capital of France?"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
    kv = json.loads((tmp_path / "r1.json").read_text())["kv"]
    assert kv["prefix"]["hits"] == 1 and kv["prefix_tokens_reused"] > 16
    (tmp_path / "a-file").write_text("x")
    bad = subprocess.run([*base[:-3], "--prefix-cache", str(tmp_path / "a-file"), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is a file" in bad.stderr and "Traceback" not in bad.stderr
