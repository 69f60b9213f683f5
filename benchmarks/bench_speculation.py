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
no-draft row of the same prompt. Each draft runs `--prompts` chat prompts (ngram: the rewrite prompts), each reported.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from common import INTER, WIDTH_FACTOR, inflate
from draft_phases import draft_phases
from spec_rows import (check_gguf, chosen_prompts, chosen_rows, codecs_of,
                       make_drafts, print_table, spec_config, speculation_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--work", default="/tmp/spec")
    parser.add_argument("--out", default=".")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", default="3", help="the chat prompts each draft runs: how many, or "
                        "their numbers (\"1,2\")")
    parser.add_argument("--only", help="comma-separated drafts to run (none,nf4,int8,bf16,ngram; a model draft's "
                        "name + \"+compile\" runs it compiled, + \"+ahead\" with speculation.ahead)")
    parser.add_argument("--factor", type=int, default=WIDTH_FACTOR, help="width multiple of the target")
    parser.add_argument("--inter", type=int, default=INTER, help="MLP width of the target")
    parser.add_argument("--phases", action="store_true", help="time a model draft's phases (synchronized: a "
                                                              "little slower), printed with each row")
    args = parser.parse_args()
    check_gguf(args.gguf)
    wanted = chosen_rows(args.only or "none,nf4,int8,bf16,ngram", ("nf4", "int8", "bf16"))
    prompts = chosen_prompts(args.prompts)
    import torch

    import tierstore
    from tierstore.probe import run_probe

    config = spec_config(args.work)
    budget = tierstore.Budget(vram="4GB", ram="16GB")
    target = os.path.join(args.work, "target")
    start = time.perf_counter()
    inflate(args.gguf, target, args.factor, args.inter)
    print(f"target built in {time.perf_counter() - start:.1f} s", flush=True)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    run_probe(config["runtime"]["cache_dir"], device)
    drafts = make_drafts(args.gguf, args.work, config, codecs=codecs_of(wanted, {"nf4", "int8"}))
    rows = speculation_rows(target, drafts, wanted, prompts, args.new_tokens, budget, config,
                            phases=draft_phases if args.phases else None)
    with open(os.path.join(args.out, "speculation.json"), "w") as handle:
        json.dump([{"draft": name, "prompt": number, **row} for name, number, row in rows], handle, indent=1)
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"\ncard: {card}; target {target}: vram 4GB / ram 16GB; greedy, {args.new_tokens} new tokens")
    print_table(rows)


if __name__ == "__main__":
    main()
