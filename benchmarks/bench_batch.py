"""Many sequences per weight pass, on the Llama-2-7B-shaped random-weight model at vram 4 GB / ram 16 GB:
aggregate decode tokens/s at each batch size (one left-padded batch through `generate`), with the KV cache in the
device reserve and in host RAM (`runtime.kv_cache`); then `--clients` sequences at once through the continuous
batcher (for each placement), and the HTTP server (`--max-batch` that many) under as many streaming clients, with
the sequences it carried a pass on average. At the same concurrency, a batch file of two such batches: its second
finds the weights in place, as the server's clients do, and is the server's target (within 1.3x).

One device-tool call (builds the 13.5 GB checkpoint first, as bench_7b.py does):
    python benchmarks/bench_batch.py --out $OUT --batches 1,8,32,128,256 --clients 64
A host KV cache takes what the RAM budget leaves beside the weights' host tier (2.5 GB at ram 16 GB); larger
batches at a larger RAM budget, without the server:
    python benchmarks/bench_batch.py --out $OUT --batches 128,256 --kv host --ram 32GB --clients 0
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from common import PROMPT_TOKENS, build_checkpoint, load, prompt_ids, prompt_text


def batch_rows(model, batches: list[int], new_tokens: int, kv: str) -> list[dict]:
    """Aggregate decode tokens/s of one batch of each size through `generate`, the KV cache where `kv` says (a
    batch whose cache fits nowhere allowed is reported as refused)."""
    import torch

    from tierstore import InputError

    rows = []
    for batch in batches:
        ids = prompt_ids(batch)
        torch.cuda.reset_peak_memory_stats()
        try:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
        except InputError as exc:
            rows.append({"batch": batch, "kv": kv, "error": str(exc)})
            continue
        timing = model.report().to_dict()["timing"]
        rows.append({"batch": batch, "kv": kv, "kv_on_host": model.kv_on_host,
                     "s_per_pass": timing["decode_step_s"], "tokens_per_s": batch / timing["decode_step_s"],
                     "device_resident": len(model.plan.device_resident),
                     "peak_vram_allocated": torch.cuda.max_memory_allocated(),
                     "peak_vram_reserved": torch.cuda.max_memory_reserved()})
        print("RESULT " + json.dumps(rows[-1]), flush=True)
        rows[-1]["tokens"] = out[:, PROMPT_TOKENS:].tolist()
    return rows


def batcher_row(model, batch: int, new_tokens: int, kv: str) -> dict:
    """`batch` sequences submitted at once to the continuous batcher (after a warm-up pass): aggregate tokens/s
    over the whole run, and each sequence's tokens."""
    from tierstore.inference.front.batcher import Batcher, SamplingParams

    model.fit_kv_cache(batch * (PROMPT_TOKENS + new_tokens))  # where `kv` says, as the server's batch is placed
    warm_up_s = model.warm_up()
    batcher = Batcher(model, max_batch=batch, max_queue=batch, max_seq_tokens=PROMPT_TOKENS + new_tokens)
    done = threading.Semaphore(0)
    start = time.perf_counter()
    sequences = [batcher.submit(row, SamplingParams(max_tokens=new_tokens, temperature=0),
                                lambda event: done.release() if event.finish_reason else None)
                 for row in prompt_ids(batch).tolist()]
    for _ in range(batch):
        done.acquire()
    wall_s = time.perf_counter() - start
    batcher.close()
    return {"batch": batch, "kv": kv, "kv_on_host": model.kv_on_host, "passes": batcher.steps,
            "tokens_per_s": batcher.tokens_generated / wall_s, "wall_s": wall_s, "warm_up_s": warm_up_s,
            "tokens": [sequence.tokens for sequence in sequences]}


def batchfile_row(model_dir: str, prompts: int, new_tokens: int, args: argparse.Namespace) -> dict:
    """`tierstore generate --prompts-file` with twice `prompts` prompts, `prompts` a batch: tokens/s over the
    whole file (the model's opening left out), and over its second batch, which finds the weights in place as the
    server's clients do (prefill counted, as the clients count theirs)."""
    prompt = prompt_text()
    source, out, report = (os.path.join(args.out, name) for name in ("prompts.jsonl", "answers.jsonl", "file.json"))
    with open(source, "w") as handle:
        handle.writelines(json.dumps({"prompt": prompt, "id": i}) + "\n" for i in range(2 * prompts))
    if os.path.exists(out):
        os.remove(out)
    run = subprocess.run([sys.executable, "-m", "tierstore", "generate", model_dir, "--prompts-file", source, "--out",
                          out, "--batch-size", str(prompts), "--max-new-tokens", str(new_tokens),
                          "--no-chat-template", "--vram", args.vram, "--ram", args.ram, "--report-json", report],
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"tierstore generate --prompts-file failed: {run.stderr.strip()[-500:]}")
    with open(report) as handle:
        data = json.load(handle)
    last = data["last_batch"]["timing"]
    return {"prompts": 2 * prompts, "tokens": data["new_tokens"], "seconds": data["seconds"],
            "tokens_per_s": data["new_tokens"] / data["seconds"],
            "warm_batch_tokens_per_s": last["new_tokens"] * last["batch_size"] / (last["prefill_s"] + last["decode_s"])}


def server_row(model_dir: str, clients: int, new_tokens: int, args: argparse.Namespace) -> dict:
    """`tierstore serve --max-batch clients` under `clients` concurrent streaming clients (text completions: the
    model has no chat template); `rows_per_pass`: the sequences a pass carried on average (from /health)."""
    import httpx
    from transformers import AutoTokenizer

    port = 8123
    prompt = prompt_text()
    longest = len(AutoTokenizer.from_pretrained(model_dir)(prompt).input_ids) + new_tokens
    server = subprocess.Popen([sys.executable, "-m", "tierstore", "serve", model_dir, "--port", str(port),
                               "--served-model-name", "bench", "--max-batch", str(clients), "--vram", args.vram,
                               "--ram", args.ram, "--max-seq-len", str(longest)], stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        for line in server.stderr:  # the start-up line says when it serves, and at what batch
            print(line, end="", flush=True)
            if "serving" in line:
                batch = int(re.search(r"up to (\d+) sequences of", line).group(1))
                break
        else:
            raise RuntimeError(f"tierstore serve exited ({server.wait()}) before serving")
        threading.Thread(target=lambda: [print(line, end="", flush=True) for line in server.stderr],
                         daemon=True).start()  # a full pipe would stall the server
        before = httpx.get(f"http://127.0.0.1:{port}/health").json()
        result = asyncio.run(load(f"http://127.0.0.1:{port}/v1", "bench", clients, clients, new_tokens, None, 600,
                                  chat=False, prompts=[prompt]))
        after = httpx.get(f"http://127.0.0.1:{port}/health").json()
        passes = after["passes"] - before["passes"]
        return {"batch": batch, "passes": passes, "rows_per_pass": (after["tokens"] - before["tokens"]) / passes,
                **result}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/llama7b-hf")
    parser.add_argument("--batches", default="1,8,32,128,256")
    parser.add_argument("--kv", default="device,host", help="where the batches' KV cache lives, one run each")
    parser.add_argument("--clients", type=int, default=64, help="the batcher's and the server's; 0: neither")
    parser.add_argument("--vram", default="4GB")
    parser.add_argument("--ram", default="16GB")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    build_checkpoint(args.model)  # once: a checkpoint already there is kept
    batches = [int(b) for b in args.batches.split(",")]
    budget = {"vram": args.vram, "ram": args.ram}
    rows = []
    for kv in args.kv.split(","):
        with open_model(args.model, budget, kv) as model:
            rows += batch_rows(model, batches, args.tokens, kv)
    print_rows(rows, args)
    if not args.clients:
        return
    continuous = []
    for kv in args.kv.split(","):
        with open_model(args.model, budget, kv) as model:
            continuous.append(batcher_row(model, args.clients, args.tokens, kv))
        print("RESULT " + json.dumps({"continuous": {k: v for k, v in continuous[-1].items() if k != "tokens"}}),
              flush=True)
        print(f"continuous batcher, {args.clients} at once, KV cache on the "
              f"{'host' if continuous[-1]['kv_on_host'] else 'device'}: {continuous[-1]['tokens_per_s']:.1f} "
              f"tokens/s over {continuous[-1]['passes']} passes (warm-up pass {continuous[-1]['warm_up_s']:.2f} s); "
              f"tokens as the first batcher's: {continuous[-1]['tokens'] == continuous[0]['tokens']}", flush=True)
    served = server_row(args.model, args.clients, args.tokens, args)
    print("RESULT " + json.dumps({"server": served}), flush=True)
    print(f"server (room for {served['batch']} sequences of the longest length), {args.clients} streaming clients: "
          f"{served['ok']} answered, {served['failed']} failed; {served['tokens_per_s']:.1f} tokens/s over "
          f"{served['passes']} passes of {served['rows_per_pass']:.1f} sequences on average; time per token p50 "
          f"{served['per_token_p50_s']:.3f} s, p99 {served['per_token_p99_s']:.3f} s", flush=True)
    batch_file = batchfile_row(args.model, args.clients, args.tokens, args)  # the same concurrency
    print("RESULT " + json.dumps({"batch file": batch_file}), flush=True)
    print(f"batch file, {batch_file['prompts']} prompts in batches of {args.clients}: "
          f"{batch_file['tokens_per_s']:.1f} tokens/s over the file, {batch_file['warm_batch_tokens_per_s']:.1f} over "
          f"its second batch", flush=True)
    if served["tokens_per_s"]:
        print(f"at {args.clients} sequences: the batch file's second batch "
              f"{batch_file['warm_batch_tokens_per_s'] / served['tokens_per_s']:.2f}x the server (target: at most "
              f"1.3x); the batcher: {continuous[0]['tokens_per_s'] / served['tokens_per_s']:.2f}x", flush=True)


def open_model(path: str, budget: dict, kv: str):
    """The model with its KV cache where `kv` says (`runtime.kv_cache`)."""
    import tierstore

    return tierstore.AutoModel.from_pretrained(path, budget=budget, config={"runtime": {"kv_cache": kv}})


def print_rows(rows: list[dict], args: argparse.Namespace) -> None:
    """The batch sweep's table: each row against batch 1, and a host cache's tokens against the device's."""
    one = next((row["tokens_per_s"] for row in rows if row["batch"] == 1 and "error" not in row), None)
    device_tokens = {row["batch"]: row["tokens"] for row in rows if row["kv"] == "device" and "error" not in row}
    print(f"vram {args.vram} / ram {args.ram}, {args.tokens} new tokens after {PROMPT_TOKENS}")
    print(f"{'batch':>5} {'KV cache':>8} {'s/pass':>8} {'tokens/s':>9} {'x batch 1':>9} {'resident':>8} "
          f"{'peak VRAM GB (alloc/reserved)':>12}  tokens as with the device's cache")
    for row in rows:
        if "error" in row:
            print(f"{row['batch']:>5} {row['kv']:>8} refused: {row['error']}")
            continue
        same = "" if row["kv"] == "device" or row["batch"] not in device_tokens else \
            str(row["tokens"] == device_tokens[row["batch"]])
        print(f"{row['batch']:>5} {'host' if row['kv_on_host'] else 'device':>8} {row['s_per_pass']:>8.3f} "
              f"{row['tokens_per_s']:>9.1f} {row['tokens_per_s'] / one if one else float('nan'):>9.1f} "
              f"{row['device_resident']:>8} {row['peak_vram_allocated'] / 1e9:>5.2f}/"
              f"{row['peak_vram_reserved'] / 1e9:<6.2f}  {same}", flush=True)

if __name__ == "__main__":
    main()
