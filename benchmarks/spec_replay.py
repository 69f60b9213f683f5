"""Speculation replayed on the CPU with a GPU's costs: what a draft and the tree policy would do on a machine whose
draft step and verify pass times are given, over the target's own greedy answers.

The target (SmolLM2, the function the 7B and 72B benchmarks inflate) answers the chat prompts greedily once; then
the draft proposes its trees as it would in a run, each verify pass walks a tree along the target's tokens (what
greedy verification accepts), and a clock that only the injected costs advance times it: a step of `w` slots costs
`--step-ms` at the narrowest width listed that holds it, a verify pass costs `--verify-s` whatever its tree (a
streamed pass is flat while the link dominates). Tokens a pass and acceptance come from the real draft; the
seconds are the model's. Ratios are against a no-draft step of `--base-s`.

    python benchmarks/spec_replay.py --gguf s.gguf                                     # the 7B row, H100 costs
    python benchmarks/spec_replay.py --gguf s.gguf --width 8 --step-ms 8:3.2           # steps of 8 slots at most
    python benchmarks/spec_replay.py --gguf s.gguf --step-ms 8:0.3,16:0.3,32:0.3       # near-free drafting

Defaults: the H100's 7B row of the seventh session (no draft 0.161 s, verify pass 0.165 s, a compiled nf4 draft
step 3.2 ms at width 8); 3.7 and 4.2 ms at 16 and 32 are assumptions (the H200 measured 1.10-1.13x from 8 to 16).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os

from common import encode
from spec_rows import CHAT_PROMPTS, check_gguf, make_drafts, refuse


class _Clock:
    """Stands in for `time` inside the draft module: only injected costs advance it."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def perf_counter(self) -> float:
        return self.now_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--work", default="/tmp/spec-replay")
    parser.add_argument("--draft", default="nf4", help="nf4, int8, q3_k_gptq, ... (spec_rows.make_drafts)")
    parser.add_argument("--target", default="none", help="the target's compression (none: the GGUF as is)")
    parser.add_argument("--width", type=int, default=32, help="speculation.width")
    parser.add_argument("--step-ms", default="8:3.2,16:3.7,32:4.2", help="a draft step's ms by width")
    parser.add_argument("--verify-s", type=float, default=0.165)
    parser.add_argument("--base-s", type=float, default=0.161, help="a no-draft step's seconds")
    parser.add_argument("--nodes", type=int, default=512, help="the node cap")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    check_gguf(args.gguf)
    step_s = _step_costs(args.step_ms)
    import torch

    import tierstore
    from tierstore.errors import TierstoreError

    config = {"runtime": {"cache_dir": os.path.join(args.work, "cache")}}
    try:  # a draft no codec or recipe names is refused before the target's answers are computed
        draft_path = make_drafts(args.gguf, args.work, config, (args.draft,))[args.draft]
    except TierstoreError as exc:
        refuse(f"--draft {args.draft!r}: {exc}")
    answers = _answers(args)
    with injected_costs(step_s) as clock, torch.no_grad(), tierstore.AutoModel.from_pretrained(
            draft_path, budget=tierstore.Budget(vram="200MB", ram="2GB"), config=config) as model:
        for prompt, (ids, new) in enumerate(answers):
            tokens_per_pass, nodes, drafted_s = _replay(model, args, clock, ids, new)
            passes = len(new) / tokens_per_pass
            seconds_per_token = (drafted_s + passes * args.verify_s) / len(new)
            print(f"prompt {prompt}: {len(new)} tokens, {tokens_per_pass:.2f} tokens a pass, {nodes:.0f} nodes a "
                  f"pass, drafting {drafted_s / passes:.3f} s a pass: {args.base_s / seconds_per_token:.2f}x no "
                  f"draft", flush=True)


def _step_costs(spec: str) -> dict[int, float]:
    """`--step-ms` ("8:3.2,16:3.7") as {width: seconds}; refused in one line when malformed."""
    try:
        costs = {int(width): float(ms) / 1e3 for width, ms in (part.split(":") for part in spec.split(","))}
    except ValueError:
        refuse(f"--step-ms {spec!r}: comma-separated width:milliseconds, e.g. 8:3.2,16:3.7")
    if any(width < 1 or seconds < 0 for width, seconds in costs.items()):
        refuse(f"--step-ms {spec!r}: widths from 1, milliseconds from 0")
    return costs


def _answers(args) -> list[tuple[list[int], list[int]]]:
    """The target's greedy answers to the chat prompts (ids, new tokens), computed once into --work."""
    import torch

    import tierstore

    name = os.path.splitext(os.path.basename(args.gguf))[0]
    cache = os.path.join(args.work, f"answers-{name}-{args.target}-{args.new_tokens}.json")
    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as handle:
            return [tuple(pair) for pair in json.load(handle)]
    config = {"runtime": {"cache_dir": os.path.join(args.work, "cache")}, "compression": {"format": args.target}}
    answers = []
    with tierstore.AutoModel.from_pretrained(args.gguf, budget=tierstore.Budget(vram="200MB", ram="2GB"),
                                             config=config) as model:
        for prompt in CHAT_PROMPTS:
            ids = encode(model.tokenizer, prompt)
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
            answers.append((ids[0].tolist(), out[0, ids.shape[1]:].tolist()))
    os.makedirs(args.work, exist_ok=True)
    with open(cache + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(answers, handle)
    os.replace(cache + ".tmp", cache)
    return answers


@contextlib.contextmanager
def injected_costs(step_s: dict[int, float]):
    """Inside: the draft module's clock is a `_Clock` that each draft step advances by its width's cost (the
    narrowest listed width holding its tokens); yields the clock."""
    from tierstore.inference.decoding import drafts
    from tierstore.policies.speculation import narrowest

    clock, real_time, real_step = _Clock(), drafts.time, drafts.ModelDraft._step
    widths = tuple(sorted(step_s))

    def step(draft, tokens, *rest):
        probabilities = real_step(draft, tokens, *rest)
        clock.now_s += step_s[narrowest(widths, len(tokens))]
        return probabilities

    drafts.time, drafts.ModelDraft._step = clock, step
    try:
        yield clock
    finally:
        drafts.time, drafts.ModelDraft._step = real_time, real_step


def _replay(model, args, clock: _Clock, ids: list[int], new: list[int]) -> tuple[float, float, float]:
    """(tokens a pass, drafted nodes a pass, drafting seconds) of one answer with `model` (the draft, open) and a
    fresh tree policy, after a warm-up of the answer's first 8 tokens (as a benchmark row's model object runs a
    warm-up call first)."""
    from tierstore.inference.decoding.drafts import ModelDraft
    from tierstore.inference.decoding.sampling import warp
    from tierstore.policies.speculation import TreePolicy

    policy = TreePolicy(max_nodes=args.nodes)
    vocab = model.model.config.get_text_config().vocab_size
    for tokens in (new[:8], new):
        result = _walk(ModelDraft(model, "draft", warp(None, None, None), vocab, args.width, policy), ids, tokens,
                       clock, args.verify_s)
    return result


def _walk(draft, ids: list[int], new: list[int], clock: _Clock, verify_s: float) -> tuple[float, float, float]:
    """Speculate along `new` (the target's tokens after `ids`): (tokens a pass, nodes a pass, drafting seconds)."""
    from tierstore.inference.decoding.speculation import _tried
    from tierstore.inference.decoding.verifier import walk

    draft.reset(len(ids) + len(new) + 1)
    history, emitted, passes, nodes, drafted_s = ids + new[:1], 1, 0, 0, 0.0
    while emitted < len(new):
        start_s = clock.now_s
        tree = draft.propose(history, max_depth=len(new) - emitted - 1)
        drafted_s += clock.now_s - start_s
        # the model's pick at each node is the answer's token at its depth (-1, no token: past the answer's end)
        picks = [new[emitted + depth] if emitted + depth < len(new) else -1 for depth in tree.depths]
        path, bonus = walk(tree, picks)
        taken = min(len(path), len(new) - emitted)  # the accepted tokens and the bonus
        bonus = bonus if bonus >= 0 else new[-1]
        draft.policy.observe_pass(verify_s, len(tree), _tried(tree, path))
        draft.accepted(tree, path, bonus)
        history += new[emitted:emitted + taken]
        emitted, passes, nodes = emitted + taken, passes + 1, nodes + len(tree) - 1
        clock.now_s += verify_s
    return len(new) / passes, nodes / passes, drafted_s


if __name__ == "__main__":
    main()
