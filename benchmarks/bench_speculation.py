"""Speculative decoding on a 7B-byte-cost model with real language: tokens/s against no draft, at vram 4 GB /
ram 16 GB, one process.

The target is SmolLM2-135M-Instruct inflated without changing its function: hidden 576 -> 4032 (63 query and 21
key-value heads of 64, the 9/3 original heads first so each keeps its key-value group), intermediate 1536 -> 11008,
all padding zero; every RMSNorm weight times sqrt(576/4032) and its eps times 576/4032, so each norm's output on
the original dimensions is unchanged. Written as bf16 safetensors (about 11 GB), read in place.

Drafts: SmolLM2 itself as nf4 and int8 layer stores (tierstore convert --compress), the GGUF as is (the upper
bound: the same function as the target), and ngram on a prompt that asks to rewrite a paragraph.

    python benchmarks/bench_speculation.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/spec --out $OUT

Every row is one generate call after a warm-up call on the same model object; tokens are compared with the
no-draft row of the same prompt. Each draft runs `--prompts` chat prompts (ngram: the rewrite prompt), each reported.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from common import INTER, QUESTION, WIDTH_FACTOR, fmt, inflate, run_row

PROMPTS = [QUESTION, "Write a short story about a lighthouse keeper.", "What causes the seasons on Earth?"]

REWRITE = ("Rewrite the following paragraph in the same words, only fixing the spelling: The old lighthouse "
           "stood on the rocky cape for more then a hundred years. Every night its keeper climbed the narrow "
           "stairs, lit the great lamp, and watched the ships pass safely threw the dark water. When the storms "
           "came, the light never failed, and the sailors new they were close to home.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--work", default="/tmp/spec")
    parser.add_argument("--out", default=".")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=3, help="how many of the chat prompts each draft runs")
    parser.add_argument("--only", help="comma-separated drafts to run (none,nf4,int8,bf16,ngram)")
    parser.add_argument("--factor", type=int, default=WIDTH_FACTOR, help="width multiple of the target")
    parser.add_argument("--inter", type=int, default=INTER, help="MLP width of the target")
    args = parser.parse_args()
    import torch
    from tierstore.inference.compose import compress_model

    import tierstore
    from tierstore.probe import run_probe

    config = {"runtime": {"cache_dir": os.path.join(args.work, "cache")}}
    budget = tierstore.Budget(vram="4GB", ram="16GB")
    target = os.path.join(args.work, "target")
    start = time.perf_counter()
    inflate(args.gguf, target, args.factor, args.inter)
    print(f"target built in {time.perf_counter() - start:.1f} s", flush=True)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    run_probe(config["runtime"]["cache_dir"], device)
    drafts = {"bf16": args.gguf}
    for codec in ("nf4", "int8"):
        drafts[codec] = os.path.join(args.work, f"draft-{codec}")
        if not os.path.exists(os.path.join(drafts[codec], "manifest.json")):
            compress_model(args.gguf, drafts[codec], codec, dtype=torch.bfloat16, config=config, progress=False)
    wanted = (args.only or "none,nf4,int8,bf16,ngram").split(",")
    prompts = PROMPTS[:args.prompts]
    rows = []  # (draft, prompt kind, row); the prompt kind is "rewrite" for ngram, else the prompt's number
    for name in wanted:
        for number, prompt in ([("rewrite", REWRITE)] if name == "ngram" else list(enumerate(prompts))):
            if name == "ngram":
                rows.append(("none", "rewrite", run_row(target, None, prompt, args.new_tokens, budget, config)))
            base = next((row for kind, where, row in rows if kind == "none" and where == number), None)
            row = run_row(target, "ngram" if name == "ngram" else (drafts.get(name) if name != "none" else None),
                          prompt, args.new_tokens, budget, config, base["tokens"] if base else None)
            rows.append((name, number, row))
            print(json.dumps({f"{name} {number}": {k: v for k, v in row.items() if k != "tokens"}}), flush=True)
    with open(os.path.join(args.out, "speculation.json"), "w") as handle:
        json.dump([{"draft": name, "prompt": number, **row} for name, number, row in rows], handle, indent=1)
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"\ncard: {card}; target {target}: vram 4GB / ram 16GB; greedy, {args.new_tokens} new tokens")
    print_table(rows)


def print_table(rows: list) -> None:
    """One line per draft and prompt, against the no-draft row of the same prompt."""
    header = ("draft", "prompt", "tokens/s", "x no draft", "tokens/pass", "accept", "largest tree", "draft step s",
              "verify pass s", "pass s", "same tokens", "graphed")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, number, row in rows:
        base = next((got for kind, where, got in rows if kind == "none" and where == number), None)
        speedup = row["tokens_per_s"] / base["tokens_per_s"] if base and base["tokens_per_s"] else None
        same = row["tokens"] == base["tokens"] if base else None
        cells = [name, number, f"{row['tokens_per_s']:.2f}", f"{speedup:.2f}" if speedup else "-",
                 fmt(row["tokens_per_pass"], "{:.2f}"), fmt(row["acceptance"], "{:.2f}"),
                 fmt(row["largest_tree"], "{}"), fmt(row["draft_step_s"], "{:.4f}"),
                 fmt(row["verify_pass_s"], "{:.4f}"), fmt(row["pass_s"], "{:.4f}"),
                 str(same) if same or row["first_difference"] is None else
                 f"from token {row['first_difference']} (top-2 margin {row['top2_logit_margin_there']:.3f})",
                 str(row["graphed"])]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
