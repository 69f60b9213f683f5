"""Tiny random-weight models of each tested architecture: the same greedy tokens as transformers itself."""
import pytest
import torch
from conftest import ARCH_EXTRA

import tierstore

PROMPTS = [[5, 9, 33, 7, 81, 100, 3], [40, 41], [17, 200, 19, 5, 6]]


def _budget_for(model, layers_on_device=2):
    layer = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers) * 4
    other = max(p.numel() for n, p in model.named_parameters() if ".layers." not in n) * 4
    # two layers (+ the largest other unit) on the device, the host smaller than the rest of the model
    device = (layers_on_device + 1) * (layer + 512) + other
    total = sum(p.numel() for p in model.parameters()) * 4
    # an untied nn.Embedding stays in RAM (lookup.py), on top of the host's share of the streamed units
    embedding = model.get_input_embeddings()
    looked_up = type(embedding) is torch.nn.Embedding and model.get_output_embeddings().weight is not embedding.weight
    table = embedding.weight.numel() * 4 if looked_up else 0
    return tierstore.Budget(vram=device, ram=table + max((total - table) // 2, layer + 1024 + other))


@pytest.mark.parametrize("model_type", sorted(ARCH_EXTRA))
def test_greedy_tokens_match_transformers(model_type, tiny_dirs, cache_config):
    directory, reference = tiny_dirs(model_type)
    with tierstore.AutoModel.from_pretrained(directory, budget=_budget_for(reference),
                                             config=cache_config) as model:
        assert model.plan.regime == "disk"
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            want = reference.generate(ids, max_new_tokens=12, do_sample=False)
            got = model.generate(ids, max_new_tokens=12, do_sample=False)
            assert got.tolist() == want.tolist(), model_type
        ids = torch.tensor([PROMPTS[0]])
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        for tier, stats in model.report().tiers.items():
            assert stats.budget_bytes is None or stats.peak_bytes <= stats.budget_bytes, tier


def test_an_untied_embedding_is_looked_up_in_ram_when_the_ram_budget_holds_it(tiny_dirs, cache_config):
    """The table stays in RAM: not in the schedule, its bytes off the link and out of the RAM budget left to the
    store, the same tokens; the weight the model sees is NaN on the compute device, so any other use would show.
    A RAM budget that cannot hold it beside a streamed unit streams it as before, and a device that holds the whole
    model keeps it there."""
    directory, reference = tiny_dirs("llama")
    table = reference.get_input_embeddings().weight.numel() * 4
    ids = torch.tensor([PROMPTS[0]])
    want = reference.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    with tierstore.AutoModel.from_pretrained(directory, budget=_budget_for(reference), config=cache_config) as model:
        assert model.plan.host_lookup == ("embed_tokens",) and "embed_tokens" not in model.plan.schedule
        assert any("embed_tokens" in note and "stays in RAM" in note for note in model.plan.notes)
        assert torch.isnan(model.model.get_input_embeddings().weight).all()
        assert model.generate(ids, max_new_tokens=8, do_sample=False).tolist() == want
    layer = max(sum(p.numel() for p in layer.parameters()) for layer in reference.model.layers) * 4
    with tierstore.AutoModel.from_pretrained(directory, config=cache_config) as model:  # the device holds it all
        assert model.plan.host_lookup == () and "embed_tokens" in model.plan.device_resident
    small = tierstore.Budget(vram="1GB", ram=layer + table // 2)  # a layer fits, the table beside it does not
    with tierstore.AutoModel.from_pretrained(directory, budget=small, config=cache_config) as model:
        assert model.plan.host_lookup == () and "embed_tokens" in model.plan.schedule
        assert model.generate(ids, max_new_tokens=8, do_sample=False).tolist() == want


def test_tied_embeddings_are_one_unit(tiny_dirs, cache_config):
    directory, reference = tiny_dirs("llama", tie=True)
    with tierstore.AutoModel.from_pretrained(directory, config=cache_config) as model:
        assert "lm_head" not in model.plan.schedule and model.plan.host_lookup == ()  # the output layer needs it
        assert model.plan.schedule.count("embed_tokens") == 2
        ids = torch.tensor([PROMPTS[0]])
        assert model.generate(ids, max_new_tokens=8, do_sample=False).tolist() == \
            reference.generate(ids, max_new_tokens=8, do_sample=False).tolist()


def test_batch_of_different_lengths_equals_each_alone(tiny_dirs, cache_config):
    directory, reference = tiny_dirs("qwen2")
    prompts = [[5, 9, 33, 7, 81, 100, 3], [40, 41], [17, 200, 19, 5, 6], [8]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with tierstore.AutoModel.from_pretrained(directory, budget=_budget_for(reference),
                                             config=cache_config) as model:
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        misses_batch = model.report().tiers["device"].misses
        for row, prompt in enumerate(prompts):
            alone = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
            assert batch[row, width:].tolist() == alone[0, len(prompt):].tolist()
    # one weight load per unit per step for the whole batch: no more device misses than one prompt's run
    steps = 10
    assert misses_batch <= steps * len(model.plan.schedule)


def test_detach_restores_the_model(tiny_dirs, cache_config):
    directory, reference = tiny_dirs("llama")
    model = tierstore.AutoModel.from_pretrained(directory, budget=_budget_for(reference), config=cache_config)
    before = {name: (p.device.type, id(p)) for name, p in model.model.named_parameters()}
    # streamed, the input embedding is answered from RAM: a placeholder on the compute device while attached
    assert [name for name, (device, _) in before.items() if device != "meta"] == ["model.embed_tokens.weight"]
    model.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=3, do_sample=False)
    model.close()
    after = {name: (p.device.type, id(p)) for name, p in model.model.named_parameters()}
    assert all(before[name] == after[name] for name in before if name != "model.embed_tokens.weight")
    assert all(device == "meta" for device, _ in after.values())
    assert not any(m._forward_pre_hooks or m._forward_hooks or "forward" in vars(m) for m in model.model.modules())


def test_attention_choice(tiny_dirs, tmp_path):
    directory, reference = tiny_dirs("llama")
    ids = torch.tensor([PROMPTS[0]])
    config = {"runtime": {"cache_dir": str(tmp_path), "attention": "eager"}}
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        assert model.model.config._attn_implementation == "eager"
        assert model.generate(ids, max_new_tokens=6, do_sample=False).tolist() == \
            reference.generate(ids, max_new_tokens=6, do_sample=False).tolist()
    import importlib.util
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(tierstore.ModelError, match="flash-attn"):
            tierstore.AutoModel.from_pretrained(directory, config={"runtime": {"cache_dir": str(tmp_path),
                                                                               "attention": "flash_attention_2"}})


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma"])
def test_the_graphed_decode_loop_gives_transformers_tokens(model_type, tiny_dirs, cache_config):
    """The loop a CUDA graph replays (static KV cache, bias from the position, prompt fed in chunks), run eagerly
    on the CPU: transformers' greedy tokens, for one and two sequences, and a sequence ended by its EOS padded."""
    from tierstore.inference.decoding import graphed, static_forward
    from tierstore.inference.decoding.sampling import chooser

    import tierstore

    directory, reference = tiny_dirs(model_type)
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3], [8, 1, 4, 4, 60, 2, 19]])
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with tierstore.AutoModel.from_pretrained(directory, config=cache_config) as model, torch.no_grad():
        decoder = graphed.GraphedDecoder(model.model, model.device)
        old_chunk, static_forward.PROMPT_CHUNK_TOKENS = static_forward.PROMPT_CHUNK_TOKENS, 3  # three prompt chunks
        try:
            for rows in (ids[:1], ids):
                got, stats = decoder.generate(rows, 12, chooser(False, None), set(), 0, None, lambda: None)
                assert got.tolist() == want[:len(rows)].tolist()
                assert stats.steps == 11
            end = int(want[1, 7 + 4])  # row 2's fifth new token as the EOS: that row ends, padded with 0
            got, _ = decoder.generate(ids, 12, chooser(False, None), {end}, 0, None, lambda: None)
        finally:
            static_forward.PROMPT_CHUNK_TOKENS = old_chunk
    with torch.no_grad():
        ended = reference.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=end)
    assert got.tolist() == ended.tolist()
    assert 0 in got[1, 7:].tolist()


def test_a_decode_loop_queueing_each_step_before_reading_the_last_token_gives_the_same_tokens(tiny_dirs,
                                                                                               cache_config,
                                                                                               monkeypatch):
    """The graphed loop with every step queued before the last step's tokens are read back (`_Readback.ahead`,
    forced on the CPU): transformers' greedy tokens for a call that runs to its length and for one its EOS ends
    (the step queued past the EOS is dropped), each token handed to the streamer and `on_token` once, in order."""
    from tierstore.inference.decoding import graphed
    from tierstore.inference.decoding.sampling import chooser

    monkeypatch.setattr(graphed._Readback, "DEVICES", ("cpu",))
    monkeypatch.setattr(graphed._Readback, "AHEAD_SHARE", 0.0)
    directory, reference = tiny_dirs("llama")
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3]])
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        new = want[0, ids.shape[1]:].tolist()
        end = next(token for at, token in enumerate(new) if at >= 4 and token not in new[:at])  # first seen late
        ended = reference.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=end)
    assert ids.shape[1] + 5 <= ended.shape[1] < want.shape[1]
    ahead = []
    real_ahead = graphed._Readback.ahead
    monkeypatch.setattr(graphed._Readback, "ahead", lambda self: ahead.append(real_ahead(self)) or ahead[-1])

    class Streamer:
        def __init__(self):
            self.puts = []

        def put(self, tokens):
            self.puts.append(tokens.tolist())

        def end(self):
            self.puts.append("end")

    with tierstore.AutoModel.from_pretrained(directory, config=cache_config) as model, torch.no_grad():
        decoder = graphed.GraphedDecoder(model.model, model.device)
        for ends, expected in ((set(), want), ({end}, ended)):
            streamer, marks = Streamer(), []
            got, _ = decoder.generate(ids, 12, chooser(False, None), ends, 0, streamer,
                                      lambda: marks.append(len(streamer.puts)))
            assert got.tolist() == expected.tolist()
            new = expected[0, ids.shape[1]:].tolist()
            assert streamer.puts == [ids.tolist()] + [[token] for token in new] + ["end"]
            assert marks == list(range(1, len(new) + 1))  # on_token before each token's put
    assert ahead.count(True) >= 8 + 3  # every step from the third on ran ahead, the EOS's too


class _ReplayedForward:
    """A stand-in for a CUDA graph on the CPU: recording runs the forward once; a replay runs it again on the
    buffers it was recorded with and writes its outputs into the recorded outputs, as a graph's replay does."""

    def __init__(self, forward):
        self.forward = forward
        self.outputs = forward()

    def replay(self):
        from torch.utils import _pytree as pytree

        for kept, fresh in zip(pytree.tree_leaves(self.outputs), pytree.tree_leaves(self.forward())):
            kept.copy_(fresh)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_resident_layers_replayed_inside_streamed_decode_steps_give_transformers_tokens(model_type, tiny_dirs,
                                                                                       cache_config):
    """A model that streams half its layers decodes with its resident layers recorded on their second step and
    replayed after (each replay fed its inputs by copy, except those already in place): transformers' greedy
    tokens over two calls, every resident layer replayed on every step after its second, none recorded again for
    a call of the same length; a layer whose unit is found elsewhere than at recording gets a graph for that
    place too, up to GraphedLayer.VARIANTS places; past that it forgets them, runs eagerly once (a move) and is
    recorded anew."""
    from tierstore.inference.decoding.graphed import GraphedDecoder
    from tierstore.inference.decoding.layer_graphs import GraphedLayer, LayerGraphs
    from tierstore.inference.decoding.prefill import feed_prompt_planned
    from tierstore.inference.decoding.sampling import chooser
    from tierstore.inference.loading.skeleton import decoder_layers

    directory, reference = tiny_dirs(model_type)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=12, do_sample=False)
    recorded = []

    def record(forward):
        recorded.append(forward)
        return _ReplayedForward(forward), None

    with tierstore.AutoModel.from_pretrained(directory, budget=_budget_for(reference), config=cache_config) as model, \
            torch.no_grad():
        resident = model._resident_layers()
        assert 0 < len(resident) < reference.config.num_hidden_layers  # some layers stream
        layers = LayerGraphs(decoder_layers(model.model, model.model.config)[1], resident, model.store, record)
        decoder = GraphedDecoder(model.model, model.device, layers=layers,
                                 feed=lambda kv, input_ids: feed_prompt_planned(model, kv, input_ids))
        for call, replays in ((0, 9), (1, 11)):  # 11 decode steps: eager, recorded, then replayed
            before = layers.replays
            got, _ = decoder.generate(ids, 12, chooser(False, None), set(), 0, None, lambda: None)
            assert got.tolist() == want.tolist(), call
            assert layers.replays - before == replays * len(resident), call
        assert len(recorded) == len(resident)
        moved = layers._graphed[min(resident)]
        (recording,) = moved.recordings.values()
        moved.recordings = {(0,): recording}  # as if recorded where a re-plan has since moved its unit from
        got, _ = decoder.generate(ids, 12, chooser(False, None), set(), 0, None, lambda: None)
        assert got.tolist() == want.tolist()
        assert len(recorded) == len(resident) + 1 and len(moved.recordings) == 2  # a graph for each place
        assert moved.moves == 0
        moved.recordings = {(index,): recording for index in range(GraphedLayer.VARIANTS)}  # every place taken
        before = layers.replays
        got, _ = decoder.generate(ids, 12, chooser(False, None), set(), 0, None, lambda: None)
        assert got.tolist() == want.tolist()
        assert moved.moves == 1 and len(recorded) == len(resident) + 2  # forgotten, eager once, recorded again
        assert layers.replays - before == 11 * len(resident) - 2
    assert all(type(layer).__name__ != "GraphedLayer" for layer in reference.model.layers)


def test_streamed_layers_are_replayed_while_their_units_come_back_where_recorded_and_stay_eager_once_they_move(
        tiny_dirs, cache_config):
    """Every decoder layer of a model that streams half of them gets a graph (`layer_units`): the streamed ones are
    replayed while the store lands their units in the buffers they were recorded with (here, every step), with
    transformers' greedy tokens. A streamed layer whose units moved more than MOVES times stays eager for good (a
    new call does not give it more tries, as it does a resident layer), and still gives the same tokens."""
    from tierstore.inference.decoding.graphed import GraphedDecoder
    from tierstore.inference.decoding.layer_graphs import GraphedLayer, LayerGraphs, layer_units
    from tierstore.inference.decoding.prefill import feed_prompt_planned
    from tierstore.inference.decoding.sampling import chooser
    from tierstore.inference.loading.skeleton import decoder_layers

    directory, reference = tiny_dirs("llama")
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=12, do_sample=False).tolist()
    with tierstore.AutoModel.from_pretrained(directory, budget=_budget_for(reference), config=cache_config) as model, \
            torch.no_grad():
        resident = model._resident_layers()
        units = layer_units(model.store.schedule)
        streamed = sorted(set(units) - set(resident))
        assert streamed and resident and sorted(units) == list(range(reference.config.num_hidden_layers))
        layers = LayerGraphs(decoder_layers(model.model, model.model.config)[1], units, model.store,
                             lambda forward: (_ReplayedForward(forward), None), resident=resident)
        assert layers.resident_count == len(resident) and layers.count == len(units)
        decoder = GraphedDecoder(model.model, model.device, layers=layers,
                                 feed=lambda kv, input_ids: feed_prompt_planned(model, kv, input_ids))

        def call() -> list:
            return decoder.generate(ids, 12, chooser(False, None), set(), 0, None, lambda: None)[0].tolist()

        assert call() == want
        assert layers.streamed_replays == 9 * len(streamed)  # 11 decode steps: eager, recorded, then replayed
        moved = layers._graphed[streamed[0]]
        moved.moves = GraphedLayer.MOVES + 1  # as if its units had come back elsewhere three times
        kept = layers._graphed[min(resident)]
        kept.moves = GraphedLayer.MOVES + 1
        before = layers.streamed_replays
        assert call() == want
        assert layers.streamed_replays - before == 11 * (len(streamed) - 1)  # the moved layer ran eagerly
        assert moved.moves == GraphedLayer.MOVES + 1 and kept.moves == 0


def test_cuda_graphs_auto_graphs_every_layer_of_a_streamed_model_and_resident_only_those_kept(tiny_dirs, cache_config,
                                                                                                   monkeypatch):
    """The decoder a streamed model's decode steps get: with `runtime.cuda_graphs = auto`, a graph for every decoder
    layer (the streamed ones too); with `resident`, only for the layers kept on the device."""
    from tierstore.inference.decoding import model as model_module

    monkeypatch.setattr(model_module, "cuda_record", lambda device: lambda forward: (_ReplayedForward(forward), None))
    directory, reference = tiny_dirs("llama")
    counts = {}
    for setting in ("auto", "resident"):
        config = {"runtime": {**cache_config["runtime"], "cuda_graphs": setting}}
        with tierstore.AutoModel.from_pretrained(directory, budget=_budget_for(reference), config=config) as model:
            resident = len(model._resident_layers())
            layers = model._decoder().layers
            counts[setting] = layers.count, layers.resident_count
    assert 0 < resident < reference.config.num_hidden_layers  # some layers stream
    assert counts == {"auto": (reference.config.num_hidden_layers, resident), "resident": (resident, resident)}


def test_graphs_kept_across_calls_are_let_go_when_a_replan_moved_their_units(tiny_dirs, cache_config):
    """The whole-model graphs a resident model keeps for later calls (a whole decode step's, the verify passes')
    read its units where they were recorded: kept by a call that finds every unit where the last graphed call left
    it, let go by one after a re-plan evicted them in between (they come back elsewhere), with transformers'
    tokens either way."""
    import dataclasses

    directory, reference = tiny_dirs("llama")
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=6, do_sample=False).tolist()
    with tierstore.AutoModel.from_pretrained(directory, config=cache_config) as model, torch.no_grad():
        assert model._moving_units() == 0 and model.generate(ids, max_new_tokens=6, do_sample=False).tolist() == want
        decoder, verifier = object(), object()  # stand-ins: a CPU records no graph
        model._graphed, model._graphed_layers, model._graphed_verifier = decoder, None, verifier
        model._graphs_read = model._resident_addresses()
        assert 0 not in model._graphs_read  # every resident unit is on the device
        assert model.generate(ids, max_new_tokens=6, do_sample=False).tolist() == want
        assert model._graphed is decoder and model._graphed_verifier is verifier  # nothing moved: kept
        plan = model.plan
        model.store.replan(dataclasses.replace(plan, device_resident=(), device_weights_bytes=0))  # all evicted
        model.store.replan(plan)
        assert model.generate(ids, max_new_tokens=6, do_sample=False).tolist() == want
        assert model._graphed is None and model._graphed_verifier is None and model._graphs_read is None


def test_cuda_graphs_is_validated_and_changes_no_token_on_a_cpu(tiny_dirs, tmp_path):
    """`runtime.cuda_graphs` takes auto, resident or off (anything else is refused, naming the key); on a CPU they
    give the same tokens and the report says nothing was graphed (None: not a GPU)."""
    from tierstore.errors import ConfigError

    with pytest.raises(ConfigError, match="runtime.cuda_graphs"):
        tierstore.Config.load({"runtime": {"cuda_graphs": "on"}})
    directory, _ = tiny_dirs("llama")
    ids = torch.tensor([[5, 9, 33, 7, 81, 100, 3]])
    tokens = {}
    for setting in ("auto", "resident", "off"):
        config = {"runtime": {"cache_dir": str(tmp_path), "cuda_graphs": setting}}
        with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
            tokens[setting] = model.generate(ids, max_new_tokens=8, do_sample=False).tolist()
            assert model.report().timing.graphed is None
    assert tokens["auto"] == tokens["resident"] == tokens["off"]
