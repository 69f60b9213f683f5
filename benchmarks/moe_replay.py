"""Speculation on the real-language MoE proxy replayed on the CPU with a GPU's costs: what a matched draft, the tree
policy and an expert budget would do on bench_moe_language.py's model, whose verify pass costs its routed experts.

bench_moe_language.py's model is SmolLM2 inflated (its function kept) with each MLP copied into 128 experts behind
a fixed random router, top 8. So the replay runs SmolLM2 itself as the target (transformers, float32) and routes
each layer's MLP input through a random 128-row router as that model would (routing_reuse.py does the same for
plain decoding): the real draft (SmolLM2's GGUF in tierstore, as the benchmark's) proposes its trees, tierstore's
own `speculate` and `Verifier` verify them (an expert budget prunes the tree layer by layer from the routing, as in
a run), and a clock that only injected costs advance times it: a draft step `--step-ms`; a verify pass
`--fixed-s` plus, at each MoE layer, the distinct experts its kept nodes route to crossing the link at
`--link-gbps` (verify passes found no expert in a slot on the GPU: 0.0% hits). Ratios are against the no-draft step
measured on the GPU for each prompt (`--base-s`).

    python benchmarks/moe_replay.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --budgets none,auto

`--target-dtype bfloat16 --upcycled` makes the target round as the proxy does (bfloat16, each MLP output the sum of
its 8 routed copies times their routing weights, as transformers' Mixtral adds them); `--draft-dtype` sets the
draft's (speculation.draft_dtype). Two bfloat16 copies of one function part at near-ties, which ends trees early.
`--draft-dtype tfloat32` runs a float32 draft whose linear layers round their inputs and weights to TF32 (10
mantissa bits, to nearest) as a GPU's TF32 matrix products do (its attention stays float32): what acceptance a
float32 draft keeps with TF32 matmuls. `--ahead` (speculation.ahead) hands the draft each MoE layer's copy time
in a verify pass as the runner hands it the layer's routing wait: steps while the layer's experts cross the link,
each on the clock, the last one allowed to run over.

Defaults: the H100 of 2026-12-06 (eleventh session): link 55 GB/s, no-draft steps 0.0390 / 0.0416 / 0.0335 s, the
compiled draft's step 3.8 ms as run; `--fixed-s` 0.06 puts the model's verify passes within 10% of the measured
ones (27.3 GB in 0.541 s, 28.6 GB in 0.571 s, 23.4 GB in 0.519 s).
"""
from __future__ import annotations

import argparse
import contextlib
import os

from bench_moe_language import EXPERTS, PROMPTS, TOP_K, expert_budget_setting
from common import encode
from spec_replay import injected_costs
from spec_rows import check_gguf, make_drafts, refuse

EXPERT_BYTES = 3 * 1152 * 1536 * 2  # one expert of the proxy: gate, up and down of the 2x-inflated MLP, bf16


class _Experts:
    """Stands in for the streamed experts' runner: the routing of a verify pass's tree, layer by layer, from the
    target's MLP inputs (hooks), pruned by the pass's budget as the runner would, and its cost on the clock."""

    def __init__(self, target, clock, args) -> None:
        import torch

        self.clock, self.args = clock, args
        self.budget = None
        self.in_pass = False
        self.busy_until_s = 0.0  # the clock's time when the layer's copies land (--ahead: the draft steps until it)
        self.meanwhile = None  # the work the verifier hands each layer's routing wait (--ahead)
        self.moved_bytes = 0
        generator = torch.Generator().manual_seed(0)
        layers = target.model.layers
        self.routers = [torch.randn(EXPERTS, target.config.hidden_size, generator=generator) for _ in layers]
        self.weights = None  # the routing weights of the MLP input just normed (--upcycled)
        for index, layer in enumerate(layers):
            layer.post_attention_layernorm.register_forward_hook(
                lambda module, inputs, out, index=index: self._layer(index, out))
            if args.upcycled:
                layer.mlp.register_forward_hook(lambda module, inputs, out: self._summed(out))

    def missed_expert_s(self) -> float:
        return EXPERT_BYTES / (self.args.link_gbps * 1e9)

    @contextlib.contextmanager
    def while_routing(self, work):
        """As the runner's: `work()` at each MoE layer while its experts cross the link (--ahead)."""
        self.meanwhile = work
        try:
            yield
        finally:
            self.meanwhile = None

    def busy(self) -> bool:
        """Whether the layer's copies are still crossing the link, on the clock (the verifier's `running`)."""
        return self.clock.now_s < self.busy_until_s

    @contextlib.contextmanager
    def pruning(self, budget):
        self.budget = budget
        try:
            yield budget
        finally:
            self.budget = None

    def _summed(self, out):
        """The MLP's output as the upcycled model makes it: each of the token's 8 identical experts' output times
        its routing weight, rounded to the model's dtype, added in expert order (transformers' Mixtral, eager)."""
        weights, order = self.weights
        total = out.new_zeros(out.shape)
        for rank in order.sort(dim=-1).indices.unbind(-1):  # ranks in expert order, token by token
            total += (out * weights.gather(-1, rank[..., None]).to(out.dtype))
        return total

    def _layer(self, index: int, hidden) -> None:
        if not (self.in_pass or self.args.upcycled):
            return
        logits = hidden.float() @ self.routers[index].T
        if self.args.upcycled:  # Mixtral's routing, a router like the benchmark's (0.02 a unit): top 8 of the softmax
            top = (0.02 * logits).softmax(dim=-1).topk(TOP_K, dim=-1)
            self.weights = (top.values / top.values.sum(dim=-1, keepdim=True), top.indices)
        if not self.in_pass:
            return
        rows = logits[0].topk(TOP_K, dim=-1).indices.tolist()
        if index == 0:
            self.clock.now_s += self.args.fixed_s
        live = [True] * len(rows)
        if self.budget is not None:
            live = self.budget.prune(rows, missed=lambda expert: True, layers_left=len(self.routers) - index)
        experts = len({expert for row, kept in zip(rows, live) if kept for expert in row})
        self.moved_bytes += experts * EXPERT_BYTES
        self.busy_until_s = self.clock.now_s + experts * self.missed_expert_s()
        if self.meanwhile is not None:  # the draft's steps while the copies cross; the last one may run over
            self.meanwhile()
        self.clock.now_s = max(self.clock.now_s, self.busy_until_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--draft", default="bf16", help="bf16 (the GGUF as is: the benchmark's), nf4, q3_k_gptq, ...")
    parser.add_argument("--work", default="/tmp/moe-replay")
    parser.add_argument("--budgets", default="none,auto", help="speculation.expert_budget values: none, auto, N")
    parser.add_argument("--prompts", default="0,2", help="bench_moe_language's prompt numbers (1 ends at 8 tokens)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--step-ms", type=float, default=3.8)
    parser.add_argument("--link-gbps", type=float, default=55.0)
    parser.add_argument("--fixed-s", type=float, default=0.06)
    parser.add_argument("--base-s", default="0.0390,0.0416,0.0335", help="no-draft s/token per prompt")
    parser.add_argument("--nodes", type=int, default=1024, help="the node cap")
    parser.add_argument("--target-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the target's dtype (bfloat16: the benchmark's)")
    parser.add_argument("--draft-dtype", default=None, choices=["float32", "bfloat16", "tfloat32"],
                        help="the draft's compute dtype (default: tierstore's for the draft's store; tfloat32: float32 "
                             "with its linear layers' products rounded as TF32's)")
    parser.add_argument("--ahead", action="store_true", help="speculation.ahead: the draft grows its next tree "
                        "during each MoE layer's copies in a verify pass (each step on the clock; the last one of a "
                        "layer may outlast its copies)")
    parser.add_argument("--upcycled", action="store_true", help="each MLP output summed as the upcycled model sums "
                        "it: its 8 routed copies times their routing weights, each rounded to the target's dtype")
    args = parser.parse_args()
    check_gguf(args.gguf)
    try:
        budgets = [expert_budget_setting(word) for word in args.budgets.split(",")]
        prompts = [int(number) for number in args.prompts.split(",")]
        base_s = [float(value) for value in args.base_s.split(",")]
        assert all(0 <= number < len(PROMPTS) for number in prompts) and len(base_s) == len(PROMPTS)
    except (KeyError, ValueError, AssertionError):
        refuse(f"--budgets {args.budgets!r} / --prompts {args.prompts!r} / --base-s {args.base_s!r}: none, auto or "
               f"integers; prompt numbers below {len(PROMPTS)}; one s/token per prompt")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tierstore
    from tierstore.errors import TierstoreError
    from tierstore.inference.decoding import speculation, verifier

    config = {"runtime": {"cache_dir": os.path.join(args.work, "cache")}}
    try:  # a draft no codec or recipe names is refused before any work
        codecs = (args.draft,) if args.draft != "bf16" else ()
        draft_path = make_drafts(args.gguf, args.work, config, codecs)[args.draft]
    except TierstoreError as exc:
        refuse(f"--draft {args.draft!r}: {exc}")
    directory, name = os.path.dirname(os.path.abspath(args.gguf)), os.path.basename(args.gguf)
    target = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                  dtype=getattr(torch, args.target_dtype)).eval()
    target.tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    with injected_costs({8: args.step_ms / 1e3}) as clock, torch.no_grad(), tierstore.AutoModel.from_pretrained(
            draft_path, budget=tierstore.Budget(vram="200MB", ram="2GB"), config=config,
            dtype="float32" if args.draft_dtype == "tfloat32" else args.draft_dtype) as draft_model, \
            tf32_linears(draft_model.model, args.draft_dtype == "tfloat32"):
        real_times, real_running = (speculation.time, verifier.time), verifier.running
        speculation.time = verifier.time = clock
        try:
            experts = _Experts(target, clock, args)
            verifier.running = lambda device: experts.busy  # a pass is busy while its layer's copies cross
            print("| expert budget | prompt | x no draft | s/token | tokens/pass | verify pass s | moved GB/pass | "
                  "drafted nodes/pass | pruned/pass | draft s/pass | steps grown in passes/pass | carried trees |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for budget in budgets:
                for prompt in prompts:
                    row = _run(target, draft_model, experts, clock, budget, PROMPTS[prompt], args)
                    seconds = row["s_per_token"]
                    print(f"| {budget} | {prompt} | {base_s[prompt] / seconds:.2f} | {seconds:.4f} | "
                          f"{row['tokens_per_pass']:.1f} | {row['verify_pass_s']:.3f} | {row['moved_gb']:.1f} | "
                          f"{row['nodes']:.0f} | {row['pruned']:.1f} | {row['draft_s']:.3f} | "
                          f"{row['ahead_steps']:.1f} | {row['carried']} |", flush=True)
        finally:
            (speculation.time, verifier.time), verifier.running = real_times, real_running


def tf32(x):
    """`x` (float32) rounded to TF32's 10 mantissa bits, to nearest (ties to even), still float32."""
    import torch

    bits = x.contiguous().view(torch.int32)
    rounded = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return torch.where(torch.isfinite(x), rounded.view(torch.float32), x)


@contextlib.contextmanager
def tf32_linears(model, on: bool):
    """While `on`: inside `model`'s forwards only, every float32 `torch.nn.functional.linear` multiplies TF32-rounded
    inputs and weights (accumulating in float32), as a GPU's TF32 matrix products do."""
    import torch

    if not on:
        yield
        return
    plain, inside, rounded = torch.nn.functional.linear, [False], {}

    def linear(x, weight, bias=None):
        if inside[0] and x.dtype == torch.float32:
            key = (weight.data_ptr(), weight.shape)  # rounded again only when the buffer was written since
            if key not in rounded or rounded[key][0] != weight._version:
                rounded[key] = (weight._version, tf32(weight))
            return plain(tf32(x), rounded[key][1], bias)
        return plain(x, weight, bias)

    hooks = [model.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
             model.register_forward_hook(lambda *_: inside.__setitem__(0, False))]
    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = plain
        for hook in hooks:
            hook.remove()


def _run(target, draft_model, experts: _Experts, clock, budget, prompt: str, args) -> dict:
    """One prompt as the benchmark runs it: a warm-up call of 8 tokens, then `args.tokens`, one tree policy and
    pass rate for both; the second call's figures."""
    import torch

    from tierstore.inference.decoding.drafts import ModelDraft
    from tierstore.inference.decoding.sampling import chooser, warp
    from tierstore.inference.decoding.speculation import SpeculationStats, speculate
    from tierstore.inference.decoding.verifier import Verifier
    from tierstore.inference.runtime.expert_budget import PassRate
    from tierstore.policies.speculation import TreePolicy

    ids = encode(target.tokenizer, prompt)
    policy, rate = TreePolicy(max_nodes=args.nodes), PassRate()
    vocab = target.config.vocab_size
    ends = {target.config.eos_token_id} if target.config.eos_token_id is not None else set()
    for new_tokens in (8, args.tokens):
        draft = ModelDraft(draft_model, "draft", warp(None, None, None), vocab, 8, policy, ahead=args.ahead)
        check = Verifier(target, torch.device("cpu"), experts=experts, max_missed=budget if budget != "auto" else None,
                         rate=rate if budget == "auto" else None)
        stats = SpeculationStats("draft", expert_budget=budget)
        original = check.verify

        def verify(tree, choose, meanwhile=None, original=original):
            experts.in_pass = True
            try:
                return original(tree, choose, meanwhile)
            finally:
                experts.in_pass = False

        check.verify = verify
        experts.moved_bytes = 0
        speculate(check, draft, ids, new_tokens, chooser(False, warp(None, None, None)), ends, stats)
    passes = stats.passes
    return {"s_per_token": (stats.draft_s + stats.verify_s) / stats.new_tokens,
            "tokens_per_pass": stats.new_tokens / passes, "verify_pass_s": stats.verify_s / passes,
            "moved_gb": experts.moved_bytes / passes / 1e9, "nodes": stats.tree_nodes / passes,
            "pruned": check.pruned_nodes / passes, "draft_s": stats.draft_s / passes,
            "ahead_steps": stats.ahead_steps / passes, "carried": stats.carried_trees}


if __name__ == "__main__":
    main()
