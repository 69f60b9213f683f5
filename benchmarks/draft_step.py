"""Where a model draft's step goes: the forward (a replayed CUDA graph), the candidates' read-back and heap, the
policy's choice, the tree's mask, on a SmolLM2-shaped draft (random weights, bf16) on the GPU.

    python benchmarks/draft_step.py

Each phase is timed with the device synchronized at its ends, so the phases add up to a step; a step's own
time (unsynchronized phases, as the draft runs) is printed beside them.
"""
from __future__ import annotations

import collections
import functools
import os
import time

from common import word_tokenizer


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tierstore
    from tierstore.inference.decoding import drafts, static_forward, tree
    from tierstore.inference.decoding.sampling import warp
    from tierstore.policies.speculation import TreePolicy

    path = "/tmp/draft-shape"
    if not os.path.exists(os.path.join(path, "config.json")):
        config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                             max_position_embeddings=8192)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        word_tokenizer(49152).save_pretrained(path)
    spent: dict[str, float] = collections.defaultdict(float)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            sync()
            start = time.perf_counter()
            result = function(*args, **kwargs)
            sync()
            spent[name] += time.perf_counter() - start
            return result
        return wrapper

    with tierstore.AutoModel.from_pretrained(path, budget=tierstore.Budget(vram="8GB", ram="8GB"),
                                             config={"runtime": {"cache_dir": "/tmp/draft-cache"}}) as model:
        for width in (8, 16):
            for nodes in (64, 1024):
                draft = drafts.ModelDraft(model, "shape", warp(None, None, None), 49152, width,
                                          TreePolicy(max_nodes=nodes, fixed_steps=16))
                draft.reset(300)
                history = list(range(100, 140))
                with torch.no_grad():
                    for _ in range(3):  # warm: graph captured
                        history.append(7)
                        draft.accepted(draft.propose(history, 32), [0])
                    plain_steps, plain_s = draft.steps, draft.step_s
                    for _ in range(5):
                        history.append(7)
                        draft.accepted(draft.propose(history, 32), [0])
                    steps = draft.steps - plain_steps
                    per_step_ms = (draft.step_s - plain_s) / steps * 1e3
                    saved = {"run": static_forward.StaticForward.run, "push": drafts.ModelDraft._push,
                             "choose": drafts.ModelDraft._choose, "ancestry": tree.DraftTree.ancestry}
                    spent.clear()
                    static_forward.StaticForward.run = timed("forward (replay)", saved["run"])
                    drafts.ModelDraft._push = timed("read-back + heap", saved["push"])
                    drafts.ModelDraft._choose = timed("policy choice", saved["choose"])
                    tree.DraftTree.ancestry = timed("tree mask", saved["ancestry"])
                    try:
                        before = draft.steps
                        for _ in range(5):
                            history.append(7)
                            draft.accepted(draft.propose(history, 32), [0])
                        counted = draft.steps - before
                    finally:
                        static_forward.StaticForward.run = saved["run"]
                        drafts.ModelDraft._push = saved["push"]
                        drafts.ModelDraft._choose = saved["choose"]
                        tree.DraftTree.ancestry = saved["ancestry"]
                phases = ", ".join(f"{name} {seconds / counted * 1e3:.3f}" for name, seconds in spent.items())
                print(f"width {width}, node cap {nodes}, buffer {draft._kv.max_tokens} tokens, graphed "
                      f"{draft.graphed}: {per_step_ms:.3f} ms a step as it runs; synchronized phases (ms a step): "
                      f"{phases}", flush=True)


if __name__ == "__main__":
    main()
