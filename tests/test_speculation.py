"""Speculative decoding: greedy output equals plain decoding, sampling keeps the model's distribution, drafts are
planned in the device budget, bad drafts are refused in one line."""
import json
import os

import pytest
import torch
from conftest import tiny_model
from test_models import PROMPTS, _budget_for
from test_smollm2 import BUDGETS, PROMPTS as SMOLLM2_PROMPTS, _ids

import tierstore
from tierstore.inference.front.cli import main
from tierstore.policies.speculation import TreePolicy, VerifyCurve

REPEATING = [5, 9, 33, 7, 81, 100, 3, 5, 9, 33, 7, 81]  # gives the ngram draft something to find


def _draft_dir(tmp_path_factory, model_type, seed, **overrides):
    """A random model of the same shape (a draft that sometimes agrees with the target, sometimes not)."""
    model = tiny_model(model_type, seed=seed)
    for key, value in overrides.items():
        setattr(model.config, key, value)
    directory = tmp_path_factory.mktemp(f"draft-{model_type}-{seed}")
    model.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma", "mixtral"])
def test_greedy_with_a_draft_equals_plain_greedy(model_type, tiny_dirs, tmp_path_factory, tmp_path):
    directory, reference = tiny_dirs(model_type)
    other = _draft_dir(tmp_path_factory, model_type, seed=1)
    streaming = _budget_for(reference)
    draft_bytes = sum(p.numel() for p in reference.parameters()) * 4  # a model draft comes out of the device budget
    for draft in ("ngram", directory, other):  # n-grams, a draft that always agrees, one that mostly does not
        budget = streaming if draft == "ngram" else tierstore.Budget(vram=streaming.vram + draft_bytes,
                                                                     ram=streaming.ram)
        for depth in ("auto", 5):
            config = {"runtime": {"cache_dir": str(tmp_path)}, "speculation": {"depth": depth, "width": 3}}
            with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, draft=draft) as model:
                assert model.plan.regime == "disk"
                for prompt in (REPEATING, *PROMPTS):
                    ids = torch.tensor([prompt])
                    want = reference.generate(ids, max_new_tokens=24, do_sample=False)
                    got = model.generate(ids, max_new_tokens=24, do_sample=False)
                    assert got.tolist() == want.tolist(), (model_type, draft, depth)
                spec = model.report().speculation
                assert spec["new_tokens"] >= 1
                if draft == directory and depth == 5 and spec["passes"]:  # the model drafting itself
                    assert spec["acceptance_rate"] == 1.0 and spec["tokens_per_pass"] >= 2
                    assert spec["acceptance_by_depth"] and set(spec["acceptance_by_depth"]) == {1.0}, spec
                for tier, stats in model.report().tiers.items():
                    assert stats.budget_bytes is None or stats.peak_bytes <= stats.budget_bytes, tier


def _recurring_prompt(reference) -> list[int]:
    """A prompt after which the n-gram draft finds eight different continuations: eight pieces `[5, r] + 11 random
    tokens`, ending in 5, where r is the model's greedy next token after it (found by iterating to a fixed point)."""
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        pieces = [torch.randint(40, 120, (11,), generator=generator).tolist() for _ in range(8)]
        root = 5
        for _ in range(10):
            prompt = [token for piece in pieces for token in [5, root] + piece] + [5]
            with torch.no_grad():
                nxt = int(reference(torch.tensor([prompt])).logits[0, -1].argmax())
            if nxt == root:
                return prompt
            root = nxt
    raise AssertionError("no prompt found whose greedy next token recurs in it")


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_trees_of_hundreds_of_nodes_give_transformers_greedy_tokens(model_type, tiny_dirs, tmp_path_factory,
                                                                    tmp_path):
    """Each draft verifies trees of 256 nodes or more in one pass: n-grams over a prompt whose last tokens recur
    with eight different continuations, the model drafting itself, and another model."""
    directory, reference = tiny_dirs(model_type)
    other = _draft_dir(tmp_path_factory, model_type, seed=1)
    ids = torch.tensor([_recurring_prompt(reference)])
    want = reference.generate(ids, max_new_tokens=48, do_sample=False)
    config = {"runtime": {"cache_dir": str(tmp_path)}, "speculation": {"depth": 10, "width": 32}}
    for draft in ("ngram", directory, other):
        with tierstore.AutoModel.from_pretrained(directory, config=config, draft=draft) as model:
            got = model.generate(ids, max_new_tokens=48, do_sample=False)
            spec = model.report().speculation
        assert got.tolist() == want.tolist(), draft
        assert spec["largest_tree"] >= 256, (draft, spec)
    capped = {**config, "speculation": {**config["speculation"], "nodes": 40}}
    with tierstore.AutoModel.from_pretrained(directory, config=capped, draft=other) as model:
        got = model.generate(ids, max_new_tokens=48, do_sample=False)
        assert got.tolist() == want.tolist()
        assert 0 < model.report().speculation["largest_tree"] <= 40  # speculation.nodes caps every tree


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_a_tree_grown_while_the_model_verifies_starts_the_next_one_and_keeps_the_tokens(
        model_type, tiny_dirs, tmp_path_factory, tmp_path, monkeypatch):
    """With `speculation.ahead` the draft grows its tree between the launch of a (streamed) verify pass and its
    read-back; a pass whose bonus token is in that grown tree starts the next tree from its subtree, the draft's
    cache entries moved with it. Greedy tokens stay transformers'; the model drafting itself still has every
    drafted token accepted (an entry moved wrong would change its probabilities), and its passes do start from
    carried subtrees."""
    from tierstore.inference.decoding.drafts import ModelDraft

    monkeypatch.setattr(ModelDraft, "ahead_min_steps", 4)  # grow this much however soon the pass is done
    directory, reference = tiny_dirs(model_type)
    other = _draft_dir(tmp_path_factory, model_type, seed=1)
    streaming = _budget_for(reference)
    draft_bytes = sum(p.numel() for p in reference.parameters()) * 4
    budget = tierstore.Budget(vram=streaming.vram + draft_bytes, ram=streaming.ram)
    config = {"runtime": {"cache_dir": str(tmp_path)}, "speculation": {"depth": 3, "width": 3, "ahead": True}}
    for draft in (directory, other):
        with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, draft=draft) as model:
            assert model.plan.regime == "disk"  # the verify pass streams
            for prompt in (REPEATING, *PROMPTS):
                ids = torch.tensor([prompt])
                want = reference.generate(ids, max_new_tokens=32, do_sample=False)
                got = model.generate(ids, max_new_tokens=32, do_sample=False)
                assert got.tolist() == want.tolist(), (draft, prompt)
                spec = model.report().speculation
                assert spec["ahead_steps"] >= spec["passes"], spec  # (the last passes have little depth left to grow)
                if draft == directory:
                    assert spec["acceptance_rate"] == 1.0, spec
                    assert spec["carried_trees"] >= spec["passes"] // 2, spec
            notes = " ".join(model.report().notes)
            assert "started from a subtree grown ahead" in notes, notes


def test_a_streamed_moe_pass_hands_the_draft_each_layers_routing_wait(tmp_path, monkeypatch):
    """With `speculation.ahead` and experts that stream, the host's wait at each MoE layer's routing read-back
    (the previous layer's copies landing) goes to the draft too, not only the time after the pass is launched:
    the draft's steps run inside the pass's forward, one a layer here (a CPU's pass is never busy, so the
    minimum), and later passes start from the tree so grown. The tokens are transformers' greedy ones, the model
    drafting itself has every token accepted (an entry written at the wrong place would change its
    probabilities); without `ahead` no layer hands its wait over."""
    from test_architectures import tiny
    from test_moe import _config, _reference, _streaming_budget

    from tierstore.inference.decoding.drafts import ModelDraft

    monkeypatch.setattr(ModelDraft, "ahead_min_steps", 1)
    reference, why = tiny("mixtral", num_local_experts=16)
    assert reference is not None, why
    directory = str(tmp_path / "mixtral16")
    reference.save_pretrained(directory)
    want = _reference(reference, 24, torch.tensor([REPEATING]))
    layers = reference.config.num_hidden_layers
    draft_bytes = sum(p.numel() for p in reference.parameters()) * 4
    in_layer = []  # per grow_while call: whether an MoE layer's routing wait made it
    real = ModelDraft.grow_while
    for ahead in (True, False):
        config = {**_config(str(tmp_path)), "speculation": {"depth": 4, "width": 3, "ahead": ahead}}
        streaming = _streaming_budget(directory, config)
        budget = tierstore.Budget(vram=streaming.vram + draft_bytes + 1_000_000, ram=streaming.ram)
        with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, draft=directory) as model:
            runner = model.experts
            assert runner is not None and model.plan.experts.device_slots < 16 * layers  # the experts stream
            in_layer.clear()
            monkeypatch.setattr(ModelDraft, "grow_while", lambda self, busy: in_layer.append(
                runner._meanwhile is not None) or real(self, busy))
            got = model.generate(torch.tensor([REPEATING]), max_new_tokens=24, do_sample=False,
                                 pad_token_id=0).tolist()
            report = model.report()
            spec = report.speculation
        assert got == want, ahead
        assert spec["acceptance_rate"] == 1.0, spec
        if not ahead:
            assert not any(in_layer) and spec["ahead_steps"] == 0, spec
            continue
        assert in_layer.count(True) == spec["passes"] * layers, (in_layer, spec)  # every layer of every pass
        assert in_layer.count(False) == spec["passes"]  # and once after each pass's launch, as before
        assert spec["ahead_steps"] > spec["passes"] and spec["carried_trees"] > 0, spec
        assert report.experts["meanwhile_s"] > 0 and "in the MoE layers' routing waits" in " ".join(report.notes)


def test_a_subtree_grown_ahead_is_cut_to_the_node_cap_before_it_is_verified(tiny_dirs, tmp_path, monkeypatch):
    """The draft grows its copy of the tree during a pass up to its cache's room (two trees' worth), so the subtree
    the bonus token roots can outgrow `speculation.nodes`, the most a verify pass holds (the device reserve is
    sized for it): a carried subtree keeps its best nodes up to the cap, the tokens stay transformers'."""
    from tierstore.inference.decoding.drafts import ModelDraft

    monkeypatch.setattr(ModelDraft, "ahead_min_steps", 12)  # each pass grows 12 steps of 3 ahead: up to 36 nodes
    directory, reference = tiny_dirs("llama")
    config = {"runtime": {"cache_dir": str(tmp_path)},
              "speculation": {"depth": 2, "width": 3, "ahead": True, "nodes": 8}}
    with tierstore.AutoModel.from_pretrained(directory, config=config, draft=directory) as model:
        for prompt in (REPEATING, *PROMPTS):
            ids = torch.tensor([prompt])
            want = reference.generate(ids, max_new_tokens=32, do_sample=False)
            got = model.generate(ids, max_new_tokens=32, do_sample=False)
            assert got.tolist() == want.tolist(), prompt
            spec = model.report().speculation
            assert spec["carried_trees"] > 0 and spec["acceptance_rate"] == 1.0, spec
            assert spec["largest_tree"] <= 8, spec


def test_a_capped_subtree_keeps_its_best_fed_nodes_with_their_ancestors_and_their_unfed_children():
    from tierstore.inference.decoding.drafts import _capped
    from tierstore.inference.decoding.tree import DraftTree

    tree = DraftTree.rooted_at(1)
    a, b = tree.add(0, 2, 0.9), tree.add(0, 3, 0.6)
    c, d = tree.add(a, 4, 0.8), tree.add(b, 5, 0.5)
    e = tree.add(c, 6, 0.7)  # unfed leaves: e, and d's child
    tree.add(d, 7, 0.4)
    below, fed = tree.subtree(0), {a, b, c, d}
    assert _capped(tree, below, fed, 4) == below
    assert _capped(tree, below, fed, 2) == [0, a, c, e]  # b, d and d's unfed child go
    assert _capped(tree, below, fed, 3) == [0, a, b, c, e]


def test_the_ngram_draft_follows_a_text_being_rewritten_past_a_replaced_token():
    """Prompt lookup with edits: after an exact n-gram, the continuation of an earlier occurrence; after a token (or
    two) that replaced one of the text being rewritten, the text after the replaced ones; the last token alone
    only where no longer n-gram occurred."""
    from tierstore.inference.decoding.drafts import NgramDraft

    source = [10, 11, 12, 13, 14, 15, 16, 17]

    def paths(history: list[int]) -> set[tuple[int, ...]]:
        draft = NgramDraft(max_branches=4)
        tree = draft.propose(history, max_depth=4)
        leaves = [node for node in range(1, len(tree)) if not tree.children[node]]
        out = set()
        for leaf in leaves:
            path = []
            while leaf:
                path.append(tree.tokens[leaf])
                leaf = tree.parents[leaf]
            out.add(tuple(path[::-1]))
        return out

    assert paths(source + [99, 10, 11, 12]) == {(13, 14, 15, 16)}  # exact
    assert paths(source + [99, 10, 11, 50]) == {(13, 14, 15, 16)}  # 12 replaced by 50
    assert paths(source + [99, 10, 11, 50, 51]) == {(14, 15, 16, 17)}  # 12 13 replaced by 50 51
    assert paths(source + [99, 10, 11, 50, 51, 52]) == set()  # nothing left to follow
    assert paths([5, 6, 7, 8, 1, 6, 9, 2, 5, 6]) == {(7, 8, 1, 6)}  # "5 6" occurred: not "6" alone
    assert paths([5, 6, 7, 8, 1, 6, 9, 2, 4, 6]) == {(7, 8, 1, 6), (9, 2, 4, 6)}  # only "6" did
    assert not NgramDraft().propose([1, 2, 3], max_depth=0).children[0]


def test_a_draft_that_grows_ahead_is_charged_a_second_trees_kv_cache():
    from tierstore.inference.placement.budgets import DraftCost

    plain = DraftCost("draft", weights_bytes=1000, kv_bytes_per_token=10)
    ahead = DraftCost("draft", weights_bytes=1000, kv_bytes_per_token=10, ahead_tokens=1024)
    assert ahead.reserve_bytes(True) - plain.reserve_bytes(True) == 10 * 1024
    assert ahead.reserve_bytes(False) == plain.reserve_bytes(False) == 1000  # a CPU: the weights only
    assert "and a tree of 1024 grown ahead" in ahead.note(True)


class _Decoys:
    """A draft that knows the answer and hides it among wrong siblings: every true token is its parent's second
    child, so the accepted path's nodes are not contiguous (their cache entries must be moved together)."""

    name, policy, steps, step_s = "decoys", None, 0, 0.0

    def __init__(self, answer: list[int], vocab_size: int) -> None:
        self.answer, self.vocab_size = answer, vocab_size

    def reset(self, max_tokens, stop_ids=frozenset()):
        pass

    def propose(self, history, max_depth):
        from tierstore.inference.decoding.tree import DraftTree

        tree = DraftTree.rooted_at(history[-1])
        node = 0
        for token in self.answer[len(history):len(history) + min(max_depth, 6)]:
            tree.add(node, (token + 1) % self.vocab_size, 0.5)  # the decoy first
            node = tree.add(node, token, 0.5)
        return tree

    def accepted(self, tree, path, bonus):
        pass


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_verify_passes_over_fixed_buffers_give_transformers_greedy_tokens(model_type, tiny_dirs, tmp_path_factory,
                                                                         tmp_path):
    """The verify pass a CUDA graph replays (a static cache, each tree padded to one of a few widths, the accepted
    path's entries moved after the prefix), run eagerly on the CPU: transformers' greedy tokens for n-gram trees of
    hundreds of nodes and another model's trees, through one verifier whose buffers serve both calls."""
    from tierstore.inference.decoding.drafts import ModelDraft, NgramDraft
    from tierstore.inference.decoding.sampling import chooser, warp
    from tierstore.inference.decoding.speculation import SpeculationStats, speculate
    from tierstore.inference.decoding.verifier import GraphedVerifier

    directory, reference = tiny_dirs(model_type)
    other = _draft_dir(tmp_path_factory, model_type, seed=1)
    ids = torch.tensor([_recurring_prompt(reference)])
    want = reference.generate(ids, max_new_tokens=48, do_sample=False)
    config = {"runtime": {"cache_dir": str(tmp_path)}}
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model, \
            tierstore.AutoModel.from_pretrained(other, config=config) as draft_model:
        verifier = GraphedVerifier(model.model, model.device, max_nodes=300)
        ngram = NgramDraft(max_branches=32)
        ngram.max_nodes = 300
        drafted = ModelDraft(draft_model, "other", warp(None, None, None), reference.config.vocab_size, width=32,
                             policy=TreePolicy(fixed_steps=10, max_nodes=300))
        for draft in (ngram, drafted, _Decoys(want[0].tolist(), reference.config.vocab_size)):
            stats = SpeculationStats(draft.name)
            with torch.no_grad():
                got = speculate(verifier, draft, ids, 48, chooser(False, None), set(), stats)
            assert got.tolist() == want.tolist(), draft.name
            assert stats.passes < 47, stats  # drafted tokens were accepted
        kv = verifier.kv
        assert stats.largest_tree <= 300
    widths = sorted(verifier._forwards)
    assert widths[-1] == 301 and len(widths) >= 2, widths  # the widest (the node cap) and smaller trees' widths
    assert verifier.kv is kv  # the second call reused the first's buffers


def test_end_of_sequence_and_max_new_tokens_hold(tiny_dirs, tmp_path):
    directory, reference = tiny_dirs("llama")
    config = {"runtime": {"cache_dir": str(tmp_path)}, "speculation": {"depth": 8}}
    ids = torch.tensor([REPEATING])
    plain = reference.generate(ids, max_new_tokens=20, do_sample=False)[0, len(REPEATING):].tolist()
    eos = plain[6]
    with tierstore.AutoModel.from_pretrained(directory, config=config, draft=directory) as model:
        for new in (1, 2, 7):
            assert model.generate(ids, max_new_tokens=new, do_sample=False)[0, len(REPEATING):].tolist() == \
                plain[:new]
        stopped = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos)[0, len(REPEATING):]
    assert stopped.tolist() == plain[:plain.index(eos) + 1]


def _tiny_vocab_pair(tmp_path_factory):
    """Target and draft over 6 tokens, different weights: sampling tests can enumerate every sequence."""
    from transformers import AutoConfig, AutoModelForCausalLM

    made = []
    for seed in (0, 3):
        config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=6,
                                      max_position_embeddings=64, bos_token_id=0, eos_token_id=None,
                                      pad_token_id=None)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(3.0) if param.dim() > 1 else None
        directory = tmp_path_factory.mktemp(f"vocab6-{seed}")
        model.save_pretrained(directory)
        made.append((str(directory), model))
    return made


def _exact_distribution(model, prompt, steps):
    """P(token at each of `steps` positions), summed over all paths, at temperature 0.7."""
    marginals = [torch.zeros(6, dtype=torch.float64) for _ in range(steps)]

    def walk(sequence, probability, depth):
        if depth == steps:
            return
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([sequence])).logits[0, -1].double() / 0.7, -1)
        for token in range(6):
            marginals[depth][token] += probability * probs[token]
            walk(sequence + [token], probability * probs[token].item(), depth + 1)
    walk(list(prompt), 1.0, 0)
    return marginals


def _p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of `counts` against `probs` (cells under 1 expected are merged)."""
    total = counts.sum().item()
    expected = probs * total
    keep = expected >= 5
    observed = torch.cat([counts[keep].double(), counts[~keep].double().sum().reshape(1)])
    expected = torch.cat([expected[keep], expected[~keep].sum().reshape(1)])
    observed, expected = observed[expected > 0], expected[expected > 0]
    statistic = ((observed - expected) ** 2 / expected).sum().item()
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def test_sampling_with_a_draft_keeps_the_model_distribution(tmp_path_factory, tmp_path):
    """On a 6-token vocabulary, the 2nd and 3rd sampled tokens (the first ones a draft proposes) follow the
    model's exact distribution; the same test rejects the draft's own distribution, which a rule that always
    accepted the draft would produce."""
    (target_dir, target), (draft_dir, draft) = _tiny_vocab_pair(tmp_path_factory)
    prompt = [1, 4, 2]
    want = _exact_distribution(target, prompt, 3)
    draft_dist = _exact_distribution(draft, prompt, 3)
    assert (want[2] - draft_dist[2]).abs().sum() > 0.2  # the draft really differs
    runs = 1500
    counts = [torch.zeros(6, dtype=torch.long) for _ in range(3)]
    accepted = trials = 0
    config = {"runtime": {"cache_dir": str(tmp_path)}, "speculation": {"depth": 2, "width": 2}}
    with tierstore.AutoModel.from_pretrained(target_dir, config=config, draft=draft_dir) as model:
        torch.manual_seed(0)
        for _ in range(runs):
            out = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=True, temperature=0.7,
                                 top_k=0, top_p=1.0)
            for position, token in enumerate(out[0, len(prompt):].tolist()):
                counts[position][token] += 1
            accepted += model.report().speculation["accepted"]
            trials += model.report().speculation["trials"]
    assert 0 < accepted < trials  # both branches of the rule were taken
    for position in (1, 2):
        assert _p_value(counts[position], want[position]) > 1e-3, (position, counts[position], want[position])
    draft_counts = torch.multinomial(draft_dist[2], runs, replacement=True, generator=torch.Generator().manual_seed(1))
    assert _p_value(torch.bincount(draft_counts, minlength=6), want[2]) < 1e-3


def _nodes(policy: TreePolicy, width: int = 8, decay: float = 0.97) -> int:
    """The nodes the policy drafts for a chain-like draft: each step's best candidate is the chain's next token
    (scores decaying by `decay`), the others a hundredth of it."""
    steps, nodes, scores, drafted_s, chain = 1, 0, 0.0, 0.0, decay
    while True:
        gains = [chain] + [chain / 100] * (width - 1)
        count = policy.take(steps, nodes, scores, gains, drafted_s)
        if count == 0:
            return nodes + policy.take(steps, nodes, scores, gains, drafted_s, feed=False)
        steps, nodes, scores = steps + 1, nodes + count, scores + sum(gains[:count])
        drafted_s += policy.step_s or 0.005
        chain *= decay
        if steps > 1000:
            return nodes


def _learn(policy: TreePolicy, verify_s, sizes=(9, 17, 33, 65, 129, 257, 513), step_s: float = 0.005) -> None:
    """Feed passes of each size whose time `verify_s(tokens)` gives."""
    for tokens in sizes * 3:
        policy.observe_step(step_s)
        policy.observe_pass(verify_s(tokens), tokens, [])


def test_the_verify_curve_interpolates_never_falls_and_is_trusted_up_to_four_times_what_it_measured():
    curve = VerifyCurve()
    assert curve.seconds(10) is None
    for tokens, seconds in ((10, 0.2), (40, 0.6), (80, 0.5)):  # the 80-token pass ran faster: noise
        curve.observe(tokens, seconds)
    assert curve.seconds(5) == pytest.approx(0.2)
    assert curve.seconds(25) == pytest.approx(0.4)
    assert curve.seconds(80) == pytest.approx(0.6)  # never below a smaller pass
    assert curve.seconds(320) == pytest.approx(0.6) and curve.seconds(321) is None


def test_trees_grow_large_when_the_verify_pass_is_flat_and_stay_small_when_it_grows():
    """A streamed dense model: the verify pass costs its bytes whatever the tree, so the tree grows to hundreds of
    nodes. A mixture-of-experts target whose every node brings experts across the link: a small tree, whose steps
    leave out the weak candidates a flat pass takes for free."""
    flat, growing = TreePolicy(), TreePolicy()
    _learn(flat, lambda tokens: 0.5)
    _learn(growing, lambda tokens: 0.05 + 0.004 * tokens)
    assert _nodes(flat) >= 256
    assert _nodes(growing) < _nodes(flat) / 4
    assert _nodes(growing) < _nodes(growing, width=1) * 2  # about one node a step: the chain
    dear = TreePolicy()  # a flat pass that costs more makes the same draft step worth more
    _learn(dear, lambda tokens: 2.0)
    assert _nodes(dear, decay=0.9) > _nodes(flat, decay=0.9)


def test_trees_stop_at_the_node_cap_and_grow_by_at_most_four_times_a_pass():
    policy = TreePolicy(max_nodes=64)
    _learn(policy, lambda tokens: 0.5)
    assert _nodes(policy) == 64
    fresh = TreePolicy()
    assert _nodes(fresh) == 4 * 8  # nothing measured: the warm-up's steps
    _learn(fresh, lambda tokens: 0.5, sizes=(33,))
    assert 2 * 33 <= _nodes(fresh) <= 4 * 33  # trusted up to four times the largest pass measured


def test_steps_go_wide_where_a_wider_step_costs_little_more_and_stay_narrow_where_it_costs_in_proportion():
    """A draft steps over 8, 16 or 32 slots. On a GPU a step's forward is bound by launches (measured on the H200:
    2.2 and 2.4 ms at widths 8 and 16), so a step takes 32 candidates where the tail's gains are small; on a CPU a
    step's time grows with its width, and the same candidates are taken 8 at most."""
    gains = [0.9, 0.5] + [0.02] * 30
    for step_ms, most in (((3.0, 3.3, 3.6), 32), ((30.0, 60.0, 120.0), 8)):
        policy = TreePolicy()
        policy.widths = (8, 16, 32)
        _learn(policy, lambda tokens: 0.2, step_s=step_ms[0] / 1e3)
        for width, ms in zip(policy.widths, step_ms):
            policy.observe_step(ms / 1e3, width)
        assert policy.step_cost(9) == pytest.approx(step_ms[1] / 1e3)  # 9 candidates run in the 16-wide step
        taken = policy.take(1, 1, 0.9, gains, 0.0)
        assert (taken == 32) if most == 32 else (2 <= taken <= 8), (step_ms, taken)
    unmeasured = TreePolicy()
    unmeasured.widths = (8, 16, 32)
    unmeasured.observe_step(0.004, 8)
    assert unmeasured.step_cost(20) == pytest.approx(0.004)  # a width not yet run costs what a narrower one did


def test_a_draft_step_runs_the_narrowest_width_that_holds_its_nodes(tiny_dirs, tmp_path):
    from tierstore.inference.decoding.drafts import ModelDraft, step_widths
    from tierstore.inference.decoding.sampling import warp

    assert step_widths(32) == (8, 16, 32) and step_widths(20) == (8, 16, 20) and step_widths(3) == (3,)
    directory, reference = tiny_dirs("llama")
    with tierstore.AutoModel.from_pretrained(directory, config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        draft = ModelDraft(model, "self", warp(None, None, None), reference.config.vocab_size, width=32,
                           policy=TreePolicy(fixed_steps=2))
        draft.reset(64)
        with torch.no_grad():
            tree = draft.propose(list(REPEATING), max_depth=8)  # 12 tokens fed at once: 16 wide
            draft.accepted(tree, [0, 1], tree.tokens[2])
            draft.propose(list(REPEATING) + tree.tokens[1:3], max_depth=8)  # catches up on the bonus: 8 wide
    # each first step feeds the history's tokens the cache lacks, the next the root's 32 best children (32 wide), and
    # 32 of their children join the tree unfed
    assert sorted(draft._forwards) == [8, 16, 32], sorted(draft._forwards)
    assert len(tree) == 1 + 32 + 32


def test_the_draft_phase_timer_accounts_for_every_step_and_puts_the_draft_back(tiny_dirs, tmp_path, monkeypatch):
    """benchmarks/draft_phases.py, which says where a run's drafting goes: one record a tree, its steps the draft's
    own count, phases that never overlap (their sum within the tree's time), and the draft's methods restored."""
    from tierstore.inference.decoding.drafts import ModelDraft
    from tierstore.inference.decoding.sampling import warp

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from draft_phases import PHASES, draft_phases, phase_summary

    original = ModelDraft.propose
    directory, reference = tiny_dirs("llama")
    with tierstore.AutoModel.from_pretrained(directory, config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        draft = ModelDraft(model, "self", warp(None, None, None), reference.config.vocab_size, width=8,
                           policy=TreePolicy(fixed_steps=3))
        draft.reset(64)
        with torch.no_grad(), draft_phases() as passes:
            tree = draft.propose(list(REPEATING), max_depth=8)
            draft.accepted(tree, [0, 1], tree.tokens[2])
            draft.propose(list(REPEATING) + tree.tokens[1:3], max_depth=8)
    assert ModelDraft.propose is original
    assert len(passes) == 2 and sum(record["steps"] for record in passes) == draft.steps == 6, passes
    assert passes[0].get("catch-up", 0) > 0, passes  # the history's first feed
    for record in passes:
        assert record.get("forward", 0) > 0, passes
        assert sum(record.get(name, 0.0) for name in PHASES) <= record["propose"], record
    assert phase_summary(passes).startswith("2 passes, 6 steps"), phase_summary(passes)


def test_a_draft_steps_children_are_the_draft_models_own_likeliest_tokens_after_each_nodes_path(tiny_dirs,
                                                                                                  tmp_path):
    """A step reads back only each fed node's likeliest children (computed in its forward, from a bias built in
    it too): they are what transformers' model gives after the history and the node's own path, siblings unseen."""
    directory, reference = tiny_dirs("llama")
    check_draft_children(directory, reference, {"runtime": {"cache_dir": str(tmp_path)}})


def check_draft_children(directory: str, reference, config: dict, dtype: torch.dtype | None = None,
                         atol: float = 1e-4) -> bool:
    """Draft a tree with the model at `directory` drafting for itself (the history, then the root's 8 children
    fed; 8 of theirs join) and check every node against `reference` (transformers, on the CPU): its token among
    the 8 likeliest after the history and its path, its probability within `atol`, its rank. Whether the steps
    replayed a CUDA graph."""
    from tierstore.inference.decoding.drafts import ModelDraft
    from tierstore.inference.decoding.sampling import warp

    history = list(REPEATING)
    with tierstore.AutoModel.from_pretrained(directory, config=config, dtype=dtype) as model:
        draft = ModelDraft(model, "self", warp(None, None, None), reference.config.vocab_size, width=8,
                           policy=TreePolicy(fixed_steps=2))
        draft.reset(64)
        with torch.no_grad():
            tree = draft.propose(history, max_depth=8)
    deeper = [node for node in range(1, len(tree)) if tree.depths[node] == 2]
    assert len(tree.children[0]) == 8 and len(deeper) == 8, (len(tree.children[0]), len(deeper))
    for node in list(tree.children[0].values()) + deeper:
        path = [tree.tokens[step] for step in tree.path_to(node)[1:-1]]
        with torch.no_grad():
            logits = reference(torch.tensor([history + path])).logits[0, -1]
        probs = torch.softmax(logits.float(), dim=-1)
        top_i = probs.topk(8).indices.tolist()
        assert tree.tokens[node] in top_i, (node, path)
        assert tree.probs[node] == pytest.approx(probs[tree.tokens[node]].item(), abs=atol)
        assert tree.ranks[node] == top_i.index(tree.tokens[node])
    return draft.graphed


def test_acceptance_is_measured_by_the_drafts_probability_and_a_weak_draft_gets_a_smaller_tree():
    good, weak = TreePolicy(), TreePolicy()
    assert good.acceptance(0.3, 0) == pytest.approx(0.3)  # nothing measured: the draft's own probability
    _learn(good, lambda tokens: 0.5)
    _learn(weak, lambda tokens: 0.5)
    for _ in range(50):  # a copy of the model: its top tokens are accepted even when it was unsure
        good.observe_pass(0.5, 65, [(0.35, 0, True), (0.3, 1, False), (0.05, 2, False)])
        weak.observe_pass(0.5, 65, [(0.9, 0, False), (0.05, 1, False)])  # a sure draft that is wrong
    assert good.acceptance(0.35, 0) > 0.9 and good.acceptance(0.3, 1) < 0.05
    assert weak.acceptance(0.95, 0) < 0.05
    assert _nodes(weak, decay=weak.acceptance(0.9, 0)) < _nodes(good, decay=good.acceptance(0.35, 0)) / 4


def test_a_trees_nodes_are_capped_by_the_activation_room_of_one_verify_pass():
    from transformers import LlamaConfig

    from tierstore.inference.placement.prefill import activation_bytes_per_token, tree_nodes_within

    config = LlamaConfig(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                         vocab_size=152064, num_hidden_layers=28)
    room = 256 * 2**20
    short = tree_nodes_within(config, torch.bfloat16, 1_000, room, 1024)
    long = tree_nodes_within(config, torch.bfloat16, 100_000, room, 1024)
    assert 64 <= long < short < 1024  # a longer context's mask rows leave room for fewer nodes
    kv = 2 * 28 * 4 * 128 * 2  # each node's keys and values in every layer, until the accepted path is kept
    for context, nodes in ((1_000, short), (100_000, long)):
        per_node = activation_bytes_per_token(config, torch.bfloat16, context + nodes) + 152064 * 2 + kv
        assert nodes * per_node <= room < 2 * nodes * per_node
    assert tree_nodes_within(config, torch.bfloat16, 1_000, 2**40, 1024) == 1024  # the configured cap


def test_a_short_calls_unused_kv_reserve_is_room_for_its_tree():
    """The device reserve is sized for a long context; a call with a shorter one leaves the rest to its tree
    (a 72B-wide model's trees were held to 256 nodes by the activation slack alone, with 0.7 GB of it unused)."""
    import types

    from transformers import LlamaConfig

    from tierstore.inference.placement.budgets import ACTIVATION_SLACK_BYTES, kv_bytes_per_token
    from tierstore.inference.placement.kv import KVBudget
    from tierstore.inference.placement.prefill import tree_nodes_within

    config = LlamaConfig(hidden_size=8064, intermediate_size=29568, num_attention_heads=126, num_key_value_heads=42,
                         head_dim=64, vocab_size=49152, num_hidden_layers=80)
    budget = KVBudget(None, "auto", True, config, torch.bfloat16, scratch_bytes=500 * 2**20)
    reserve = budget.reserve_bytes(1024)  # a plan made for 1,024 tokens of context
    plan = types.SimpleNamespace(device_reserve_bytes=reserve)
    per_token = kv_bytes_per_token(config, torch.bfloat16)
    assert budget.spare_reserve_bytes(plan, 300) == (1024 - 300) * per_token
    assert budget.spare_reserve_bytes(plan, 4096) == 0
    slack_only = tree_nodes_within(config, torch.bfloat16, 300, ACTIVATION_SLACK_BYTES, 1024)
    with_spare = tree_nodes_within(config, torch.bfloat16, 300,
                                   ACTIVATION_SLACK_BYTES + budget.spare_reserve_bytes(plan, 300), 1024)
    assert slack_only < with_spare


def test_each_streamed_verify_pass_first_makes_room_in_the_budget_for_its_tree(tiny_dirs, tmp_path, monkeypatch):
    """Before each verify pass of a streamed model, the device's cached blocks are given back when they and what
    the pass takes (`tree_bytes` of its context and nodes) would pass the device budget; the report counts it."""
    from tierstore.inference.decoding import model as model_module

    directory, reference = tiny_dirs("llama")
    asked, trees = [], []
    real_tree_bytes = model_module.tree_bytes

    def tree_bytes(config, dtype, context_tokens, nodes):
        trees.append((context_tokens, nodes, real_tree_bytes(config, dtype, context_tokens, nodes)))
        return trees[-1][2]

    def give_back_cache(device, budget_bytes, wanted_bytes):
        asked.append((budget_bytes, wanted_bytes))
        return len(asked) % 2 == 1  # gave cached blocks back before every other pass

    monkeypatch.setattr(model_module, "tree_bytes", tree_bytes)
    monkeypatch.setattr(model_module, "give_back_cache", give_back_cache)
    config = {"runtime": {"cache_dir": str(tmp_path)}, "speculation": {"depth": 4}}
    ids = torch.tensor([REPEATING])
    want = reference.generate(ids, max_new_tokens=16, do_sample=False)
    with tierstore.AutoModel.from_pretrained(directory, budget=_budget_for(reference), config=config,
                                             draft="ngram") as model:
        assert model.plan.regime == "disk"
        assert model.generate(ids, max_new_tokens=16, do_sample=False).tolist() == want.tolist()
        report = model.report()
        budget_bytes = model.plan.device_budget_bytes
    spec = report.speculation
    assert len(asked) == len(trees) == spec["passes"] >= 2
    assert [wanted for _, wanted in asked] == [nbytes for _, _, nbytes in trees]
    assert {budget for budget, _ in asked} == {budget_bytes}
    assert trees[0][0] == len(REPEATING)  # the first pass's context: the prompt (its root token is the tree's)
    assert all(a[0] < b[0] for a, b in zip(trees, trees[1:]))  # each later pass sees the tokens kept since
    assert sum(nodes for _, nodes, _ in trees) == spec["tree_nodes"] + spec["passes"]  # every tree with its root
    emptied = (spec["passes"] + 1) // 2
    assert f"given back before {emptied} of {spec['passes']} verify passes" in " ".join(report.notes)


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float32, torch.float16, torch.float32)])
def test_the_cache_cut_to_the_accepted_path_keeps_its_entries_in_order(dtypes):
    """keep_positions: every layer keeps its first entries and the accepted path's, in order, in new tensors of its
    own (none a view of the uncut cache, whose memory is then let go)."""
    from transformers import DynamicCache

    from tierstore.inference.decoding.tree import keep_positions

    generator = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    originals = []
    for layer, (dtype, heads) in enumerate(zip(dtypes, (2, 3, 2))):
        keys, values = (torch.randn(1, heads, 12, 4, generator=generator).to(dtype) for _ in range(2))
        cache.update(keys, values, layer)
        originals.append((keys, values))
    uncut = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]  # alive: no address reused
    old = {tensor.untyped_storage().data_ptr() for tensor in uncut}
    keep_positions(cache, 5, [7, 9, 10])
    order = [0, 1, 2, 3, 4, 7, 9, 10]
    for layer, (keys, values) in zip(cache.layers, originals):
        assert torch.equal(layer.keys, keys[..., order, :]) and torch.equal(layer.values, values[..., order, :])
    kept = {tensor.untyped_storage().data_ptr() for layer in cache.layers for tensor in (layer.keys, layer.values)}
    assert len(kept) == 6 and not kept & old
    assert cache.get_seq_length() == 8


def test_a_fixed_step_count_is_drafted_whatever_the_costs():
    policy = TreePolicy(fixed_steps=3)
    _learn(policy, lambda tokens: 0.05 + 0.004 * tokens)
    assert _nodes(policy) == 3 * 8


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["ngram", "self", "int8"])
def test_smollm2_greedy_with_drafts_equals_transformers(draft, smollm2_store, smollm2_reference, tmp_path_factory):
    """Real weights, a streaming budget (host smaller than the model): drafts ngram, SmolLM2 itself, its int8 store."""
    from tierstore.inference.compose import compress_model

    store_dir, _ = smollm2_store
    reference, tokenizer = smollm2_reference
    cache = str(tmp_path_factory.mktemp("cache"))
    spec = {"ngram": "ngram", "self": store_dir}.get(draft)
    if draft == "int8":
        spec = str(tmp_path_factory.mktemp("int8") / "store")
        compress_model(store_dir, spec, "int8", config={"runtime": {"cache_dir": cache}}, progress=False)
    draft_bytes = {"ngram": 0, "self": 540_000_000, "int8": 240_000_000}[draft]  # about what each draft takes
    budget = tierstore.Budget(vram=BUDGETS["host smaller than the model"].vram + draft_bytes, ram="250MB")
    with tierstore.AutoModel.from_pretrained(store_dir, budget=budget, config={"runtime": {"cache_dir": cache}},
                                             draft=spec) as model:
        assert model.plan.regime != "device"  # layers stream
        for prompt in SMOLLM2_PROMPTS[:2]:
            ids = _ids(tokenizer, prompt)
            want = reference.generate(ids, max_new_tokens=24, do_sample=False)
            assert model.generate(ids, max_new_tokens=24, do_sample=False).tolist() == want.tolist(), prompt
        report = model.report().to_dict()
    assert report["speculation"]["tokens_per_pass"] > (1.0 if draft == "ngram" else 1.5)
    for tier in ("device", "host"):
        assert report["tiers"][tier]["peak_bytes"] <= report["tiers"][tier]["budget_bytes"]


@pytest.mark.parametrize("packed", [None, "q8_0", "nf4"])
def test_a_compiled_draft_gives_plain_greedy_tokens_and_its_unpacked_bytes_are_charged(
        packed, tiny_dirs, tmp_path_factory, tmp_path):
    """speculation.compile: the draft's weights bound once (a compressed draft's unpacked), its steps run through
    torch.compile (on a CPU, each step after the first); the target's tokens stay its own."""
    from tierstore.inference.compose import compress_model, make_plan_for

    directory, reference = tiny_dirs("llama")
    draft = _draft_dir(tmp_path_factory, "llama", seed=1)
    config = {"runtime": {"cache_dir": str(tmp_path)}, "speculation": {"width": 3}}
    if packed:
        store = str(tmp_path / f"draft-{packed}")
        compress_model(draft, store, packed, config=config, progress=False)
        draft = store
    draft_bytes = sum(p.numel() for p in reference.parameters()) * 4
    streaming = _budget_for(reference)
    budget = tierstore.Budget(vram=streaming.vram + 3 * draft_bytes, ram=streaming.ram)
    compiled = {**config, "speculation": {"width": 3, "compile": True}}
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=compiled, draft=draft) as model:
        for prompt in (REPEATING, *PROMPTS[:2]):
            ids = torch.tensor([prompt])
            want = reference.generate(ids, max_new_tokens=16, do_sample=False)
            assert model.generate(ids, max_new_tokens=16, do_sample=False).tolist() == want.tolist(), prompt
        spec = model.report().speculation
        assert spec["draft_compiled"] is True and spec["draft_steps"] > 0
        opened = model.plan
        drafter = model.draft
        assert all(param.device.type != "meta" for param in drafter.model.parameters())  # bound, no hooks
        assert not any(module._forward_pre_hooks for module in drafter.model.modules())
    assert all(param.device.type == "meta" for param in drafter.model.parameters())  # put back at close
    plain = make_plan_for(directory, budget, config, draft=draft)
    bound = make_plan_for(directory, budget, compiled, draft=draft)
    extra = bound.device_reserve_bytes - plain.device_reserve_bytes
    matrices = sum(p.numel() for name, p in reference.named_parameters()
                   if p.dim() == 2 and name.startswith("model.layers."))
    assert extra == (matrices * 4 if packed else 0)  # float32 on a CPU
    assert opened.device_reserve_bytes == bound.device_reserve_bytes  # the plan run is the plan shown


def test_a_compiled_draft_compiles_once_for_calls_of_any_length(tiny_dirs, tmp_path_factory, tmp_path):
    """Each generate call sizes the draft's cache by its own length; the entry count is compiled as a dynamic
    dimension, so a longer call (a cache of another size) reuses the first compile instead of compiling again."""
    from torch._dynamo.utils import counters

    directory, reference = tiny_dirs("llama")
    draft = _draft_dir(tmp_path_factory, "llama", seed=1)
    config = {"runtime": {"cache_dir": str(tmp_path)}, "speculation": {"width": 3, "compile": True, "nodes": 16}}
    streaming = _budget_for(reference)
    budget = tierstore.Budget(vram=streaming.vram + 3 * sum(p.numel() for p in reference.parameters()) * 4,
                              ram=streaming.ram)
    ids = torch.tensor([PROMPTS[0]])
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, draft=draft) as model:
        model.generate(ids, max_new_tokens=8, do_sample=False)
        compiled = counters["stats"]["unique_graphs"]
        for new in (40, 120):  # caches of other sizes
            want = reference.generate(ids, max_new_tokens=new, do_sample=False)
            assert model.generate(ids, max_new_tokens=new, do_sample=False).tolist() == want.tolist(), new
        assert model.report().speculation["draft_compiled"] is True
    assert compiled > 0 and counters["stats"]["unique_graphs"] == compiled


def test_a_draft_torch_compile_cannot_take_runs_uncompiled_with_a_note(tiny_dirs, tmp_path, monkeypatch):
    """A compiled forward that raises (a model torch.compile cannot trace) is dropped once, with a note; the steps
    run as before and the tokens stay the model's."""
    directory, reference = tiny_dirs("llama")
    draft_bytes = sum(p.numel() for p in reference.parameters()) * 4
    streaming = _budget_for(reference)
    budget = tierstore.Budget(vram=streaming.vram + 2 * draft_bytes, ram=streaming.ram)
    config = {"runtime": {"cache_dir": str(tmp_path)}, "speculation": {"width": 3, "compile": True}}
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, draft=directory) as model:
        def failing(*args, **kwargs):
            raise RuntimeError("cannot trace this\nsecond line")
        monkeypatch.setattr(model.draft, "compiled", failing)
        ids = torch.tensor([REPEATING])
        want = reference.generate(ids, max_new_tokens=12, do_sample=False)
        assert model.generate(ids, max_new_tokens=12, do_sample=False).tolist() == want.tolist()
        report = model.report()
        assert report.speculation["draft_compiled"] is False and report.speculation["draft_steps"] > 1
        assert any("draft steps not compiled: torch.compile failed (RuntimeError: cannot trace this)" in note
                   for note in report.notes)


def test_plan_charges_the_draft_to_the_device_budget(tiny_dirs, tmp_path, capsys):
    directory, reference = tiny_dirs("llama")
    draft_bytes = sum(p.numel() for p in reference.parameters()) * 4
    budget = _budget_for(reference)
    config = {"runtime": {"cache_dir": str(tmp_path)}}
    from tierstore.inference.compose import make_plan_for

    alone = make_plan_for(directory, tierstore.Budget(vram=budget.vram + draft_bytes, ram=budget.ram), config)
    beside = make_plan_for(directory, tierstore.Budget(vram=budget.vram + draft_bytes, ram=budget.ram), config,
                           draft=directory)
    assert beside.device_reserve_bytes == alone.device_reserve_bytes + draft_bytes
    assert len(beside.device_resident) < len(alone.device_resident)
    assert any(note.startswith(f"draft {directory}") for note in beside.notes)
    assert main(["plan", directory, "--vram", str(budget.vram + draft_bytes), "--ram", str(budget.ram),
                 "--draft", directory]) == 0
    assert "draft" in capsys.readouterr().out


def test_a_draft_runs_in_its_own_dtype_charged_at_its_bytes_and_the_models_tokens_stay(tiny_dirs, tmp_path_factory,
                                                                                       tmp_path):
    """speculation.draft_dtype: the draft opens in that dtype (the model in its own), the plan charges its bytes
    in it, greedy tokens stay the model's; a dtype not offered is refused in one line naming the key."""
    from tierstore.config import Config
    from tierstore.errors import ConfigError
    from tierstore.inference.compose import make_plan_for

    directory, reference = tiny_dirs("llama")
    draft = _draft_dir(tmp_path_factory, "llama", seed=1)
    draft_bytes = sum(p.numel() for p in reference.parameters()) * 4  # float32, the checkpoint's
    streaming = _budget_for(reference)
    budget = tierstore.Budget(vram=streaming.vram + draft_bytes, ram=streaming.ram)
    config = {"runtime": {"cache_dir": str(tmp_path)}, "speculation": {"width": 3}}
    halved = {**config, "speculation": {"width": 3, "draft_dtype": "bfloat16"}}
    same = make_plan_for(directory, budget, config, draft=draft)
    half = make_plan_for(directory, budget, halved, draft=draft)
    [same_part], [half_part] = ([size for name, size in plan.reserve_parts if name.startswith("draft")]
                                for plan in (same, half))
    assert same_part >= draft_bytes and draft_bytes // 2 <= half_part < 0.51 * same_part  # its units' padding aside
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=halved, draft=draft) as model:
        assert model.draft.model.dtype == torch.bfloat16 and model.model.dtype == torch.float32
        assert model.plan.device_reserve_bytes == half.device_reserve_bytes  # the plan run is the plan shown
        for prompt in (REPEATING, *PROMPTS[:2]):
            ids = torch.tensor([prompt])
            want = reference.generate(ids, max_new_tokens=16, do_sample=False)
            assert model.generate(ids, max_new_tokens=16, do_sample=False).tolist() == want.tolist(), prompt
        assert model.report().speculation["draft_steps"] > 0
    with pytest.raises(ConfigError, match="speculation.draft_dtype") as refused:
        Config.load({"speculation": {"draft_dtype": "int8"}})
    assert "\n" not in str(refused.value)


def test_a_tfloat32_draft_is_float32_with_tf32_products_only_while_it_steps(tiny_dirs, tmp_path_factory, tmp_path):
    """speculation.draft_dtype = "tfloat32": the draft opens in float32 and is charged as a float32 one; while its
    forwards run (and only then) CUDA float32 products are set to TF32, as they were afterwards; greedy tokens stay
    transformers' (on a CPU the setting changes no product)."""
    from tierstore.inference.compose import make_plan_for

    directory, reference = tiny_dirs("llama")
    draft = _draft_dir(tmp_path_factory, "llama", seed=1)
    streaming = _budget_for(reference)
    budget = tierstore.Budget(vram=streaming.vram + sum(p.numel() for p in reference.parameters()) * 4,
                              ram=streaming.ram)
    plain = {"runtime": {"cache_dir": str(tmp_path)}, "speculation": {"width": 3, "draft_dtype": "float32"}}
    config = {**plain, "speculation": {"width": 3, "draft_dtype": "tfloat32"}}
    assert make_plan_for(directory, budget, config, draft=draft).reserve_parts == \
        make_plan_for(directory, budget, plain, draft=draft).reserve_parts
    matmul, seen = torch.backends.cuda.matmul, []
    before = matmul.fp32_precision
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, draft=draft) as model:
        assert model.draft.model.dtype == torch.float32
        hook = model.draft.model.register_forward_pre_hook(lambda *_: seen.append(matmul.fp32_precision))
        ids = torch.tensor([REPEATING])
        want = reference.generate(ids, max_new_tokens=16, do_sample=False)
        assert model.generate(ids, max_new_tokens=16, do_sample=False).tolist() == want.tolist()
        hook.remove()
        assert model.report().speculation["draft_steps"] > 0
    assert seen and set(seen) == {"tf32"} and matmul.fp32_precision == before == "none"


@pytest.mark.parametrize("dtype, device, attention, chosen", [
    (torch.float32, "cuda", "auto", "eager"), (torch.bfloat16, "cuda", "auto", "auto"),
    (torch.float32, "cpu", "auto", "auto"), (torch.float32, "cuda", "sdpa", "sdpa")])
def test_a_float32_draft_on_a_gpu_attends_eagerly_unless_attention_is_named(dtype, device, attention, chosen):
    """SDPA has no flash kernel for float32: a float32 draft on a GPU opens with eager attention (runtime.attention
    auto); a 16-bit draft, a CPU draft and a named kernel keep theirs."""
    from tierstore.config import Config
    from tierstore.inference.compose import _draft_config

    cfg = Config.load({"runtime": {"attention": attention}})
    assert _draft_config(cfg, torch.device(device), dtype).runtime.attention == chosen


def _listing(path):
    return sorted(os.path.relpath(os.path.join(root, name), path) for root, dirs, files in os.walk(path)
                  for name in dirs + files)


@pytest.mark.parametrize("case", ["missing", "vocabulary", "too large"])
def test_bad_drafts_are_one_line_and_write_nothing(case, tiny_dirs, tmp_path_factory, tmp_path, capsys):
    directory, reference = tiny_dirs("llama")
    config_file = tmp_path / "c.toml"
    config_file.write_text(f'[runtime]\ncache_dir = "{tmp_path / "cache"}"\n')
    draft = str(tmp_path_factory.mktemp("draft") / "model") if case != "too large" else directory
    if case == "vocabulary":
        other = tiny_model("llama", seed=2)
        other.resize_token_embeddings(300)
        other.save_pretrained(draft)
    argv = ["generate", directory, "--prompt", "x", "--draft", draft, "--config", str(config_file)]
    if case == "too large":
        argv += ["--vram", str(_budget_for(reference).vram), "--ram", "1GB"]
    before = _listing(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert {"missing": "no such file", "vocabulary": "vocabulary of 300", "too large": "bytes"}[case] in err, err
    assert _listing(tmp_path) == before


def test_a_batch_with_a_draft_is_refused_and_the_report_says_what_speculation_did(tiny_dirs, tmp_path):
    directory, _ = tiny_dirs("llama")
    with tierstore.AutoModel.from_pretrained(directory, config={"runtime": {"cache_dir": str(tmp_path)}},
                                             draft="ngram") as model:
        with pytest.raises(tierstore.InputError, match="one sequence"):
            model.generate(torch.tensor([REPEATING, REPEATING]), max_new_tokens=4)
        with pytest.raises(tierstore.InputError, match="num_beams"):
            model.generate(torch.tensor([REPEATING]), max_new_tokens=4, num_beams=2)
        model.generate(torch.tensor([REPEATING]), max_new_tokens=12, do_sample=False)
        data = json.loads(json.dumps(model.report().to_dict()))
    assert {"tokens_per_pass", "acceptance_rate", "draft_s", "passes"} <= set(data["speculation"])
    assert data["timing"]["new_tokens"] == 12 and data["speculation"]["passes"] < 11  # the n-grams were found
    assert "speculation (draft: ngram)" in str(model.report()) and "% at depth 1-4" in str(model.report())


def test_acceptance_by_depth_counts_a_trial_wherever_the_accepted_path_had_candidates():
    """Sequoia's acceptance vector: at depth d, the passes whose accepted path reached a node with drafted children
    there, and the share of them that accepted one; a path that ends at a leaf counts no trial below it."""
    from tierstore.inference.decoding.speculation import SpeculationStats
    from tierstore.inference.decoding.tree import DraftTree

    tree = DraftTree.rooted_at(1)
    a = tree.add(0, 2, 0.9)
    tree.add(0, 3, 0.5)
    c = tree.add(a, 4, 0.8)
    tree.add(c, 5, 0.7)
    stats = SpeculationStats("test")
    stats.count_path(tree, [0, a, c])  # depths 1 and 2 accepted, depth 3 tried and rejected
    stats.count_path(tree, [0])  # depth 1 rejected
    stats.count_path(tree, [0, a])  # depth 1 accepted, depth 2 rejected
    leaf = DraftTree.rooted_at(1)
    stats.count_path(leaf, [0])  # nothing drafted: no trial
    assert stats.depth_trials == [3, 2, 1] and stats.depth_accepted == [2, 1, 0]
    assert (stats.trials, stats.accepted) == (6, 3)  # the overall rate counts the same trials
    assert stats.to_dict()["acceptance_by_depth"] == [2 / 3, 0.5, 0.0]
    assert SpeculationStats("none").to_dict()["acceptance_by_depth"] == []


def test_a_sequence_longer_than_a_sliding_window_is_refused(tmp_path_factory, tmp_path):
    """The tree mask is full causal attention: past a sliding window it would differ from the model's own."""
    model = tiny_model("mistral")
    model.config.sliding_window = 16
    directory = str(tmp_path_factory.mktemp("mistral-window"))
    model.save_pretrained(directory)
    with tierstore.AutoModel.from_pretrained(directory, config={"runtime": {"cache_dir": str(tmp_path)}},
                                             draft="ngram") as streamed:
        ids = torch.tensor([REPEATING])
        want = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert streamed.generate(ids, max_new_tokens=4, do_sample=False).tolist() == want.tolist()
        with pytest.raises(tierstore.InputError, match="sliding window of 16"):
            streamed.generate(ids, max_new_tokens=5, do_sample=False)
