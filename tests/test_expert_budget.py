"""A verify pass's expert budget: the drafted tree pruned to the missed experts a pass may move per MoE layer."""
from __future__ import annotations

import pytest
import torch

import tierstore
from tierstore.inference.runtime.expert_budget import ExpertBudget, PassRate, Worth
from test_moe import _config, _reference, _streaming_budget
from test_architectures import tiny

PROMPT = [5, 9, 33, 7, 81, 5, 9, 33, 7, 81, 5, 9]  # repeats: the n-gram draft finds continuations
NEW_TOKENS = 24


def test_the_best_nodes_stay_until_their_missed_experts_fill_the_budget():
    """A chain scored high and two side branches: at a layer where every expert is missed, the root and the
    chain's first nodes fit a budget of 4; the rest and every descendant of a dropped node go, for the rest of
    the pass; experts already chosen or not missed cost nothing."""
    #        0 -> 1 -> 2 -> 3       (chain, scores .9 .8 .7)
    #        0 -> 4 -> 5            (side, .2 .1)
    budget = ExpertBudget(parents=[-1, 0, 1, 2, 0, 4], scores=[1.0, 0.9, 0.8, 0.7, 0.2, 0.1], max_missed=4)
    rows = [[0, 1], [1, 2], [2, 0], [4, 5], [0, 6], [7, 7]]
    live = budget.prune(rows, missed=lambda expert: True)
    # 0,1 (root) then 2 (node 1), nothing new (node 2); node 3 would bring two more, node 4 brings 6 (the fourth)
    assert live == [True, True, True, False, True, False]
    assert budget.missed_per_layer == [4] and budget.kept == 3
    live = budget.prune(rows, missed=lambda expert: expert not in (4, 5, 6))  # next layer: 3 and 5 would fit now
    assert live == [True, True, True, False, True, False]  # but a node dropped once stays dropped
    assert budget.missed_per_layer == [4, 3]
    # a child scored above its parent, parent dropped: the child goes too
    odd = ExpertBudget(parents=[-1, 0, 1], scores=[1.0, 0.1, 0.9], max_missed=2)
    assert odd.prune([[0, 1], [2, 3], [0, 1]], missed=lambda expert: True) == [True, False, False]


def test_pruning_by_worth_keeps_the_path_and_drops_side_nodes_not_worth_their_experts():
    """Priced at 10 tokens/s and 10 ms an expert a layer (0.1 token an expert a layer): a chain whose subtree
    yields over a token keeps every node; a side leaf (0.05) bringing an expert of its own goes, one routed only
    to experts already chosen stays (it costs nothing), and the same leaf on the last layer (one layer of cost
    left, not ten) is worth less still than its expert, while a leaf of 0.3 is worth it there but not over ten."""
    #        0 -> 1 -> 2 -> 3       (chain .9 .8 .7: node 1's subtree yields 2.4)
    #        0 -> 4                 (side .05, new expert 9)
    #        0 -> 5                 (side .05, experts already chosen)
    #        0 -> 6                 (side .3, new expert 8)
    parents, scores = [-1, 0, 1, 2, 0, 0, 0], [1.0, 0.9, 0.8, 0.7, 0.05, 0.05, 0.3]
    rows = [[0, 1], [1, 2], [2, 3], [3, 4], [9, 0], [0, 1], [8, 1]]
    worth = Worth(expert_s=0.01, tokens_per_s=10.0)
    assert worth.tokens(experts=2, layers=10) == pytest.approx(2.0)
    budget = ExpertBudget(parents, scores, None, worth)
    # chain nodes add one expert each: 0.1 x 10 layers = 1 token against subtree yields 2.4, 1.5, 0.7 (node 3
    # yields 0.7 < 1: it goes); the side leaf of 0.3 too
    assert budget.prune(rows, missed=lambda expert: True, layers_left=10) == [True, True, True, False, False, True,
                                                                             False]
    last = ExpertBudget(parents, scores, None, worth)
    assert last.prune(rows, missed=lambda expert: True, layers_left=1) == [True, True, True, True, False, True, True]
    assert last.missed_per_layer == [6]  # 0..4 along the chain, and 8
    capped = ExpertBudget(parents, scores, 3, worth)  # a cap and worth together: both hold
    assert capped.prune(rows, missed=lambda expert: True, layers_left=1) == [True, True, False, False, False, True,
                                                                            False]


def test_the_pass_rate_is_tokens_over_seconds_with_the_past_fading():
    rate = PassRate()
    assert rate.tokens_per_s is None
    rate.observe(10, 1.0)
    assert rate.tokens_per_s == pytest.approx(10.0)
    rate.observe(40, 1.0)  # (0.7 * 10 + 40) / (0.7 * 1 + 1)
    assert rate.tokens_per_s == pytest.approx(47 / 1.7)


@pytest.fixture
def moe(tmp_path):
    """A tiny Mixtral of 16 experts (top 2), saved, and its greedy tokens after PROMPT."""
    model, why = tiny("mixtral", num_local_experts=16)
    assert model is not None, why
    directory = str(tmp_path / "mixtral16")
    model.save_pretrained(directory)
    return directory, _reference(model, NEW_TOKENS, torch.tensor([PROMPT]))


def _moved_per_layer_call(model) -> list[int]:
    """Spy on the experts' store: for each budgeted layer call (a verify pass), the experts it moved (those not
    in a device slot when asked for)."""
    runner = model.experts
    moved: list[int] = []
    original = runner.store.prefetch

    def counting(keys):
        if runner.budget is not None:
            moved.append(sum(1 for key in keys if not runner.store.on_device(key)))
        return original(keys)

    runner.store.prefetch = counting
    return moved


@pytest.mark.parametrize("draft", ["ngram", "self"])
def test_a_verify_pass_moves_at_most_its_expert_budget_and_keeps_the_plain_tokens(moe, tmp_path, draft):
    """Streamed experts copied into slots as missed, a draft that proposes deep trees (the model itself: every
    token accepted; n-grams over a repeating prompt): with a budget of 3 missed experts per MoE layer every
    verify pass's layer calls move at most 3 (counted at the store), nodes are pruned, and the tokens are
    transformers' greedy ones; with a budget larger than any pass needs (1000) the same passes move more; with
    none (the default) nothing is pruned or counted."""
    directory, want = moe
    moved_most = {}
    for max_missed in (3, 1000, "none"):
        config = {**_config(str(tmp_path)), "speculation": {"expert_budget": max_missed, "depth": 6, "width": 4}}
        budget = _streaming_budget(directory, config)
        if draft == "self":
            budget = tierstore.Budget(vram=budget.vram + 40_000_000, ram=budget.ram)
        with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config,
                                                 draft=directory if draft == "self" else "ngram") as model:
            moved = _moved_per_layer_call(model)
            got = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=0).tolist()
            spec = model.report().speculation
        assert got == want, max_missed
        if max_missed == "none":
            assert spec["expert_budget"] is None and spec["pruned_nodes"] == 0 and not moved
            continue
        assert moved, "no verify pass went through the experts' store"
        moved_most[max_missed] = max(moved)
        assert spec["expert_budget"] == max_missed and spec["most_missed_experts"] == max(moved)
        if max_missed == 3:
            assert max(moved) <= 3 and spec["pruned_nodes"] > 0, spec
        else:
            assert spec["pruned_nodes"] == 0
    assert moved_most[1000] > moved_most[3]


def test_trees_are_capped_at_twice_the_nodes_the_expert_budget_kept():
    """Past what an expert budget keeps, drafted nodes yield nothing: once passes report what they kept, a tree
    holds at most twice its running mean (and at least 8)."""
    from tierstore.policies.speculation import TreePolicy

    policy = TreePolicy(max_nodes=1024, fixed_steps=3)
    assert policy.take(0, 0, 0.0, [0.9] * 64, 0.0) == 64
    policy.observe_kept(10)
    assert policy.take(0, 0, 0.0, [0.9] * 64, 0.0) == 20
    assert policy.take(1, 18, 5.0, [0.9] * 64, 0.0) == 2
    policy.observe_kept(1)
    assert policy.node_cap() == max(int(2 * (0.7 * 10 + 0.3 * 1)), 8)


@pytest.mark.parametrize("draft", ["ngram", "self"])
def test_pruning_by_worth_keeps_the_plain_tokens_and_prunes_only_when_experts_cost(moe, tmp_path, draft):
    """expert_budget = auto: the tokens are transformers' greedy ones whatever the price of an expert; priced
    high (a second an expert), the passes after the first (which measures the run's rate) prune drafted nodes;
    priced at nothing, none. The next layer's experts are predicted for the kept nodes meanwhile, and the trees are
    not capped by what passes kept (no cap of missed experts)."""
    directory, want = moe
    pruned = {}
    for expert_s in (1.0, 1e-12):
        config = {**_config(str(tmp_path)), "speculation": {"expert_budget": "auto", "depth": 6, "width": 4},
                  "experts": {"prefetch": "router"}}
        budget = _streaming_budget(directory, config)
        if draft == "self":
            budget = tierstore.Budget(vram=budget.vram + 40_000_000, ram=budget.ram)
        with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config,
                                                 draft=directory if draft == "self" else "ngram") as model:
            runner = model.experts
            runner.missed_expert_s = lambda expert_s=expert_s: expert_s
            routing, guessed_in_passes = runner._routing, []

            def spying(hidden, top_k_index, following):
                if runner.budget is not None:
                    guessed_in_passes.append(following is not None)
                return routing(hidden, top_k_index, following)

            runner._routing = spying
            got = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=0).tolist()
            spec = model.report().speculation
            kept_cap = model._tree_policy.kept
        assert got == want, expert_s
        assert spec["expert_budget"] == "auto" and spec["passes"] > 1
        assert kept_cap is None  # pruning by worth leaves the trees' size to the tree policy
        pruned[expert_s] = spec["pruned_nodes"]
        assert any(guessed_in_passes)  # no cap: pruned passes still predict the next layer's experts
    assert pruned[1.0] > 0 and pruned[1e-12] == 0, pruned
