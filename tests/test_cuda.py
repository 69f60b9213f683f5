"""CUDA tests: run through the device tool (skipped without a GPU)."""
import pytest
import torch
from conftest import unit_sizes
from tierstore.policies import PlanInput, UnitInfo, make_plan

import tierstore
from tierstore.store import TieredStore
from tierstore.transfer import CUDATransfer
from tierstore.units import UnitLayout

pytestmark = pytest.mark.cuda


class ValueSource:
    """Unit i is a large tensor filled with the value i."""

    def __init__(self, n, numel):
        self.layouts = {f"u{i}": UnitLayout.pack(f"u{i}", {"w": (torch.float32, (numel,))}) for i in range(n)}

    def layout(self, key):
        return self.layouts[key]

    def read_into(self, key, out):
        self.layouts[key].views(out)["w"].fill_(float(key[1:]))


def test_a_slot_is_never_overwritten_while_in_use_poison_and_check():
    n, numel = 6, 8 * 2**20  # 32 MiB units
    source = ValueSource(n, numel)
    nbytes = source.layouts["u0"].nbytes
    schedule = tuple(source.layouts)
    plan = make_plan(PlanInput(units=tuple(UnitInfo(k, nbytes) for k in schedule), schedule=schedule,
                               device_budget_bytes=2 * nbytes, host_budget_bytes=n * nbytes, prefetch_depth=1))
    assert plan.device_resident == ()
    store = TieredStore(source, source.layouts, plan, CUDATransfer(torch.device("cuda", 0), True, n * nbytes))
    bad = torch.zeros((), dtype=torch.int64, device="cuda")
    for _ in range(20):
        for position, key in enumerate(schedule):
            weights = store.get(key, position)["w"]
            torch.cuda._sleep(2_000_000)  # a slow compute, so a copy that does not wait would land inside it
            bad += (weights != float(key[1:])).sum()
            weights.fill_(float("nan"))  # poison: a unit read again without being copied again is caught
            store.release(key)
    torch.cuda.synchronize()
    assert store.device.stats.hits == 0  # every get was a copy, so the poison never meets a legitimate read
    assert bad.item() == 0
    store.close()


def _tiny(tmp_path):
    from conftest import tiny_model

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m"), model


def test_tokens_identical_and_vram_within_budget(tmp_path):
    directory, reference = _tiny(tmp_path)
    reference = reference.to("cuda")
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3]], device="cuda")
    want = reference.generate(ids, max_new_tokens=16, do_sample=False).tolist()
    reference.cpu()
    torch.cuda.empty_cache()
    _, layer = unit_sizes(directory, str(tmp_path / "sizes"))
    budget = tierstore.Budget(vram=300 * 2**20, ram="1GB")
    config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "device_reserve": 300 * 2**20 - 3 * layer - 70_000}}
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, dtype=torch.float32) as model:
        assert model.plan.regime != "device" and model.device.type == "cuda"
        got = model.generate(ids.cpu(), max_new_tokens=16, do_sample=False).tolist()
        peak = torch.cuda.max_memory_allocated() - base
        weights_peak = model.report().tiers["device"].peak_bytes
    assert got == want
    assert weights_peak <= model.plan.device_weights_bytes
    assert peak <= budget.vram, f"peak {peak} > budget {budget.vram}"
    print(f"\ncuda tiny llama: tokens identical, peak VRAM {peak} bytes <= budget {budget.vram}")


@pytest.mark.parametrize("compress", ["none", "nf4"])
def test_resident_decode_replays_a_cuda_graph_with_the_eager_tokens_within_the_budget(compress, tmp_path):
    """Every unit on the device: decode steps replay one CUDA graph (float32, a sampled and a greedy call, batch
    one and two), giving the eager run's tokens (`cuda_graphs = off`), within the budget; a second call of the same
    size reuses the graph; a streamed model says why it is not graphed."""
    directory, _ = _tiny(tmp_path)
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3], [8, 1, 4, 4, 60, 2, 19]])
    budget = tierstore.Budget(vram="1GB", ram="1GB")
    runs = {}
    for graphs in ("off", "auto"):
        config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "cuda_graphs": graphs},
                  "compression": {"format": compress}}
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config,
                                                 dtype=torch.float32) as model:
            assert model.plan.regime == "device"
            calls, notes = [], []
            for rows in (ids[:1], ids, ids):
                calls.append(model.generate(rows, max_new_tokens=24, do_sample=False).tolist())
                calls.append(model.report().timing.graphed)
                notes.extend(model.report().notes)
            torch.manual_seed(0)
            calls.append(model.generate(ids[:1], max_new_tokens=24, do_sample=True, top_k=20).tolist())
        peak = torch.cuda.max_memory_allocated() - base
        assert peak <= budget.vram, f"peak {peak} > budget {budget.vram}"
        runs[graphs] = calls, notes
    (eager, _), (graphed, notes) = runs["off"], runs["auto"]
    assert [c for c in eager if not isinstance(c, bool)] == [c for c in graphed if not isinstance(c, bool)]
    assert [c for c in eager if isinstance(c, bool)] == [False] * 3
    assert [c for c in graphed if isinstance(c, bool)] == [True] * 3
    assert any("CUDA graph of an earlier call" in note for note in notes), notes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_rotary_kernel_gives_transformers_values_on_cuda_bit_for_bit(dtype):
    """The compiled kernel (inference/runtime/rotary_kernel.py) against transformers' apply_rotary_pos_emb on the
    GPU: queries laid out as attention makes them, keys of fewer heads, cos and sin of one batch row or each, widths
    64, 128 and 80 (a half that is no power of two): equal bit for bit, in bfloat16 too (the interpreter cannot
    check that one on the CPU)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from tierstore.inference.runtime.rotary_kernel import rotate

    generator = torch.Generator(device="cuda").manual_seed(0)
    for width, cos_batch, positions in ((64, 1, 1), (128, 2, 5), (80, 1, 3)):
        q = torch.randn(2, positions, 8, width, generator=generator, device="cuda").to(dtype).transpose(1, 2)
        k = torch.randn(2, 2, positions, width, generator=generator, device="cuda").to(dtype)
        cos, sin = (torch.randn(cos_batch, positions, width, generator=generator, device="cuda").to(dtype)
                    for _ in range(2))
        got, want = rotate(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (width, cos_batch)


def test_graphed_decode_steps_with_the_rotary_kernel_give_the_tokens_of_transformers_function(tmp_path, monkeypatch):
    """A resident bf16 model on CUDA, decode steps replayed from a graph: `runtime.fused_rotary` auto (one kernel a
    layer, the plan says so) gives the same greedy tokens and the same last logits as off (transformers' own)."""
    from tierstore.inference.runtime import fused_rotary

    monkeypatch.setattr(fused_rotary, "DEVICES", ("cuda",))  # what fused_rotary.DEVICES rests on
    directory, _ = _tiny(tmp_path)
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3]])
    runs = {}
    for setting in ("auto", "off"):
        config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "fused_rotary": setting}}
        with tierstore.AutoModel.from_pretrained(directory, budget=tierstore.Budget(vram="1GB", ram="1GB"),
                                                 config=config, dtype=torch.bfloat16) as model:
            noted = any(note.startswith("rotary embedding: one kernel a layer") for note in model.plan.notes)
            tokens = model.generate(ids, max_new_tokens=24, do_sample=False).tolist()
            runs[setting] = tokens, model(torch.tensor([tokens[0]])).logits[0, -1], model.report().timing.graphed, noted
    assert runs["auto"][2] and runs["off"][2]
    assert runs["auto"][3] and not runs["off"][3]
    assert runs["auto"][0] == runs["off"][0]
    assert torch.equal(runs["auto"][1], runs["off"][1])


def _half_resident_budget(directory, config):
    """A budget whose device tier, beside `config`'s reserve and what the plan adds to it (a dequantization
    buffer), holds three of the tiny model's layers as stored under `config`: two stay resident, two stream."""
    on_cpu = {**config, "runtime": {**config["runtime"], "device": "cpu"}}
    with tierstore.AutoModel.from_pretrained(directory, config=on_cpu, dtype=torch.float32) as model:
        layer = model.store.layouts["layers.0"].nbytes
        added = sum(nbytes for _, nbytes in model.plan.reserve_parts)
    return tierstore.Budget(vram=config["runtime"]["device_reserve"] + added + 3 * layer + 70_000, ram="1GB")


@pytest.mark.parametrize("compress", ["none", "q8_0"])
def test_a_streamed_models_resident_layers_replay_graphs_with_the_eager_tokens(compress, tmp_path):
    """Some layers streamed, the others kept on the device (float32, and packed in Q8_0, dequantized inside each
    layer's graph): decode steps run eagerly with each resident layer replayed from a CUDA graph of its own (with
    `cuda_graphs = auto`, each streamed one too while its units land where it was recorded; `resident`: only the
    resident ones), giving the eager run's tokens (`cuda_graphs = off`) over three calls (greedy, again, sampled),
    within the budget; the report counts every resident layer replayed on every decode step but the first call's
    first two, and with `auto` streamed layers replayed in every call."""
    directory, _ = _tiny(tmp_path)
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3]])
    budget = _half_resident_budget(directory, {"runtime": {"cache_dir": str(tmp_path / "cache"),
                                                           "device_reserve": 300 * 2**20},
                                               "compression": {"format": compress}})
    runs = {}
    for graphs in ("off", "resident", "auto"):
        config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "cuda_graphs": graphs,
                              "device_reserve": 300 * 2**20}, "compression": {"format": compress}}
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config,
                                                 dtype=torch.float32) as model:
            resident = model._resident_layers()
            assert 0 < len(resident) < model.model.config.num_hidden_layers
            calls, notes = [], []
            for sampled in (False, False, True):
                torch.manual_seed(0)
                calls.append(model.generate(ids, max_new_tokens=24, do_sample=sampled, top_k=20).tolist())
                notes.extend(model.report().notes)
        peak = torch.cuda.max_memory_allocated() - base
        assert peak <= budget.vram, f"peak {peak} > budget {budget.vram}"
        runs[graphs] = calls, notes, len(resident)
    (eager, _, _), (graphed, notes, resident) = runs["off"], runs["resident"]
    assert graphed == eager
    replays = [int(note.split(": ")[1].split()[0]) for note in notes if "CUDA graphs of their own" in note]
    steps = [len(call[0]) - ids.shape[1] - 1 for call in graphed]  # decode steps (a call may end at its EOS)
    assert replays == [(steps[0] - 2) * resident, steps[1] * resident, steps[2] * resident], notes
    assert not any("streamed layers: " in note for note in notes), notes
    streamed_run, notes, _ = runs["auto"]  # the streamed layers' graphs too: replayed in every call
    assert streamed_run == eager
    streamed = [int(note.split("streamed layers: ")[1].split()[0]) for note in notes if "streamed layers: " in note]
    assert len(streamed) == 3 and all(count > 0 for count in streamed), notes


def test_smollm2_on_cuda_matches_transformers(smollm2_store, smollm2_reference, tmp_path):
    store_dir, _ = smollm2_store
    reference, tokenizer = smollm2_reference
    reference = reference.to("cuda")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    want = reference.generate(ids.cuda(), max_new_tokens=20, do_sample=False).tolist()
    reference.cpu()
    config = {"runtime": {"cache_dir": str(tmp_path)}}
    with tierstore.AutoModel.from_pretrained(store_dir, budget=tierstore.Budget(vram="600MB", ram="300MB"),
                                             config=config, dtype=torch.float32) as model:
        got = model.generate(ids, max_new_tokens=20, do_sample=False).tolist()
        print(model.report())
    assert got == want


def test_kv_cache_larger_than_the_reserve_replans_and_holds_the_budget(tmp_path):
    directory, reference = _tiny(tmp_path)
    ids = torch.randint(3, 250, (8, 40), generator=torch.Generator().manual_seed(0))
    want = reference.to("cuda").generate(ids.cuda(), max_new_tokens=20, do_sample=False).tolist()
    reference.cpu()
    budget = tierstore.Budget(vram=300 * 2**20, ram="1GB")
    config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "device_reserve": 256 * 2**20 + 1000}}
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, dtype=torch.float32) as model:
        before = model.plan.device_reserve_bytes
        got = model.generate(ids, max_new_tokens=20, do_sample=False).tolist()
        assert model.plan.device_reserve_bytes > before and model.report().notes
        assert model.report().tiers["device"].peak_bytes <= budget.vram
    assert got == want


def test_cached_blocks_are_given_back_only_when_they_and_the_next_work_would_pass_the_budget():
    from tierstore.inference.devices import give_back_cache

    device = torch.device("cuda", 0)
    torch.cuda.empty_cache()
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    del block  # freed, and kept by the allocator's cache
    held = torch.cuda.memory_reserved(device)
    assert held >= 64 * 2**20
    assert not give_back_cache(device, held + 32 * 2**20, 32 * 2**20)  # fits beside the cache: kept
    assert torch.cuda.memory_reserved(device) == held
    assert give_back_cache(device, held + 32 * 2**20, 33 * 2**20)  # would pass it: given back
    assert torch.cuda.memory_reserved(device) <= held - 64 * 2**20
    assert not give_back_cache(torch.device("cpu"), 0, 2**40)  # a CPU has no such cache


def test_less_free_vram_than_the_budget_shrinks_the_plan_or_refuses_clearly(tmp_path):
    directory, reference = _tiny(tmp_path)
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3]])
    want = reference.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    config = {"runtime": {"cache_dir": str(tmp_path / "cache")}}
    budget = tierstore.Budget(vram="4GB", ram="1GB")
    for leave_free, fits in ((700 * 2**20, True), (64 * 2**20, False)):
        free, _ = torch.cuda.mem_get_info()
        hog = torch.empty(free - leave_free, dtype=torch.uint8, device="cuda")  # another allocation holds memory
        try:
            if fits:
                with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config,
                                                         dtype=torch.float32) as model:
                    assert any("vram budget 4GB is more than" in note and "capped by" in note
                               for note in model.plan.notes), model.plan.notes
                    assert model.plan.device_budget_bytes <= leave_free
                    assert model.generate(ids, max_new_tokens=8, do_sample=False).tolist() == want
            else:
                with pytest.raises(tierstore.BudgetError, match="device budget"):
                    tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, dtype=torch.float32)
        finally:
            del hog
            torch.cuda.empty_cache()


def _streaming_budget(directory, config):
    """The largest device budget (the reserve plus at most 200 KB) under which the compressed model streams: its
    input embedding stays in RAM, so nf4 layers fit where int8 ones stream."""
    for room in range(200_000, 0, -8_000):
        budget = tierstore.Budget(vram=256 * 2**20 + room, ram="1GB")
        try:
            with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config,
                                                     dtype=torch.float16) as model:
                if model.plan.regime != "device":
                    return budget
        except tierstore.BudgetError:
            break
    pytest.fail("no budget streams this model")


@pytest.mark.parametrize("codec", ["nf4", "int8"])
def test_compressed_tokens_match_the_dequantized_model_and_vram_within_budget(codec, tmp_path):
    """fp16 on the GPU: tierstore's compressed units (quantized and dequantized on the GPU) against transformers'
    model whose layer matrices went through bitsandbytes' own quantize/dequantize; budget held, scratch included."""
    from test_compression import dequantized_like_bitsandbytes

    directory, original = _tiny(tmp_path)
    reference = dequantized_like_bitsandbytes(original.half().cuda(), codec)
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3]], device="cuda")
    want = reference.generate(ids, max_new_tokens=16, do_sample=False).tolist()
    want_logits = reference(ids).logits
    del reference
    torch.cuda.empty_cache()
    config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "device_reserve": 256 * 2**20},
              "compression": {"format": codec}}
    budget = _streaming_budget(directory, config)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, dtype=torch.float16) as model:
        assert model.plan.regime != "device", model.plan
        got = model.generate(ids.cpu(), max_new_tokens=16, do_sample=False).tolist()
        logits = model(ids).logits
        peak = torch.cuda.max_memory_allocated() - base
        weights_peak = model.report().tiers["device"].peak_bytes
        print(model.report())
    assert weights_peak <= model.plan.device_weights_bytes
    assert got == want
    torch.testing.assert_close(logits, want_logits, atol=1e-2, rtol=1e-2)  # fp16: kernels may differ by an ulp
    assert peak <= budget.vram, f"peak {peak} > budget {budget.vram}"
    print(f"\ncuda tiny llama {codec}: tokens identical to bitsandbytes' dequantized model, peak VRAM {peak} "
          f"bytes <= budget {budget.vram}")


def test_speculation_on_cuda_replays_a_graph_and_keeps_the_tokens(tmp_path):
    """Streamed float32 model on the GPU, drafts ngram, itself and a different model: the draft steps replay a
    CUDA graph, the tokens equal plain decoding, and the draft's bytes stay inside the device budget."""
    from conftest import tiny_model

    directory, reference = _tiny(tmp_path)
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "other")
    _, layer = unit_sizes(directory, str(tmp_path / "sizes"))
    streaming = 300 * 2**20  # the reserve leaves room for three layers and a small unit
    config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "device_reserve": streaming - 3 * layer - 70_000},
              "speculation": {"depth": 6, "width": 4}}
    draft_bytes = sum(p.numel() for p in reference.parameters()) * 4 + 1024 * 1024  # weights, 1024 tokens of KV
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3, 5, 9, 33, 7, 81]])
    with tierstore.AutoModel.from_pretrained(directory, budget=tierstore.Budget(vram=streaming, ram="1GB"),
                                             config=config, dtype=torch.float32) as plain:
        want = plain.generate(ids, max_new_tokens=40, do_sample=False).tolist()
    for draft in ("ngram", directory, str(tmp_path / "other")):
        budget = tierstore.Budget(vram=streaming + (0 if draft == "ngram" else draft_bytes), ram="1GB")
        got, spec = _streamed_speculation(directory, draft, budget, config, ids)
        assert got == want, draft
        assert spec["graphed"] is (None if draft == "ngram" else True), spec
        if draft == directory:
            assert spec["acceptance_rate"] == 1.0 and spec["tokens_per_pass"] > 4, spec
        print(f"\ncuda speculation, draft {draft}: tokens identical, {spec['tokens_per_pass']:.2f} tokens per "
              f"pass, graphed {spec['graphed']}")


def test_a_graphed_draft_steps_children_are_the_draft_models_own_likeliest_tokens(tmp_path):
    """The draft's steps replayed from a CUDA graph (their bias, warp and top-k recorded in it, their inputs copied
    from pinned buffers) give each node the children transformers' model gives after its path."""
    from test_speculation import check_draft_children

    directory, reference = _tiny(tmp_path)
    graphed = check_draft_children(directory, reference, {"runtime": {"cache_dir": str(tmp_path / "cache")}},
                                   dtype=torch.float32, atol=1e-3)
    assert graphed


def _streamed_speculation(directory, draft: str, budget, config: dict, ids: torch.Tensor) -> tuple[list, dict]:
    """40 greedy tokens of the streamed float32 model with `draft`, its peak device memory within the budget: the
    tokens and the report's speculation counters."""
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, dtype=torch.float32,
                                             draft=draft) as model:
        assert model.plan.regime != "device"
        got = model.generate(ids, max_new_tokens=40, do_sample=False).tolist()
        spec = model.report().speculation
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= budget.vram, f"{draft}: peak {peak} > budget {budget.vram}"
    return got, spec


def test_a_draft_growing_its_tree_during_a_streamed_verify_pass_keeps_the_tokens(tmp_path, monkeypatch):
    """`speculation.ahead` on the GPU: the draft's graphed steps run on its own stream while the streamed verify
    pass runs, and a pass whose bonus token the grown tree holds starts the next tree from that subtree. Tokens
    equal plain decoding's with the model itself and another as the draft; the self-draft keeps every token it
    drafts (a cache entry moved wrong, or a step reading the pass's buffers, would change that), and the draft's
    bytes (a second tree's KV entries among them) stay inside the device budget."""
    from conftest import tiny_model
    from tierstore.inference.decoding.drafts import ModelDraft
    from tierstore.inference.placement.budgets import kv_bytes_per_token

    monkeypatch.setattr(ModelDraft, "ahead_min_steps", 4)  # grow this much however soon the pass is done
    directory, reference = _tiny(tmp_path)
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "other")
    _, layer = unit_sizes(directory, str(tmp_path / "sizes"))
    streaming = 300 * 2**20
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3, 5, 9, 33, 7, 81]])
    weights = sum(p.numel() for p in reference.parameters()) * 4
    runs = {}
    for ahead in (False, True):
        config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "device_reserve": streaming - 3 * layer - 70_000},
                  "speculation": {"depth": 6, "width": 4, "ahead": ahead}}
        # its weights, 1024 tokens of KV (as the test above), and the tree grown ahead's: the target's room stays
        draft_bytes = weights + 1024 * 1024 + (kv_bytes_per_token(reference.config, torch.float32) * 1024 if ahead
                                               else 0)
        for draft in (directory, str(tmp_path / "other")):
            budget = tierstore.Budget(vram=streaming + draft_bytes, ram="1GB")
            runs[ahead, draft] = _streamed_speculation(directory, draft, budget, config, ids)
    for draft in (directory, str(tmp_path / "other")):
        (plain, _), (got, spec) = runs[False, draft], runs[True, draft]
        assert got == plain, draft
        assert spec["ahead_steps"] >= spec["passes"], spec
        if draft == directory:  # another model's trees rarely hold the model's next token: nothing to carry
            assert spec["acceptance_rate"] == 1.0 and spec["carried_trees"] > 0, spec
        print(f"\ncuda speculation ahead, draft {draft}: tokens as without, {spec['carried_trees']} of "
              f"{spec['passes']} passes from a carried subtree, {spec['ahead_steps']} steps grown ahead")


def test_a_resident_models_verify_passes_replay_graphs_with_the_eager_tokens(tmp_path):
    """Every unit on the device, drafts ngram and a different model: the verify passes replay CUDA graphs (trees
    padded to a few widths) and give the eager run's tokens (`cuda_graphs = off`), greedy and within the budget;
    a second call reuses the graphs."""
    from conftest import tiny_model

    directory, _ = _tiny(tmp_path)
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "other")
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3, 5, 9, 33, 7, 81]])
    budget = tierstore.Budget(vram="1GB", ram="1GB")
    runs = {}
    for graphs in ("off", "auto"):
        config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "cuda_graphs": graphs},
                  "speculation": {"width": 4}}
        for draft in ("ngram", str(tmp_path / "other")):
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, dtype=torch.float32,
                                                     draft=draft) as model:
                assert model.plan.regime == "device"
                calls = [model.generate(ids, max_new_tokens=40, do_sample=False).tolist() for _ in range(2)]
                spec, notes = model.report().speculation, model.report().notes
            peak = torch.cuda.max_memory_allocated() - base
            assert peak <= budget.vram, f"{draft}: peak {peak} > budget {budget.vram}"
            assert calls[0] == calls[1]
            runs[graphs, draft] = calls[0], spec["verify_graphed"], notes
    for draft in ("ngram", str(tmp_path / "other")):
        (eager, eager_graphed, _), (graphed, graphed_flag, notes) = runs["off", draft], runs["auto", draft]
        assert graphed == eager, draft
        assert eager_graphed is None and graphed_flag is True, (draft, notes)
        assert any("verify passes replayed from CUDA graphs" in note for note in notes), notes
        print(f"\ncuda resident verify passes graphed, draft {draft}: tokens as eager")


def test_batch_decode_steps_replay_graphs_with_the_ragged_batchers_tokens(smollm2_store, tmp_path):
    """SmolLM2 resident (float32): six requests through four rows, two leaving early. The batcher's static rows
    replay CUDA graphs (row counts padded to powers of two) and give the tokens of the ragged, eager batcher,
    within the budget."""
    import time

    from tierstore.inference.front.batcher import Batcher, SamplingParams

    store_dir, _ = smollm2_store
    budget = tierstore.Budget(vram="2GB", ram="2GB")
    prompts = ["What is the capital of France?", "Hi", "List three colors.", "Describe a cat.",
               "What is 2+2?", "Why is the sky blue?"]
    lengths = [24, 3, 24, 12, 5, 24]
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with tierstore.AutoModel.from_pretrained(store_dir, budget=budget, dtype=torch.float32,
                                             config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        assert model.plan.regime == "device"
        tok = model.tokenizer
        ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False).input_ids
               for p in prompts]
        runs = {}
        for static in (False, None):
            batcher = Batcher(model, max_batch=4, max_queue=8, max_seq_tokens=256, static_rows=static)
            sequences = [batcher.submit(row, SamplingParams(max_tokens=length, temperature=0), lambda event: None)
                         for row, length in zip(ids, lengths)]
            deadline = time.monotonic() + 120
            while not all(s.finish_reason for s in sequences):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            runs[static] = [s.tokens for s in sequences], batcher.graphed, batcher.steps
            batcher.close()
    peak = torch.cuda.max_memory_allocated() - base
    (ragged, ragged_graphed, _), (rows, graphed, steps) = runs[False], runs[None]
    assert rows == ragged
    assert ragged_graphed is None and graphed is True
    assert peak <= budget.vram, f"peak {peak} > budget {budget.vram}"
    print(f"\ncuda batcher: static rows graphed, {steps} steps, tokens as the ragged batcher's, peak {peak}")


def test_trace_on_cuda_times_copies_and_compute_with_events(tmp_path):
    """Streamed on the GPU with a trace: the same tokens, one compute event per unit and pass, and on the compute
    and copy tracks (CUDA event times) no event starts before the one before it ends."""
    import json

    directory, reference = _tiny(tmp_path)
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3]])
    want = reference.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    _, layer = unit_sizes(directory, str(tmp_path / "sizes"))
    config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "trace": str(tmp_path / "run.json"),
                          "device_reserve": 300 * 2**20 - 3 * layer - 70_000}}
    with tierstore.AutoModel.from_pretrained(directory, budget=tierstore.Budget(vram=300 * 2**20, ram="1GB"),
                                             config=config, dtype=torch.float32) as model:
        assert model.plan.regime != "device"
        got = model.generate(ids, max_new_tokens=8, do_sample=False).tolist()
        sites = len(model.plan.schedule)
    assert got == want
    trace = json.loads((tmp_path / "run.json").read_text())
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    spans = {}
    for event in trace["traceEvents"]:
        if event["ph"] == "X":
            spans.setdefault(names[event["tid"]], []).append(event)
    assert len(spans["compute"]) == sites * len(spans["passes"]) and len(spans["passes"]) == 8
    assert spans["host->device copy"]
    for track in ("compute", "host->device copy"):
        events = sorted(spans[track], key=lambda e: e["ts"])
        for before, after in zip(events, events[1:]):
            assert after["ts"] >= before["ts"] + before["dur"] - 0.01


def test_a_traced_resident_run_replays_its_graph_and_the_trace_shows_each_replay(tmp_path):
    """Every unit on the device, with a trace: the decode steps still replay a CUDA graph, the tokens equal the
    untraced run's, and the passes track holds one "graph replay" pass per replayed step, with GPU times, beside
    the eager passes (prefill, the first step) and their compute events."""
    import json

    directory, _ = _tiny(tmp_path)
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3]])
    budget = tierstore.Budget(vram="1GB", ram="1GB")
    runs = {}
    for trace in (None, str(tmp_path / "run.json")):
        config = {"runtime": {"cache_dir": str(tmp_path / "cache"), **({"trace": trace} if trace else {})}}
        with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config,
                                                 dtype=torch.float32) as model:
            assert model.plan.regime == "device"
            runs[trace] = model.generate(ids, max_new_tokens=12, do_sample=False).tolist(), \
                model.report().timing.graphed
    assert runs[None] == runs[str(tmp_path / "run.json")] and runs[None][1] is True
    trace = json.loads((tmp_path / "run.json").read_text())
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    passes = [e for e in trace["traceEvents"] if e["ph"] == "X" and names[e["tid"]] == "passes"]
    replays = [e for e in passes if e["args"].get("graph")]
    new_tokens = len(runs[None][0][0]) - ids.shape[1]
    assert len(replays) == new_tokens - 2 > 0, passes  # the prefill and one eager step give two, replays the rest
    assert all(e["dur"] > 0 for e in replays)
    assert any(names[e["tid"]] == "compute" for e in trace["traceEvents"] if e["ph"] == "X")


@pytest.mark.parametrize("compute", ["device", "host", "split", "mapped"])
def test_moe_missed_experts_copied_or_computed_on_the_cpu_give_transformers_tokens(tmp_path, compute):
    """A tiny Qwen3-MoE in float32 on CUDA, most experts off the device: missed experts copied into slots, computed
    by the CPU, split between the two (the cost model given equal rates), or read in place from mapped host RAM in
    the decode steps: transformers' greedy tokens."""
    from test_moe import PROMPT, _config, _reference, _saved, _streaming_budget
    from tierstore.policies.experts import ExpertCosts

    model, directory = _saved("qwen3_moe", tmp_path)
    want = _reference(model, new_tokens=12)
    config = _config(str(tmp_path), compute="device" if compute == "split" else compute, prefetch="none")
    # planned as on a CPU, plus a fixed reserve on the GPU
    budget = _streaming_budget(directory, config, every_expert_in_ram=compute == "mapped")
    reserve = 512 * 2**20  # room for activations and the KV cache as the GPU plans them (64 MB was refused)
    config["runtime"].update(device="cuda", device_reserve=reserve)
    budget = tierstore.Budget(vram=budget.vram + reserve, ram=budget.ram)
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, dtype=torch.float32) as streamed:
        if compute == "split":
            streamed.experts.compute = "auto"
            streamed.experts.costs = ExpertCosts(link_gbps=10.0, host_gbps=10.0, host_gbps_32=10.0, host_call_s=0.0)
        got = streamed.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0).tolist()
        report = streamed.report()
    assert got == want
    on_host, copied = report.experts["host_computed"], report.tiers["experts device"].bytes_in
    in_place = report.experts["mapped_bytes"]
    assert (on_host > 0) == (compute in ("host", "split")) and (in_place > 0) == (compute == "mapped")
    assert compute == "mapped" or (copied > 0) == (compute != "host")
    print(f"\ncuda qwen3_moe, compute {compute}: tokens identical; {on_host} experts on the CPU, {copied} bytes "
          f"copied, {in_place} read in place")


def test_a_resident_moe_with_experts_in_its_layers_replays_a_graph_with_the_eager_tokens(tmp_path):
    """A tiny Qwen3-MoE in bf16 (grouped_mm's own dtype on CUDA; its float32 path copies from the host and cannot
    be captured), all on the device with its experts inside their layers: the decode steps replay a CUDA graph and
    give the eager steps' greedy tokens; under expert streaming with every expert in pinned RAM, auto reads them
    in place and the steps replay a graph too; with the experts copied as picked they run eagerly, and the note
    says why."""
    from test_moe import PROMPT, _saved

    _, directory = _saved("qwen3_moe", tmp_path)
    runs = {}
    for streaming, graphs, compute in ((False, "off", "auto"), (False, "auto", "auto"), (True, "auto", "auto"),
                                       (True, "auto", "device")):
        config = {"runtime": {"cache_dir": str(tmp_path / "cache"), "cuda_graphs": graphs},
                  "experts": {"streaming": streaming, "implementation": "grouped_mm", "compute": compute}}
        with tierstore.AutoModel.from_pretrained(directory, budget=tierstore.Budget(vram="1GB", ram="1GB"),
                                                 config=config, dtype=torch.bfloat16) as resident:
            tokens = resident.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0).tolist()
            runs[streaming, graphs, compute] = tokens, resident.report()
    (eager, _), (graphed, report), (in_place, in_place_report), (copied, copied_report) = runs.values()
    assert graphed == eager and report.timing.graphed is True, report.notes
    assert in_place_report.timing.graphed is True and in_place_report.experts["mapped_pairs"] > 0
    assert copied_report.timing.graphed is False
    assert any("routed experts" in note for note in copied_report.notes), copied_report.notes
    print(f"\ncuda qwen3_moe bf16: graphed tokens equal eager; streamed experts' tokens equal: read in place "
          f"{in_place == eager}, copied {copied == eager}")


def _mapped_moe(tmp_path):
    """A tiny Qwen3-MoE saved in bf16, every expert in RAM and read in place (`experts.compute = mapped`), its
    dense units on the device and a third of its experts in slots: (directory, budget, config for a
    `cuda_graphs` setting)."""
    from test_architectures import tiny
    from test_moe import _config, _units

    # tied embeddings: an untied input embedding is looked up in RAM unless the whole model fits the device
    model, why = tiny("qwen3_moe", tie_word_embeddings=True)
    assert model is not None, why
    directory = str(tmp_path / "qwen3_moe_bf16")  # saved in bf16, so that the GPU's plans are bf16's
    model.to(torch.bfloat16).save_pretrained(directory)
    dense, experts = _units(directory, _config(str(tmp_path)))  # float32 sizes (a CPU's): bf16 takes half
    reserve = 512 * 2**20
    ram = sum(dense) + 2 * experts.total_experts * experts.expert_bytes

    def config(graphs):
        config = _config(str(tmp_path), compute="mapped", prefetch="none")
        config["runtime"].update(device="cuda", device_reserve=reserve, cuda_graphs=graphs)
        return config

    vram, _ = _least_room_for_dense(directory, ram, config("auto"), reserve + sum(dense) // 2,
                                    experts.expert_bytes // 2)
    return directory, tierstore.Budget(vram=vram, ram=ram), config


def _least_room_for_dense(model: str, ram, config: dict, vram: int, step: int):
    """(vram, plan): the least device budget from `vram` up, in steps of `step` bytes, whose plan keeps every
    dense unit on the device and looks nothing up in RAM (so that its decode steps can replay one graph): the
    fewest expert slots."""
    from tierstore.inference.compose import make_plan_for

    while True:
        try:
            plan = make_plan_for(model, {"vram": vram, "ram": ram}, config)
            if set(plan.schedule) <= set(plan.device_resident) and not plan.host_lookup:
                return vram, plan
        except tierstore.BudgetError:
            pass
        vram += step


def test_gguf_experts_read_in_place_are_multiplied_where_they_lie_with_the_dequantizing_runs_tokens(tmp_path,
                                                                                                   monkeypatch):
    """A tiny Qwen3-MoE GGUF (Q4_K and Q6_K experts) on CUDA in float32, every expert in RAM and read in place
    (`experts.compute = mapped`), some in slots: each decode step multiplies the experts' blocks where they lie, in
    a slot or in mapped host RAM (nothing gathered), replayed from a CUDA graph; the tokens equal the eager steps'
    and those of the same store dequantizing its experts (the kernels turned off). With the aligned offsets' kernel
    test, this is what packed_experts.AT_OFFSETS_DEVICES holding "cuda" rests on."""
    from test_moe import PROMPT
    from test_packed_experts import _write_moe_gguf

    from tierstore.compression import Decompressor
    from tierstore.inference.runtime import packed_experts

    monkeypatch.setattr(packed_experts, "AT_OFFSETS_DEVICES", ("cuda",))

    path = str(tmp_path / "moe.gguf")
    _write_moe_gguf(path, {"attn": "Q4_K", "ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q4_K", "ffn_down_exps": "Q6_K"})

    # a reserve that holds a call's KV cache and activation slack, so that a call does not re-plan the device
    # (64 MB did: the least budget that planned left a 17-token call no room, on an H100)
    reserve = 512 * 2**20

    def config(graphs):
        return {"runtime": {"cache_dir": str(tmp_path / "cache"), "device": "cuda", "device_reserve": reserve,
                            "cuda_graphs": graphs},
                "compression": {"gguf": "packed"}, "experts": {"compute": "mapped", "prefetch": "none"}}

    vram, plan = _least_room_for_dense(path, "1GB", config("auto"), reserve, 2**20)
    assert plan.experts.device_slots < plan.experts.total_experts, plan.experts
    runs = {}
    for name, graphs, devices in (("blocks", "auto", ("cuda",)), ("blocks eager", "off", ("cuda",)),
                                  ("dequantized", "off", ())):
        monkeypatch.setattr(Decompressor, "MATVEC_DEVICES", devices)
        with tierstore.AutoModel.from_pretrained(path, budget={"vram": vram, "ram": "1GB"}, config=config(graphs),
                                                 dtype=torch.float32) as model:
            assert model.experts._unpacker.in_blocks == bool(devices)
            tokens = model.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0).tolist()
            runs[name] = tokens, model.report()
    assert runs["blocks"][1].timing.graphed is True
    assert all(report.experts["mapped_pairs"] > 0 for _, report in runs.values())
    assert runs["blocks"][0] == runs["blocks eager"][0] == runs["dequantized"][0]
    print(f"\ncuda gguf qwen3_moe, experts read in place in their blocks: {plan.experts.device_slots}/"
          f"{plan.experts.total_experts} slots, graphed, tokens equal the dequantizing run's")


def test_moe_experts_read_in_place_replay_a_graph_with_the_eager_tokens(tmp_path):
    """A tiny Qwen3-MoE in bf16 on CUDA, its dense units on the device and a third of its experts in slots, every
    expert in RAM, `experts.compute = mapped`: the decode steps replay a CUDA graph (the routing never reaches the
    host inside a step) and give the eager steps' tokens; every replayed step's routing is counted, as eagerly."""
    from test_moe import PROMPT

    directory, budget, config = _mapped_moe(tmp_path)
    runs = {}
    for graphs in ("off", "auto"):
        with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config(graphs),
                                                 dtype=torch.bfloat16) as model:
            tokens = model.generate(PROMPT, max_new_tokens=16, do_sample=False, pad_token_id=0).tolist()
            runs[graphs] = tokens, model.report(), model.plan.experts
    (eager, eager_report, plan), (graphed, report, _) = runs.values()
    assert plan.device_slots < plan.total_experts, plan
    assert report.timing.graphed is True and eager_report.timing.graphed is False, report.notes
    assert graphed == eager
    assert report.experts["mapped_pairs"] == eager_report.experts["mapped_pairs"] > 0
    print(f"\ncuda qwen3_moe bf16, experts read in place: {plan.device_slots}/{plan.total_experts} slots, graphed "
          f"tokens equal eager; {report.experts['mapped_admitted']} copied into slots as it ran")


def test_a_batch_of_moe_rows_reading_experts_in_place_replays_graphs_with_the_eager_tokens(tmp_path):
    """The same MoE through the batcher's static rows (three sequences, one leaving early): the steps replay CUDA
    graphs with the experts read in place, and give the tokens the same rows give eagerly (`cuda_graphs = off`)."""
    import threading
    import types

    from tierstore.inference.front.batcher import Batcher, SamplingParams

    directory, budget, config = _mapped_moe(tmp_path)
    prompts = [[5, 9, 33, 7, 81, 5, 9, 33], [12, 40, 7], [3, 3, 90, 14, 61]]
    runs = {}
    for graphs in ("off", "auto"):
        with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config(graphs),
                                                 dtype=torch.bfloat16) as model:
            # the tiny model has no tokenizer: the batcher needs its pad and end ids, and text for its events
            model.tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=None, decode=lambda ids, **_: "")
            batcher = Batcher(model, max_batch=4, max_queue=4, max_seq_tokens=64, static_rows=True)
            done = [threading.Event() for _ in prompts]
            sequences = [batcher.submit(ids, SamplingParams(max_tokens=length, temperature=0),
                                        lambda event, i=i: done[i].set() if event.finish_reason else None)
                         for i, (ids, length) in enumerate(zip(prompts, (16, 5, 16)))]
            assert all(event.wait(120) for event in done)
            batcher.close()
            runs[graphs] = [s.tokens for s in sequences], batcher.graphed, model.experts.stats.mapped_pairs, \
                batcher.steps_note
    (eager, eager_graphed, _, eager_note), (graphed, was_graphed, pairs, note) = runs["off"], runs["auto"]
    assert graphed == eager and [len(t) for t in graphed] == [16, 5, 16]
    assert eager_graphed is False and was_graphed is True and pairs > 0
    assert eager_note == "" and "replayed from CUDA graphs" in note, (eager_note, note)  # a server's start-up line
    print("\ncuda qwen3_moe batcher, experts read in place: static rows graphed, tokens equal eager")


def test_an_embedding_looked_up_in_ram_is_read_in_place_and_the_steps_replay_a_graph(tmp_path):
    """A tiny untied Llama whose input embedding stays in RAM and whose other units fit the device: the GPU reads
    the table's rows in place, so the decode steps replay a CUDA graph, with the tokens of eager steps and of the
    CPU's lookup (`io.pinned_memory = false`)."""
    from test_architectures import PROMPT, tiny
    from tierstore.inference.compose import make_plan_for

    model, why = tiny("llama", tie_word_embeddings=False)
    assert model is not None, why
    directory = str(tmp_path / "llama")
    model.save_pretrained(directory)
    reserve = 256 * 2**20

    def config(graphs="auto", pinned=True):
        return {"runtime": {"cache_dir": str(tmp_path / "cache"), "device": "cuda", "device_reserve": reserve,
                            "cuda_graphs": graphs}, "io": {"pinned_memory": pinned}}

    def looked_up(vram):  # the embedding in RAM and every other unit on the device
        try:
            plan = make_plan_for(directory, {"vram": vram, "ram": "1GB"}, config())
        except tierstore.BudgetError:
            return False
        return plan.host_lookup == ("embed_tokens",) and set(plan.schedule) <= set(plan.device_resident)

    vram = reserve
    while not looked_up(vram):
        vram += 2**16
        assert vram < reserve + 2**30, "no budget keeps the embedding in RAM and the rest on the device"
    runs = {}
    for graphs, pinned in (("auto", True), ("off", True), ("off", False)):
        with tierstore.AutoModel.from_pretrained(directory, budget=tierstore.Budget(vram=vram, ram="1GB"),
                                                 config=config(graphs, pinned)) as streamed:
            tokens = streamed.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0).tolist()
            runs[graphs, pinned] = tokens, streamed.report()
    (graphed, report), (eager, _), (on_cpu, _) = runs.values()
    assert report.timing.graphed is True, report.notes
    assert graphed == eager == on_cpu


@pytest.mark.parametrize("tiers", [("host",), ("disk",), ("device", "disk", "host", "host", "disk", "disk")])
def test_tiered_kv_cache_on_cuda_gives_the_device_caches_logits(tiers, tmp_path):
    """Layers fetched ahead on the cache's stream, rows written back, disk layers through pinned bounce buffers
    read ahead on the I/O thread: every step's logits equal a device DynamicCache's, for chunks and tokens."""
    from tierstore.inference.runtime.tiered_kv import TieredKVCache
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval().to("cuda")
    layers = (tiers * 6)[:6]
    ids = torch.randint(3, 256, (2, 3000), device="cuda")
    plain = DynamicCache(config=config)
    tiered = TieredKVCache(config, layers, 3100, torch.device("cuda"), str(tmp_path))
    with torch.no_grad():
        spans = [(0, 1024), (1024, 2900), *((end, end + 1) for end in range(2900, 2960))]
        for start, end in spans:
            want = model(ids[:, start:end], past_key_values=plain).logits
            got = model(ids[:, start:end], past_key_values=tiered).logits
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    tiered.settle()
    assert tiered.traffic.passes == len(spans)
    tiered.close()


def test_prefix_entries_are_pinned_and_a_cropped_hit_reaches_the_device_whole():
    """On a GPU the prefix cache's RAM is one page-locked arena; an entry copied from the device on the cache's
    stream, then a prefix of it cut from a longer entry, comes back through `restore` equal to the original."""
    from tierstore.inference.runtime.prefix_cache import PrefixCache, restore
    from tierstore.inference.runtime.reserved_cache import reserved_cache
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=256, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=2)
    layers = [tuple(torch.randn(1, 2, 300, 32, device="cuda", dtype=torch.bfloat16) for _ in range(2))
              for _ in range(3)]
    prefixes = PrefixCache("key", ram_bytes=2**24, pinned=True)
    try:
        assert prefixes._arena.registered
        tokens = list(range(300))
        prefixes.store(tokens, layers)
        hit = prefixes.lookup(tokens[:200] + [999])
        assert hit is not None and hit[0] == 200 and not hit[1][0][0].is_contiguous()
        arena = prefixes._arena.buffer  # registered with CUDA (torch's is_pinned knows only its own allocator's)
        assert 0 <= hit[1][0][0].data_ptr() - arena.data_ptr() < arena.numel()
        cache = reserved_cache(config, 256)
        restore(cache, hit[1], torch.device("cuda"))
        for (keys, values), layer in zip(layers, cache.layers):
            assert torch.equal(layer.keys, keys[..., :200, :]) and torch.equal(layer.values, values[..., :200, :])
    finally:
        prefixes.close()


@pytest.mark.parametrize("format", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                    "IQ4_NL", "IQ4_XS"])
def test_ggml_blocks_dequantized_on_cuda_match_the_cpu_reference(format):
    """The GPU's kernel gives the CPU's float32 values: the k-quants' Triton kernels bit for bit (no fused
    multiply-add), the other formats' compiled steps up to a fused multiply-add's last bit. The compiled steps, the
    k-quants' fallback, do so for every format."""
    from test_ggml import random_blocks

    from tierstore import ggml

    data = torch.from_numpy(random_blocks(format, 4096)).reshape(-1)
    want = torch.empty(4096 * ggml.BLOCKS[format][0])
    ggml.dequantize(format, data, want)
    got = torch.empty_like(want, device="cuda")
    ggml.dequantize(format, data.cuda(), got)
    half = torch.empty(want.numel(), dtype=torch.bfloat16, device="cuda")
    ggml.dequantize(format, data.cuda(), half)
    if format.endswith("_K"):
        assert format not in ggml._NO_TRITON, "the Triton kernel failed (see the warning)"
        assert torch.equal(got.cpu(), want)
        assert torch.equal(half.cpu(), want.bfloat16())
    else:
        assert ggml._FUSED.get(format) is not None, "the compiled kernel fell back to one op at a time"
        assert torch.allclose(got.cpu(), want, rtol=1e-6, atol=1e-7)
        assert (half.float().cpu() - want.bfloat16().float()).abs().max() <= want.abs().max() * 2**-7
    compiled = torch.empty_like(got)
    assert ggml.dequantize_compiled(format, data.cuda(), compiled)
    assert torch.allclose(compiled.cpu(), want, rtol=1e-6, atol=1e-7)


MATVEC_FORMATS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
# (format, tile): None, the values kernel (ggml_triton); a tile, ggml_dots' kernel there (an experiment no model uses:
# two configurations of ggml_triton's kernel summed wrong compiled where the interpreter summed right, so each of its
# tiles is checked here before it is timed)
KERNEL_CASES = [(format, None) for format in MATVEC_FORMATS] + [
    (format, tile) for format in ("Q4_K", "Q2_K") for tile in ((4, 1024, 4), (16, 1024, 4), (8, 1024, 2))]


def _matvec_kernel(monkeypatch, format: str, tile: tuple[int, ...] | None, packed: torch.Tensor) -> None:
    """ggml.matvec set to the case's kernel: with a tile, ggml_dots' at it (which must take `packed`)."""
    from tierstore import ggml, ggml_dots

    if tile is not None:
        assert ggml_dots.takes(format, packed)
        monkeypatch.setattr(ggml, "MATVEC_KERNEL", "dots")
        monkeypatch.setattr(ggml_dots, "TILE", tile)


@pytest.mark.parametrize("format,tile", KERNEL_CASES)
@pytest.mark.parametrize("tokens", [1, 4])
def test_ggml_matrices_multiplied_in_their_blocks_on_cuda_match_the_dequantized_product(format, tile, tokens,
                                                                                        monkeypatch):
    """The Triton matrix-vector kernel, compiled, on a 7B-sized matrix (3584 x 3584): the reference values times
    the inputs in float64, within float32 summation error, in float32 and bfloat16 inputs."""
    from test_ggml import random_blocks

    from tierstore import ggml

    rows, columns = 3584, 3584
    data = torch.from_numpy(random_blocks(format, rows * columns // ggml.BLOCKS[format][0], seed=4)).reshape(-1)
    matrix = torch.empty(rows * columns)
    ggml.dequantize(format, data, matrix)
    matrix = matrix.view(rows, columns).double()
    packed = data.cuda()
    _matvec_kernel(monkeypatch, format, tile, packed)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(tokens, columns, generator=torch.Generator().manual_seed(5)).to(dtype)
        out = torch.empty(tokens, rows, dtype=dtype, device="cuda")
        assert ggml.matvec(format, packed, x.cuda(), out), "the Triton kernel failed (see the warning)"
        want = x.double() @ matrix.T
        scale = (x.double().abs() @ matrix.abs().T).max()
        tolerance = 1e-5 if dtype == torch.float32 else 2**-7
        assert (out.double().cpu() - want).abs().max() <= tolerance * scale


@pytest.mark.parametrize("format,tile", KERNEL_CASES)
@pytest.mark.parametrize("align", [None, 16, 1])
def test_ggml_matrices_multiplied_in_their_blocks_grouped_on_cuda_each_by_its_own_inputs(format, tile, align,
                                                                                         monkeypatch):
    """The grouped launch (a decode step's experts), compiled: 8 matrices of Qwen3-30B-A3B's expert shape (1536 x
    2048), each times its own input row, by the reference values in float64; back to back (`align` None), or read
    where they lie (experts in slots or mapped RAM: each at its byte offset in a buffer, in reverse order, with
    gaps that keep the offsets 16-byte aligned, as the compiler is then told, or not: ggml_dots' kernel does not
    take those, and the values kernel multiplies them)."""
    from test_ggml import random_blocks

    from tierstore import ggml

    groups, rows, columns = 8, 1536, 2048
    data = torch.from_numpy(random_blocks(format, groups * rows * columns // ggml.BLOCKS[format][0], seed=6))
    matrices = torch.empty(groups * rows * columns)
    ggml.dequantize(format, data.reshape(-1), matrices)
    matrices = matrices.view(groups, rows, columns).double()
    x = torch.randn(groups, columns, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    out = torch.empty(groups, rows, dtype=torch.bfloat16, device="cuda")
    if align is None:
        packed = data.reshape(-1).cuda()
        _matvec_kernel(monkeypatch, format, tile, packed)
        assert ggml.matvec(format, packed, x.cuda(), out, grouped=True), "the Triton kernel failed"
    else:
        size, gap = data.numel() // groups, 64 if align == 16 else 37
        buffer = torch.zeros(groups * (size + gap), dtype=torch.uint8)
        offsets = [(groups - 1 - group) * (size + gap) + gap for group in range(groups)]
        for group, at in enumerate(offsets):
            buffer[at:at + size] = data.reshape(-1)[group * size:(group + 1) * size]
        packed = buffer.cuda()
        _matvec_kernel(monkeypatch, format, tile, packed)
        assert ggml.matvec(format, packed, x.cuda(), out, grouped=True,
                           offsets=torch.tensor(offsets, device="cuda"), offsets_align=align), "the kernel failed"
    want = torch.einsum("grc,gc->gr", matrices, x.double())
    scale = torch.einsum("grc,gc->gr", matrices.abs(), x.double().abs()).max()
    assert (out.double().cpu() - want).abs().max() <= 2**-7 * scale


def test_a_k_quant_store_decodes_with_packed_matrices_and_gives_the_dequantized_runs_tokens(tmp_path, monkeypatch):
    """q4_k_m (Q4_K and Q6_K) on the GPU: decode steps multiply the packed matrices (Triton), the prompt
    dequantizes; the tokens and logits are those of the same store with every matrix dequantized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tierstore import ggml
    from tierstore.compression import Decompressor

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    settings = {"runtime": {"cache_dir": str(tmp_path / "cache")}, "compression": {"format": "q4_k_m"}}
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3, 17]])
    calls = []
    multiply = ggml.matvec

    def counted(format, packed, x, out):
        calls.append(x.shape[0])
        return multiply(format, packed, x, out)

    monkeypatch.setattr("tierstore.compression.ggml_matvec", counted)
    results = []
    for devices in (("cuda",), ()):
        monkeypatch.setattr(Decompressor, "MATVEC_DEVICES", devices)
        with tierstore.AutoModel.from_pretrained(str(tmp_path / "model"), budget={"vram": "2GB", "ram": "4GB"},
                                                 config=settings) as model:
            tokens = model.generate(ids, max_new_tokens=8, do_sample=False).tolist()
            results.append((tokens, model(ids[:, :1]).logits.float().cpu()))
        if devices:
            assert calls and set(calls) == {1}, calls
            calls.clear()
    assert calls == []
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-3, rtol=1e-3)


def test_the_compiled_dequantization_of_a_large_matrix_takes_little_beyond_its_output():
    """A whole MoE layer's expert matrix (here 268M elements, Q8_0) dequantized by the compiled steps adds at most
    a few chunks' worth of device memory to its packed input and its output (a whole-layer q8_0 MoE peaked at 7.41
    GB under a 4 GB budget before the chunks)."""
    from tierstore import ggml

    elements, nbytes = ggml.BLOCKS["Q8_0"]
    blocks = (1 << 28) // elements
    data = torch.randint(0, 256, (blocks, nbytes), dtype=torch.uint8, device="cuda")
    data[:, :2] = torch.tensor([0, 0x3C], dtype=torch.uint8, device="cuda")  # scale 1.0
    out = torch.empty(blocks * elements, dtype=torch.bfloat16, device="cuda")
    assert ggml.dequantize_compiled("Q8_0", data[:64].reshape(-1), out[:64 * elements])  # compiled already
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    assert ggml.dequantize_compiled("Q8_0", data.reshape(-1), out)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= 8 * ggml.CHUNK_ELEMENTS * 4
    assert torch.equal(out[:elements].float().cpu(), data[0, 2:].view(torch.int8).float().cpu())


def test_quantizing_a_large_matrix_on_the_gpu_takes_little_beyond_its_blocks():
    """A whole MoE layer's expert stack (here 268M values) quantized to Q8_0 on the GPU, as a store is written on a
    GPU machine, adds at most a few chunks' float32 temporaries to its input and its blocks: unchunked, the search
    held several float32 copies of the whole stack (a q8_0 whole-layer MoE store peaked at 7.41 GB under a 4 GB
    budget while it was written)."""
    from tierstore import ggml, ggml_quantize

    values = torch.randn(1 << 28, dtype=torch.bfloat16, device="cuda") * 0.02
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    blocks = ggml_quantize.quantize("Q8_0", values)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= blocks.nbytes + 8 * ggml.CHUNK_ELEMENTS * 4
    part = values[:1 << 20].cpu()
    assert torch.equal(blocks[:(1 << 20) // 32 * 34].cpu(), ggml_quantize.quantize("Q8_0", part))


@pytest.mark.parametrize("format", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_the_k_quants_searched_on_the_gpu_are_the_cpus_blocks(format):
    """A k-quant searched on the GPU (every grid at once, 2^24 values a chunk) against the CPU (one grid at a time,
    2^20 a chunk), an MoE expert's matrix with and without an importance matrix: the blocks agree but for rounding
    ties (float32 sums in another order), and the GPU's error is the CPU's."""
    from tierstore import ggml, ggml_quantize

    generator = torch.Generator().manual_seed(3)
    values = (torch.randn(768 * 2048, generator=generator) * 0.02).to(torch.bfloat16)
    importance = torch.rand(768 * 2048, generator=generator) + 0.1
    for weights in (None, importance):
        on_cpu = ggml_quantize.quantize(format, values, weights)
        on_gpu = ggml_quantize.quantize(format, values.cuda(), None if weights is None else weights.cuda()).cpu()
        assert on_gpu.shape == on_cpu.shape
        assert (on_gpu != on_cpu).double().mean() < 1e-2  # Q5_K: 0.23% of the bytes on an H100, Q4_K under 0.1%
        errors = []
        for blocks in (on_cpu, on_gpu):
            out = torch.empty(values.numel())
            ggml.dequantize(format, blocks, out)
            errors.append(((out - values.float()) ** 2).sum().item())
        assert errors[1] <= errors[0] * 1.001


def test_gptq_rounds_on_the_gpu_as_well_as_on_the_cpu():
    """GPTQ on CUDA (where a store is quantized on a GPU machine): its blocks' output error within 2% of the CPU's
    for the same matrix and inputs (float32 sums in another order may round a few codes the other way), and well
    under nearest rounding's."""
    from tierstore import ggml_quantize
    from tierstore.gptq import output_error, quantize_gptq

    generator = torch.Generator().manual_seed(0)
    columns = 1024
    mixing = torch.randn(columns, columns, generator=generator) / columns ** 0.5 + torch.eye(columns)
    inputs = (torch.randn(8192, columns, generator=generator) @ mixing) * torch.exp(torch.randn(columns,
                                                                                                  generator=generator))
    hessian = inputs.T @ inputs
    weight = torch.randn(512, columns, generator=generator) * 0.02
    for format in ("Q3_K", "Q4_K", "Q6_K"):
        on_cpu = output_error(format, quantize_gptq(format, weight, hessian), weight, hessian)
        blocks = quantize_gptq(format, weight.cuda(), hessian.cuda())
        assert blocks.is_cuda
        on_gpu = output_error(format, blocks.cpu(), weight, hessian)
        nearest = ggml_quantize.quantize(format, weight.reshape(-1), hessian.diagonal().repeat(512))
        assert abs(on_gpu - on_cpu) < 0.02 * on_cpu
        assert on_gpu < 0.7 * output_error(format, nearest, weight, hessian)
