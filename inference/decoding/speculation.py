"""Speculative decoding: one weight pass of the streamed model verifies a whole tree of drafted tokens.

Per pass: the draft proposes a tree rooted at the last accepted token; the model computes every node at once
(tree attention mask, positions by depth); then, from the root, the model's own next token at each node is
chosen exactly as plain decoding would choose it (argmax, or a sample of its warped distribution) and the walk
follows the child holding that token. The first token no child holds is the pass's bonus token. Every emitted
token is therefore the model's own choice given the tokens before it: greedy output equals plain greedy decoding,
and sampled output has the model's distribution (the multi-candidate rejection rule with deterministic drafts: a
candidate is accepted with the model's probability of it, and a rejection samples from the rest). The KV cache
keeps only the accepted path. A model draft may keep growing its tree while the pass runs (`speculation.ahead`):
what it grows depends only on the tokens so far, never on the model's picks, so both rules hold.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from ...errors import InputError
from ...trace import DRAFT, TOKENS, Tracer
from .sampling import Choose
from .tree import DraftTree


@dataclasses.dataclass
class SpeculationStats:
    """Counters of speculative generate calls: passes, drafted and accepted tokens, time split."""

    draft: str
    passes: int = 0
    new_tokens: int = 0
    accepted: int = 0  # drafted tokens the model accepted
    trials: int = 0  # verified positions that had drafted candidates
    tree_nodes: int = 0  # drafted nodes sent to verify passes (those an expert budget pruned included)
    largest_tree: int = 0  # the most drafted nodes one pass verified
    draft_s: float = 0.0
    verify_s: float = 0.0
    draft_steps: int = 0
    ahead_steps: int = 0  # a model draft's steps grown while the model verified (off the passes' critical path)
    carried_trees: int = 0  # passes whose tree started from a subtree grown ahead (the last pass's bonus token in it)
    graphed: bool | None = None  # a model draft's steps replayed a CUDA graph
    draft_compiled: bool | None = None  # a model draft's steps ran compiled (None: not asked for)
    verify_graphed: bool | None = None  # the verify passes replayed CUDA graphs (None: not tried)
    expert_budget: int | str | None = None  # missed experts a verify pass may move per MoE layer, or auto (pruned
    # by worth); None: no budget
    pruned_nodes: int = 0  # drafted nodes the expert budget dropped before they were verified
    most_missed_experts: int = 0  # the most missed experts one MoE layer call of a verify pass moved
    depth_trials: list[int] = dataclasses.field(default_factory=list)  # [d]: passes with candidates at depth d + 1
    depth_accepted: list[int] = dataclasses.field(default_factory=list)  # [d]: of those, passes accepting one

    def count_path(self, tree: DraftTree, path: list[int]) -> None:
        """One pass's accepted `path` through `tree`: a trial at each depth where the path's last node had drafted
        children, an acceptance where the path went on (overall and by depth)."""
        for depth, node in enumerate(path):
            if not tree.children[node]:
                break
            if depth == len(self.depth_trials):
                self.depth_trials.append(0)
                self.depth_accepted.append(0)
            went_on = depth + 1 < len(path)
            self.trials += 1
            self.accepted += went_on
            self.depth_trials[depth] += 1
            self.depth_accepted[depth] += went_on

    def to_dict(self) -> dict[str, Any]:
        """Counters and the rates derived from them: `acceptance_by_depth[d]`, the share of passes that reached
        depth d with candidates there and accepted one (Sequoia's acceptance vector)."""
        data = dataclasses.asdict(self)
        data["tokens_per_pass"] = self.new_tokens / self.passes if self.passes else None
        data["acceptance_rate"] = self.accepted / self.trials if self.trials else None
        data["acceptance_by_depth"] = [accepted / trials for accepted, trials
                                       in zip(self.depth_accepted, self.depth_trials)]
        data["draft_step_s"] = self.draft_s / self.draft_steps if self.draft_steps else None
        data["verify_pass_s"] = self.verify_s / self.passes if self.passes else None
        return data


def speculate(verifier: Any, draft: Any, input_ids: torch.Tensor, max_new_tokens: int, choose: Choose,
              eos_ids: set[int], stats: SpeculationStats, streamer: Any = None,
              on_first_token: Callable[[], None] | None = None, tracer: Tracer | None = None) -> torch.Tensor:
    """Generate up to `max_new_tokens` after `input_ids` (1, n), `verifier` (verifier.py: the model's side)
    checking `draft`'s trees; returns (1, n + new) like `generate`."""
    device = input_ids.device
    logits = verifier.start(input_ids, input_ids.shape[1] + max_new_tokens + 1)
    root = int(choose(logits[-1:])[0])
    if on_first_token is not None:
        on_first_token()
    history = input_ids[0].tolist() + [root]
    emitted = [root]
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(torch.tensor([root]))
    draft.reset(input_ids.shape[1] + max_new_tokens + 1, frozenset(eos_ids))
    grow = draft.grow_while if getattr(draft, "ahead", False) else None  # a model draft growing its tree meanwhile
    while len(emitted) < max_new_tokens and root not in eos_ids:
        start_s = time.perf_counter()
        tree = draft.propose(history, max_depth=max_new_tokens - len(emitted) - 1)
        verify_start_s, captured_s = time.perf_counter(), verifier.capture_s()
        path, bonus = verifier.verify(tree, choose, meanwhile=grow)
        verify_s = time.perf_counter() - verify_start_s
        recording_s = verifier.capture_s() - captured_s  # a graph recorded this pass: not what the next costs
        new = [tree.tokens[node] for node in path[1:]] + [bonus]
        if tracer is not None:
            tracer.span(DRAFT, "draft", start_s, verify_start_s, nodes=len(tree) - 1)
            tracer.instant(TOKENS, "tokens", tracer.stamp(), accepted=len(path) - 1, new=len(new))
        stats.passes += 1
        stats.count_path(tree, path)
        stats.tree_nodes += len(tree) - 1
        stats.largest_tree = max(stats.largest_tree, len(tree) - 1)
        stats.draft_s += verify_start_s - start_s
        stats.verify_s += verify_s
        if draft.policy is not None:
            draft.policy.observe_pass(verify_s - recording_s, len(tree), _tried(tree, path))
            if verifier.last_kept is not None:
                draft.policy.observe_kept(verifier.last_kept)
        stats.draft_steps = draft.steps
        draft.accepted(tree, path, bonus)
        for index, token in enumerate(new):  # stop at the end of sequence, as generate does
            if token in eos_ids:
                new = new[:index + 1]
                break
        new = new[:max_new_tokens - len(emitted)]
        emitted += new
        history += new
        root = new[-1]
        if streamer is not None:
            streamer.put(torch.tensor(new))
    if streamer is not None:
        streamer.end()
    stats.new_tokens += len(emitted)
    _count_call(stats, draft, verifier)
    return torch.tensor([history], device=device)


def _count_call(stats: SpeculationStats, draft: Any, verifier: Any) -> None:
    """What the draft and the verifier counted over a generate call, into `stats`."""
    stats.ahead_steps += getattr(draft, "ahead_steps", 0)
    stats.carried_trees += getattr(draft, "carried_trees", 0)
    stats.graphed = getattr(draft, "graphed", None)
    stats.draft_compiled = getattr(draft, "compiled", None)
    stats.verify_graphed = verifier.graphed
    stats.pruned_nodes += verifier.pruned_nodes
    stats.most_missed_experts = max(stats.most_missed_experts, verifier.most_missed)


def _tried(tree: DraftTree, path: list[int]) -> list[tuple[float, int, bool]]:
    """Each drafted child of an accepted node: the draft's probability of it, its rank, whether it was accepted."""
    return [(tree.probs[child], tree.ranks[child], index + 1 < len(path) and child == path[index + 1])
            for index, node in enumerate(path) for child in tree.children[node].values()]


# generate's arguments that speculative decoding honours; anything else given with a draft is refused by name
HONOURED_ARGS = frozenset({"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "streamer",
                           "eos_token_id", "pad_token_id", "attention_mask"})


def check_speculation_request(batch_size: int, kwargs: dict[str, Any]) -> None:
    """A draft speculates for one sequence with plain greedy or sampled decoding; refuse the rest by name."""
    if batch_size != 1:
        raise InputError(f"a draft speculates for one sequence at a time; got a batch of {batch_size} prompts "
                         f"(run them one by one, or without a draft)")
    unsupported = sorted(key for key, value in kwargs.items() if key not in HONOURED_ARGS and value is not None)
    if unsupported:
        raise InputError(f"generate with a draft does not support {', '.join(unsupported)}; it takes "
                         f"{', '.join(sorted(HONOURED_ARGS))}")
