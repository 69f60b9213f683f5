"""How many distinct experts a run of consecutive tokens routes to, on the real-language MoE proxy (CPU).

bench_moe_language.py's model routes each layer's MLP input (SmolLM2's, padded with zeros by the inflation) through
a fixed random router (128 experts, top 8). So its routing can be computed from SmolLM2 itself: generate greedy
text for the benchmark's prompts, then, per layer, the top 8 of a random 128-row projection of each generated
token's MLP input (a Gaussian router like the benchmark's, not the same draw). A verify pass of t accepted tokens
moves (at most) the distinct experts of t consecutive tokens; plain decoding moves 8 per token. `reuse` = 8 t /
distinct is what a perfect draft saves in expert bytes per token.

    python benchmarks/routing_reuse.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf
"""
from __future__ import annotations

import argparse
import os

from bench_moe_language import EXPERTS, PROMPTS, TOP_K
from common import encode


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    directory, name = os.path.dirname(os.path.abspath(args.gguf)), os.path.basename(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    hidden = model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    routers = [torch.randn(EXPERTS, hidden, generator=generator) for _ in model.model.layers]
    inputs: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(model.model.layers):
        layer.post_attention_layernorm.register_forward_hook(
            lambda module, args_, out, index=index: inputs.__setitem__(index, out[0]))
    windows = (1, 2, 4, 8, 16, 32)
    print("| prompt | tokens | " + " | ".join(f"t={t}: distinct (uniform), reuse" for t in windows) + " |")
    print("|---|---|" + "---|" * len(windows))
    for number, prompt in enumerate(PROMPTS):
        ids = encode(tokenizer, prompt)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
            model(out)
        first = ids.shape[1]
        routes = [(inputs[i][first:] @ routers[i].T).topk(TOP_K, dim=-1).indices for i in range(len(routers))]
        cells = []
        for t in windows:
            counts = [len(set(route[start:start + t].reshape(-1).tolist())) for route in routes
                      for start in range(0, route.shape[0] - t + 1, t)]
            if not counts:
                cells.append("-")
                continue
            mean = sum(counts) / len(counts)
            uniform = EXPERTS * (1 - (1 - TOP_K / EXPERTS) ** t)
            cells.append(f"{mean:.1f} ({uniform:.1f}), {TOP_K * t / mean:.2f}")
        print(f"| {number} | {routes[0].shape[0]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
