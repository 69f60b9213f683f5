"""Many sequences per weight pass, on the Llama-2-7B-shaped random-weight model at vram 4 GB / ram 16 GB:
aggregate decode tokens/s at each batch size (one left-padded batch through `generate`, the KV cache in the device
reserve), the same through the continuous batcher, and the HTTP server under as many concurrent streaming clients
against the batch at that size.

One device-tool call (builds the 13.5 GB checkpoint first, as bench_7b.py does):
    python benchmarks/bench_batch.py --out $OUT --batches 1,8,32,128,256 --clients 64
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_7b import PROMPT_TOKENS, build_checkpoint, prompt_ids  # noqa: E402
from bench_serve import load  # noqa: E402


def batch_rows(model, batches: list[int], new_tokens: int) -> list[dict]:
    """Aggregate decode tokens/s of one batch of each size through `generate` (a batch whose KV cache cannot fit
    the device budget is reported as refused)."""
    import torch

    from tierstore import InputError

    rows = []
    for batch in batches:
        ids = prompt_ids(batch)
        try:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
        except InputError as exc:
            rows.append({"batch": batch, "error": str(exc)})
            continue
        timing = model.report().to_dict()["timing"]
        rows.append({"batch": batch, "s_per_pass": timing["decode_step_s"],
                     "tokens_per_s": batch / timing["decode_step_s"],
                     "peak_vram": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0})
        print("RESULT " + json.dumps(rows[-1]), flush=True)
    return rows


def batcher_row(model, batch: int, new_tokens: int) -> dict:
    """`batch` sequences submitted at once to the continuous batcher: aggregate tokens/s over the whole run."""
    from tierstore.inference.batcher import Batcher, SamplingParams

    batcher = Batcher(model, max_batch=batch, max_queue=batch, max_seq_tokens=PROMPT_TOKENS + new_tokens)
    done = threading.Semaphore(0)
    start = time.perf_counter()
    for row in prompt_ids(batch).tolist():
        batcher.submit(row, SamplingParams(max_tokens=new_tokens, temperature=0),
                       lambda event: done.release() if event.finish_reason else None)
    for _ in range(batch):
        done.acquire()
    wall_s = time.perf_counter() - start
    batcher.close()
    return {"batch": batch, "passes": batcher.steps, "tokens_per_s": batcher.tokens_generated / wall_s,
            "wall_s": wall_s}


def server_row(model_dir: str, clients: int, new_tokens: int, args: argparse.Namespace) -> dict:
    """`tierstore serve` under `clients` concurrent streaming clients (text completions: the model has no chat
    template)."""
    port = 8123
    server = subprocess.Popen([sys.executable, "-m", "tierstore", "serve", model_dir, "--port", str(port),
                               "--served-model-name", "bench", "--max-batch", str(clients), "--vram", args.vram,
                               "--ram", args.ram], stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        for line in server.stderr:  # the start-up line says when it serves, and at what batch
            print(line, end="", flush=True)
            if "serving" in line:
                break
        prompt = " ".join(f"t{100 + i}" for i in range(PROMPT_TOKENS))
        return asyncio.run(load(f"http://127.0.0.1:{port}/v1", "bench", clients, clients, new_tokens, None, 600,
                                chat=False, prompts=[prompt]))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/llama7b-hf")
    parser.add_argument("--batches", default="1,8,32,128,256")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--vram", default="4GB")
    parser.add_argument("--ram", default="16GB")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    import tierstore

    os.makedirs(args.out, exist_ok=True)
    build_checkpoint(args.model)  # once: a checkpoint already there is kept
    batches = [int(b) for b in args.batches.split(",")]
    with tierstore.AutoModel.from_pretrained(args.model, budget={"vram": args.vram, "ram": args.ram}) as model:
        rows = batch_rows(model, batches, args.tokens)
        continuous = batcher_row(model, args.clients, args.tokens)
    print("RESULT " + json.dumps({"continuous": continuous}), flush=True)
    served = server_row(args.model, args.clients, args.tokens, args)
    print("RESULT " + json.dumps({"server": served}), flush=True)
    one = next((row["tokens_per_s"] for row in rows if row["batch"] == 1 and "error" not in row), None)
    print(f"{'batch':>5} {'s/pass':>8} {'tokens/s':>9} {'x batch 1':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['batch']:>5} refused: {row['error']}")
            continue
        print(f"{row['batch']:>5} {row['s_per_pass']:>8.3f} {row['tokens_per_s']:>9.1f} "
              f"{row['tokens_per_s'] / one if one else float('nan'):>9.1f}")
    print(f"continuous batcher, {args.clients} at once: {continuous['tokens_per_s']:.1f} tokens/s over "
          f"{continuous['passes']} passes")
    print(f"server, {args.clients} streaming clients: {served['tokens_per_s']:.1f} tokens/s, time per token p50 "
          f"{served['per_token_p50_s']:.3f} s, p99 {served['per_token_p99_s']:.3f} s; against the batcher "
          f"{continuous['tokens_per_s'] / served['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
