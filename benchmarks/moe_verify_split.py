"""The CPU's share of a speculative MoE run's verify passes, A/B on one model object: missed experts split between
the link and the CPU with the next layer's predicted experts split too (the copies queued ahead counted as the
link's backlog), against every predicted expert copied ahead as before (the CPU then gets only the mispredicted
misses). Variants alternate, each twice, on the same prompts, with the tree policy and the measured costs reset
before each; each variant's peak reserved device memory is reported beside the budget.

    python benchmarks/moe_verify_split.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT

The model is bench_moe_language's upcycled proxy (written to --model when missing), at vram 4 GB / ram 56 GB with
SmolLM2 as the draft (compiled), greedy.
"""
from __future__ import annotations

import argparse
import json
import os

from bench_moe_language import PROMPTS, upcycle
from common import encode

VARIANTS = ("split", "copied ahead")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--model", default="/tmp/moe-language")
    parser.add_argument("--cache", default="/tmp/moe-language-cache")
    parser.add_argument("--out", default=".")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompts", default="0,2")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import torch

    import tierstore
    from tierstore.inference.runtime.experts import ExpertRunner

    upcycle(args.gguf, args.model)
    model = tierstore.AutoModel.from_pretrained(
        args.model, budget={"vram": "4GB", "ram": "56GB"},
        config={"runtime": {"cache_dir": args.cache}, "speculation": {"compile": True}}, draft=args.gguf)
    split_ahead = ExpertRunner._copied_ahead
    rows = []
    for round_number in range(args.rounds):
        for variant in VARIANTS:
            old = variant == "copied ahead"
            ExpertRunner._copied_ahead = (lambda self, index, guessed: sorted(guessed)) if old else split_ahead
            if old:  # nor is the link's backlog counted at the layer
                model.experts.store.copies_in_flight_bytes = lambda: 0
            else:
                model.experts.store.__dict__.pop("copies_in_flight_bytes", None)
            model.forget_tree_costs()
            model.experts.costs = model.plan.experts.costs  # the CPU rate observed by the last variant forgotten
            torch.cuda.reset_peak_memory_stats()
            for number in map(int, args.prompts.split(",")):
                ids = encode(model.tokenizer, PROMPTS[number])
                model.generate(ids, max_new_tokens=8, do_sample=False)
                out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
                report = model.report().to_dict()
                experts, spec = report["experts"], report["speculation"]
                rows.append({"round": round_number, "variant": variant, "prompt": number,
                             "s_per_token": 1 / report["timing"]["decode_tokens_per_s"],
                             "verify_pass_s": spec["verify_pass_s"], "tokens_per_pass": spec["tokens_per_pass"],
                             "copied_gb_per_pass": experts["h2d_bytes_per_pass"] / 1e9,
                             "cpu_experts_per_pass": experts["host_computed_per_pass"],
                             "cpu_gbps": experts["cpu_gbps"], "host_work_s_per_call": experts["host_work_s_per_call"],
                             "tokens": out[0, ids.shape[1]:].tolist()})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
            rows[-1]["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
            print(f"{variant}, round {round_number}: peak reserved {rows[-1]['peak_reserved_gb']:.3f} GB of 4",
                  flush=True)
    model.close()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "moe_verify_split.json"), "w") as handle:
        json.dump({"card": torch.cuda.get_device_name(0), "rows": rows}, handle)
    print(f"\ncard: {torch.cuda.get_device_name(0)}")
    print("| variant | round | prompt | s/token | verify pass s | tokens/pass | copied GB/pass | s per copied GB | "
          "CPU experts/pass | CPU GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['round']} | {row['prompt']} | {row['s_per_token']:.4f} | "
              f"{row['verify_pass_s']:.3f} | {row['tokens_per_pass']:.1f} | {row['copied_gb_per_pass']:.2f} | "
              f"{row['verify_pass_s'] / row['copied_gb_per_pass']:.4f} | {row['cpu_experts_per_pass']:.1f} | "
              f"{row['cpu_gbps'] or 0:.1f} |")


if __name__ == "__main__":
    main()
