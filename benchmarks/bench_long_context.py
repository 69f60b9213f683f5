"""Long prompts within a 4 GB budget: Qwen2.5-7B's shape (bf16, context 131,072, random weights), one process
per row, each row's peak reserved VRAM (torch's, allocator cache included) beside its budget.

Rows are prompt tokens; `+whole` runs the prompt in one pass (runtime.prefill_chunk larger than the prompt: what
tierstore did before chunked prefill). One device-tool call on nvidia-h200:
    python benchmarks/bench_long_context.py --out $OUT --rows 1024 8192 32000 32000+whole 131000 16000+turns
`+host` keeps the KV cache in host RAM (runtime.kv_cache = "host"), `+disk` on disk (runtime.kv_cache = "disk"),
to compare with the device cache's tokens; `+ramNN` gives the row a RAM budget of NN GB (with auto, the KV layers
the RAM budget does not hold beside the weights go to disk); `+expand` runs the row with
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (tierstore's default since); `+chunkN` feeds the prompt N tokens
at a time (to compare tokens across KV tiers with the same arithmetic);
`+turns` is a conversation's second turn through the prefix cache (`runtime.prefix_cache_dir`): time to first token
with the first turn's KV cache reused, against the same length with nothing to reuse; `+serve` the same through the
batcher `tierstore serve` runs (prefixes in RAM), time counted from the request's submission, with the second turn
right after the first (its cache still on the device) and again after another request (from RAM); `+parts` adds
where each request's time went (`time_parts`: it waits for the device around each part, which delays the request);
`+pauseS` waits S seconds before each request (a user reading the answer): the rows without it send each request
the moment the last one's final token is out.
The store is written once under --work (15.2 GB, as bench_scale.py writes it); --shape tiny checks the script on
a CPU. Decode runs --tokens steps; the plan's bound for a step counts the weights and KV cache bytes it moves.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from bench_scale import write_random_store
from common import vm_hwm_bytes

CONTEXT = 131072


def child(args: argparse.Namespace) -> None:
    import torch

    import tierstore

    tokens, *flags = args.row.split("+")
    prompt = int(tokens)
    if "expand" in flags:  # before torch's CUDA allocator starts
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if "turns" in flags:  # nothing reused from an earlier run
        shutil.rmtree(os.path.join(args.work, "prefixes"), ignore_errors=True)
    whole = prompt + 1 if "whole" in flags else None
    chunk = next((int(flag[5:]) for flag in flags if flag.startswith("chunk")), whole)
    runtime = {"cache_dir": args.cache, **({"prefill_chunk": chunk} if chunk else {}),
               **({"prefix_cache_dir": os.path.join(args.work, "prefixes")} if "turns" in flags else {}),
               **({"prefix_cache_ram": "8GB"} if "serve" in flags else {}),
               **({"kv_cache": "host"} if "host" in flags else {}),
               **({"kv_cache": "disk", "kv_dir": os.path.join(args.work, "kv")} if "disk" in flags else {})}
    ram = next((f"{flag[3:]}GB" for flag in flags if flag.startswith("ram")), args.ram)
    model = tierstore.AutoModel.from_pretrained(args.store, budget=tierstore.Budget(vram=args.vram, ram=ram),
                                                config={"runtime": runtime})
    model.warm_up()
    vocab = model.model.config.get_text_config().vocab_size
    ids = torch.randint(100, vocab, (1, prompt), generator=torch.Generator().manual_seed(1))
    if "turns" in flags:
        turns(model, ids.to(model.device), args.tokens)
        return
    if "serve" in flags:
        pause_s = next((float(flag[5:]) for flag in flags if flag.startswith("pause")), 0.0)
        serve_turns(model, ids[0].tolist(), args.tokens, timed="parts" in flags, pause_s=pause_s)
        return
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
    wall_s = time.perf_counter() - start
    report = model.report().to_dict()
    timing = report["timing"]
    cuda = torch.cuda.is_available()
    result = {"prompt": prompt, "prefill_s": timing["prefill_s"], "decode_s_per_token": timing["decode_step_s"],
              "wall_s": wall_s, "notes": report["notes"], "plan_notes": report["plan"]["notes"],
              "h2d_bytes_per_pass": report["plan"]["h2d_bytes_per_pass"], "predicted": report["plan"]["predicted"],
              "tokens": out[0, prompt:].tolist(), "peak_rss": vm_hwm_bytes(), "kv": report["kv"],
              "peak_vram_reserved": torch.cuda.max_memory_reserved() if cuda else 0,
              "peak_vram_allocated": torch.cuda.max_memory_allocated() if cuda else 0}
    model.close()
    print("RESULT " + json.dumps(result), flush=True)


def turns(model, first, new_tokens: int) -> None:
    """A conversation's second turn (the first turn's prompt and answer, then 64 new tokens) with its prefix in the
    prefix cache, against the same length with nothing to reuse (its first token changed)."""
    import torch

    out = model.generate(first, max_new_tokens=new_tokens, do_sample=False)
    first_s = model.report().to_dict()["timing"]["prefill_s"]
    more = torch.randint(100, 1000, (1, 64), generator=torch.Generator().manual_seed(2))
    second = torch.cat([out, more.to(out.device)], dim=1)
    fresh = second.clone()
    fresh[0, 0] += 1
    model.generate(fresh, max_new_tokens=1, do_sample=False)
    without_s = model.report().to_dict()["timing"]["prefill_s"]
    model.generate(second, max_new_tokens=1, do_sample=False)
    report = model.report().to_dict()
    stats = model.prefix_cache().stats
    result = {"prompt": second.shape[1], "first_turn_prefill_s": first_s, "second_turn_without_reuse_s": without_s,
              "second_turn_with_reuse_s": report["timing"]["prefill_s"], "hits": stats.hits,
              "tokens_saved": stats.tokens_saved, "notes": report["notes"],
              "peak_vram_reserved": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0}
    model.close()
    print("RESULT " + json.dumps(result), flush=True)


def serve_turns(model, first: list[int], new_tokens: int, timed: bool, pause_s: float) -> None:
    """The same through the batcher `tierstore serve` runs (no HTTP): time from submitting a request to its first
    token for, in this order, a prompt of the second turn's length with nothing to reuse (the server's first
    request), the first turn, the second turn (its first turn's cache kept on the device), another user's short
    request, and a second turn again (another continuation of the first turn, now from RAM)."""
    import threading

    import torch
    from tierstore.inference.front.batcher import Batcher, SamplingParams
    from tierstore.inference.placement.kv import largest_batch

    max_seq = len(first) + new_tokens + 80
    largest_batch(model, 1, max_seq)
    batcher = Batcher(model, max_batch=1, max_queue=4, max_seq_tokens=max_seq)
    seconds = time_parts(batcher) if timed else {}
    parts: dict[str, dict[str, float]] = {}

    def first_token_s(name: str, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
        done, stamps = threading.Event(), []

        def on_event(event) -> None:
            stamps.append(time.perf_counter())
            if event.finish_reason:
                done.set()
        time.sleep(pause_s)  # a client's time between an answer and its next request
        seconds.clear()
        start = time.perf_counter()
        sequence = batcher.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), on_event)
        done.wait(600)
        parts[name] = {part: value - start if part.endswith(" began") else value for part, value in seconds.items()}
        return stamps[0] - start, sequence.tokens

    def words(count: int, seed: int) -> list[int]:
        return torch.randint(100, 1000, (count,), generator=torch.Generator().manual_seed(seed)).tolist()

    try:
        without_s, _ = first_token_s("without", [first[0] + 1, *first[1:], *words(new_tokens + 64, 4)], 1)
        first_s, answer = first_token_s("first", first, new_tokens)
        second = first + answer + words(64, 2)
        with_s, _ = first_token_s("with", second, 1)
        first_token_s("another request", words(64, 5), 1)
        again_s, _ = first_token_s("with, from RAM", first + answer + words(64, 3), 1)
        stats = batcher.prefixes.stats
        result = {"prompt": len(second), "first_turn_prefill_s": first_s, "h2d_bytes_per_pass":
                  model.plan.h2d_bytes_per_pass, "second_turn_without_reuse_s": without_s,
                  "second_turn_with_reuse_s": with_s, "second_turn_after_another_request_s": again_s,
                  "hits": stats.hits, "tokens_saved": stats.tokens_saved, "hits_on_device": stats.on_device,
                  "pause_s": pause_s, "notes": [], "seconds_by_part": parts,
                  "peak_vram_reserved": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0}
    finally:
        batcher.close()
        model.close()
    print("RESULT " + json.dumps(result), flush=True)


def time_parts(batcher) -> dict[str, float]:
    """Seconds spent in the parts of a request's way to its first token, added up by name until cleared: the
    prefix lookup (with its wait for the copies before it), the restore to the device, the prompt's feeding (and
    the store's re-plans for its chunks, within it), and on the prefix cache's thread the copies to RAM (the
    batcher's parts are timed to the device's completion); for the batcher's own steps, when each began."""
    import torch
    from tierstore.inference.front import batcher as batcher_module
    from tierstore.inference.runtime import prefix_cache

    seconds: dict[str, float] = {}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(owner, name: str, synced: bool) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if synced:
                sync()
            start = time.perf_counter()
            seconds.setdefault(name + " began", start)
            try:
                return original(*args, **kwargs)
            finally:
                if synced:
                    sync()
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        setattr(owner, name, wrapper)

    if batcher.prefixes is not None:
        timed(batcher.prefixes, "lookup", True)
    timed(batcher_module, "restore", True)
    timed(batcher_module, "feed_prompt", True)
    timed(batcher.model.store, "replan", True)
    timed(prefix_cache, "copy_to_host", False)
    for name in ("_step", "_join_apart", "_emit"):
        timed(batcher, name, False)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--row")
    parser.add_argument("--store")
    parser.add_argument("--rows", nargs="+", default=["1024", "8192", "32000", "32000+whole", "131000"])
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--vram", default="4GB")
    parser.add_argument("--ram", default="64GB")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--work", default="/tmp/tierstore-long")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    args.cache = os.path.join(args.work, "cache")
    if args.child:
        child(args)
        return
    import subprocess
    import sys

    import torch

    from tierstore.probe import run_probe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.work, f"{args.shape}-long")
    probe = run_probe(args.cache, torch.device(device), disk_nbytes=2 * 2**30 if device == "cuda" else 64 * 2**20)
    print("probe", json.dumps(probe), flush=True)
    written = write_random_store(store, args.shape, "none", device, context=CONTEXT)
    print(f"store {store}: {written['store_bytes'] / 1e9:.2f} GB, written in {written['write_s']:.1f} s", flush=True)
    results = {"probe": probe, "store": written, "vram": args.vram, "ram": args.ram, "rows": {}}
    for row in args.rows:
        argv = [sys.executable, __file__, "--child", "--row", row, "--store", store, "--vram", args.vram, "--ram",
                args.ram, "--tokens", str(args.tokens), "--work", args.work]
        proc = subprocess.run(argv, capture_output=True, text=True)
        line = next((text for text in proc.stdout.splitlines() if text.startswith("RESULT ")), None)
        r = json.loads(line[7:]) if line else {"error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
        results["rows"][row] = r
        with open(os.path.join(args.out, "long_context.json"), "w") as handle:
            json.dump(results, handle, indent=1)
        if "error" in r:
            print(f"{row}: error {r['error']}", flush=True)
            continue
        if "second_turn_with_reuse_s" in r:
            print(f"{row}: second turn of {r['prompt']} tokens: time to first token "
                  f"{r['second_turn_with_reuse_s']:.3f} s with the prefix cache ({r['tokens_saved']} tokens reused, "
                  f"{r.get('hits_on_device', 0)} of {r['hits']} hits from the cache kept on the device) "
                  f"against {r['second_turn_without_reuse_s']:.3f} s without "
                  f"({r['second_turn_without_reuse_s'] / r['second_turn_with_reuse_s']:.1f}x); the first turn's "
                  f"{r['first_turn_prefill_s']:.3f} s; peak reserved {r['peak_vram_reserved'] / 1e9:.2f} GB",
                  flush=True)
            if "h2d_bytes_per_pass" in r and device == "cuda":
                pass_s = r["h2d_bytes_per_pass"] / (probe["h2d_pinned_gbps"] * 1e9)
                print(f"{row}: a hit is one weight pass: {r['h2d_bytes_per_pass'] / 1e9:.2f} GB over the link, "
                      f"{pass_s:.3f} s at the probe's pinned rate; so no hit beats {pass_s:.3f} s and no ratio "
                      f"{r['second_turn_without_reuse_s'] / pass_s:.1f}x", flush=True)
            if "second_turn_after_another_request_s" in r:
                print(f"{row}: a second turn after another request ran, from RAM: "
                      f"{r['second_turn_after_another_request_s']:.3f} s "
                      f"({r['second_turn_without_reuse_s'] / r['second_turn_after_another_request_s']:.1f}x)",
                      flush=True)
            for request, parts in r.get("seconds_by_part", {}).items():
                print(f"{row}: {request}: " + ", ".join(f"{name} {s:.3f} s" for name, s in parts.items()), flush=True)
            continue
        step = r["predicted"].get("step_s")
        kv = r["kv"]
        link_bytes = r["h2d_bytes_per_pass"] + kv["moved_bytes_per_pass"]
        bound_s = max(link_bytes / (probe["h2d_pinned_gbps"] * 1e9) if device == "cuda" else 0,
                      kv["disk_bytes_per_pass"] / (probe["disk_gbps"] * 1e9))
        print(f"{row}: KV cache {kv['tier']} ({kv['tier_bytes']}), per decode pass {link_bytes / 1e9:.2f} GB over the "
              f"link (weights {r['h2d_bytes_per_pass'] / 1e9:.2f}, KV {kv['moved_bytes_per_pass'] / 1e9:.2f}), "
              f"{kv['disk_bytes_per_pass'] / 1e9:.2f} GB of KV from disk: bound {bound_s:.3f} s, decode "
              f"{r['decode_s_per_token'] / bound_s if bound_s else float('nan'):.2f}x it", flush=True)
        tokens, *flags = row.split("+")  # the row with the KV cache on the device and the same prompt feeding
        base = "+".join([tokens, *(flag for flag in flags if flag.startswith("chunk") or flag == "whole")])
        plain = results["rows"].get(base, {})
        if row != base and "tokens" in plain:
            same = "the same tokens" if plain["tokens"] == r["tokens"] else f"tokens DIFFER: {r['tokens']}"
            print(f"{row}: {same} as row {base}", flush=True)
        print(f"{row}: peak reserved {r['peak_vram_reserved'] / 1e9:.2f} GB (budget {args.vram}), prefill "
              f"{r['prefill_s']:.2f} s, decode {r['decode_s_per_token']:.3f} s/token (plan's weight bound "
              f"{step}), peak RSS {r['peak_rss'] / 1e9:.1f} GB; notes: {'; '.join(r['notes'])}", flush=True)


if __name__ == "__main__":
    main()
