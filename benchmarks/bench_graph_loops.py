"""The batcher and speculation's verify pass replayed from CUDA graphs, against the same loops run eagerly, on a
7B-byte-cost model with real language that fits the device (issue 33).

The target is SmolLM2 inflated to 7B byte cost (bench_speculation.py's: hidden 4032, intermediate 11008, bf16,
about 11 GB, its function unchanged), every unit resident (vram 40 GB). In one process:
- the continuous batcher at each `--batches` size, its cache as ragged rows (eager, `static_rows = False`) and as
  static rows (graphed): aggregate tokens/s over the whole run (prompts included), passes, and whether the tokens
  agree;
- speculation, verify passes eager (`runtime.cuda_graphs = off`) and graphed (auto), with the GGUF itself as the
  draft (the same function: the upper bound) and ngram on a rewrite prompt, against plain decoding under the same
  setting (graphed decode steps under auto).

    python benchmarks/bench_graph_loops.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT

The bound of a resident step is the weight bytes over the HBM read rate (bench_graphs.py measures it: 4.2-4.5
TB/s on an H200, so about 2.6 ms for these 11 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time

from common import INTER, WIDTH_FACTOR, inflate
from spec_rows import CHAT_PROMPTS, chosen_prompts, print_table, speculation_rows


def batcher_rows(target: str, batches: list[int], new_tokens: int, config: dict, budget) -> list[dict]:
    """For each batch size, the ragged batcher then the static one on one model object: a warm-up run, then a
    timed run of `batch` chat prompts submitted at once."""
    import tierstore
    from tierstore.inference.front.batcher import Batcher, SamplingParams

    rows = []
    with tierstore.AutoModel.from_pretrained(target, budget=budget, config=config) as model:
        tok = model.tokenizer
        prompts = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True), add_special_tokens=False).input_ids
                   for p in CHAT_PROMPTS]
        for batch in batches:
            ids = [prompts[i % len(prompts)] for i in range(batch)]
            tokens: dict[bool, list[list[int]]] = {}
            for static in (False, None):
                batcher = Batcher(model, max_batch=batch, max_queue=batch,
                                  max_seq_tokens=max(map(len, ids)) + new_tokens, static_rows=static)
                for max_tokens in (8, new_tokens):  # the first run captures the graphs
                    done = threading.Semaphore(0)
                    steps, start = batcher.steps, time.perf_counter()
                    sequences = [batcher.submit(row, SamplingParams(max_tokens=max_tokens, temperature=0),
                                                lambda event: done.release() if event.finish_reason else None)
                                 for row in ids]
                    for _ in ids:  # a finish event follows its last token's read-back: the device is done
                        done.acquire()
                    wall_s = time.perf_counter() - start
                generated = sum(len(s.tokens) for s in sequences)
                tokens[static is None] = [s.tokens for s in sequences]
                rows.append({"batch": batch, "cache": "static rows" if static is None else "ragged",
                             "graphed": batcher.graphed, "tokens_per_s": generated / wall_s, "wall_s": wall_s,
                             "passes": batcher.steps - steps, "s_per_pass": wall_s / (batcher.steps - steps)})
                batcher.close()
                print("RESULT " + json.dumps(rows[-1]), flush=True)
            parted = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                      for x, y in zip(tokens[False], tokens[True])]
            rows[-1]["first_differences"] = parted
            rows[-1]["margins"] = [None if where is None else _margin(model, row + ragged[:where])
                                   for row, ragged, where in zip(ids, tokens[False], parted)]
            rows[-2]["x_ragged"], rows[-1]["x_ragged"] = 1.0, rows[-1]["tokens_per_s"] / rows[-2]["tokens_per_s"]
    return rows


def _margin(model, ids: list[int]) -> float:
    """The gap between the model's two best logits after `ids`, from one plain forward (where two runs part)."""
    import torch

    with torch.no_grad():
        top = model(torch.tensor([ids], device=model.device)).logits[0, -1].float().topk(2).values.tolist()
    return top[0] - top[1]


def _partings(row: dict) -> str:
    """Where the static rows' tokens part from the ragged ones', row by row, with the margin there."""
    if "first_differences" not in row:
        return "-"
    parted = [f"{where} ({margin:.3f})" for where, margin in zip(row["first_differences"], row["margins"])
              if where is not None]
    return ", ".join(parted) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--work", default="/tmp/graph-loops")
    parser.add_argument("--out", default=".")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=2, help="chat prompts each draft runs")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip (batcher,speculation)")
    parser.add_argument("--steady", action="store_true",
                        help="warm each speculation row's model with a call as long as the measured one, so that "
                             "its verify graphs are recorded before it is timed (a server's steady state)")
    parser.add_argument("--vram", default="40GB", help="the device budget: the whole target fits")
    parser.add_argument("--ram", default="16GB")
    parser.add_argument("--factor", type=int, default=WIDTH_FACTOR, help="width multiple of the target")
    parser.add_argument("--inter", type=int, default=INTER, help="MLP width of the target")
    args = parser.parse_args()
    import tierstore

    target = os.path.join(args.work, "target")
    start = time.perf_counter()
    inflate(args.gguf, target, args.factor, args.inter)
    print(f"target built in {time.perf_counter() - start:.1f} s", flush=True)
    budget = tierstore.Budget(vram=args.vram, ram=args.ram)
    results: dict = {}
    if "batcher" not in args.skip:
        config = {"runtime": {"cache_dir": os.path.join(args.work, "cache")}}
        results["batcher"] = batcher_rows(target, [int(b) for b in args.batches.split(",")], args.new_tokens,
                                          config, budget)
        print("| batch | cache | graphed | tokens/s | x ragged | passes | s/pass | rows part at (top-2 margin) |")
        print("|---|---|---|---|---|---|---|---|")
        for row in results["batcher"]:
            print(f"| {row['batch']} | {row['cache']} | {row['graphed']} | {row['tokens_per_s']:.1f} | "
                  f"{row.get('x_ragged', 1.0):.2f} | {row['passes']} | {row['s_per_pass']:.4f} | "
                  f"{_partings(row)} |")
    if "speculation" not in args.skip:
        results["speculation"] = {}
        for graphs in ("off", "auto"):
            config = {"runtime": {"cache_dir": os.path.join(args.work, "cache"), "cuda_graphs": graphs}}
            rows = speculation_rows(target, {"bf16": args.gguf}, ["none", "bf16", "ngram"],
                                    chosen_prompts(str(args.prompts)), args.new_tokens * 2, budget, config,
                                    warm_tokens=args.new_tokens * 2 if args.steady else 8)
            print(f"cuda_graphs = {graphs}")
            print_table(rows)
            results["speculation"][graphs] = [(name, where, {k: v for k, v in row.items() if k != "tokens"})
                                              for name, where, row in rows]
    with open(os.path.join(args.out, "graph_loops.json"), "w") as handle:
        json.dump(results, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
