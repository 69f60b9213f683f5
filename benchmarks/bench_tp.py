"""Tensor-parallel streaming on 1, 2 and 4 GPUs: s/token of `tierstore generate --tp N` at the same per-GPU
budget, against its bound: the larger of bytes per link over the pinned GB/s each link reaches while all N copy at
once, and the step of the same N ranks with every weight resident.

Two targets, one device-tool call each on nvidia-h200-x4:
    python benchmarks/bench_tp.py --out $OUT --ranks 1,2,4
        the Llama-2-7B-shaped random-weight model (13.5 GB), built first as bench_7b.py does; a word-level prompt;
    python benchmarks/bench_tp.py --out $OUT --ranks 1,2,4 --gguf SmolLM2-135M-Instruct.Q4_1.gguf
        real language at 7B byte cost: SmolLM2 inflated as bench_speculation.py does, but 8 times wide (hidden
        4608, 72 query and 24 key-value heads, so 2 and 4 ranks divide them; 12.4 GB bf16); a chat question.
Prints one table: N, s/token, speed-up over N = 1, host->device bytes per link per pass, the concurrent pinned
GB/s per link, the link bound, the resident step, the ratio to the larger of the two, and whether the tokens equal
N = 1's (with the first difference). The resident step is the same N ranks with every weight on their GPUs
(--resident-vram): a pass's kernel launches and collectives, the floor that more links do not lower.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from common import QUESTION, build_checkpoint, first_difference, inflate, prompt_text

TP_WIDTH_FACTOR = 8  # SmolLM2's 9 query and 3 key-value heads times 8: divisible by 2, 4 and 8 ranks


def concurrent_pinned_gbps(devices: int, nbytes: int = 2 << 30, repeats: int = 5) -> float:
    """Pinned host->device GB/s of one link while `devices` links copy at once (the median link's rate)."""
    import torch

    sources = [torch.empty(nbytes, dtype=torch.uint8).pin_memory() for _ in range(devices)]
    targets = [torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{i}") for i in range(devices)]
    rates = [0.0] * devices
    barrier = threading.Barrier(devices)

    def copy(index: int) -> None:
        torch.cuda.set_device(index)
        stream = torch.cuda.Stream()
        barrier.wait()
        start = time.perf_counter()
        with torch.cuda.stream(stream):
            for _ in range(repeats):
                targets[index].copy_(sources[index], non_blocking=True)
        stream.synchronize()
        rates[index] = nbytes * repeats / (time.perf_counter() - start) / 1e9

    threads = [threading.Thread(target=copy, args=(i,)) for i in range(devices)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(rates)[len(rates) // 2]


def run_ranks(model: str, ranks: int, vram: str, args: argparse.Namespace) -> dict:
    """`tierstore generate --tp ranks` on the target's prompt at `vram` per GPU: its report and the start of its
    answer."""
    report = os.path.join(args.out, f"{args.tag}-tp{ranks}-{vram}.json")
    if args.gguf:
        prompt = ["--prompt", QUESTION]
    else:
        prompt = ["--prompt", prompt_text(), "--no-chat-template"]
    command = [sys.executable, "-m", "tierstore", "generate", model, *prompt, "--max-new-tokens", str(args.tokens),
               "--vram", vram, "--ram", args.ram, "--report-json", report, "--config", args.config]
    if ranks > 1:
        command += ["--tp", str(ranks)]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        return {"error": (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]}
    with open(report) as handle:
        data = json.load(handle)
    return {"s_per_token": data["timing"]["decode_step_s"], "h2d_bytes_per_pass": data["plan"]["h2d_bytes_per_pass"],
            "disk_bytes_per_pass": data["plan"]["disk_bytes_per_pass"], "tokens": data["tokens"],
            "answer": data["text"][0][:240], "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="where the target is built (default /tmp/llama7b-hf, or /tmp/smollm2-tp "
                                         "with --gguf)")
    parser.add_argument("--gguf", help="SmolLM2-135M-Instruct's GGUF: the target is it, inflated")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--vram", default="4GB", help="per GPU")
    parser.add_argument("--ram", default="16GB", help="per rank")
    parser.add_argument("--resident-vram", default="60GB",
                        help="per GPU, for the resident step: room for every weight ('' to skip it)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    import torch

    os.makedirs(args.out, exist_ok=True)
    args.tag = "smollm2" if args.gguf else "llama7b"
    args.model = args.model or f"/tmp/{'smollm2-tp' if args.gguf else 'llama7b-hf'}"
    if args.gguf:  # once: a target already there is kept
        inflate(args.gguf, args.model, factor=TP_WIDTH_FACTOR)
    else:
        build_checkpoint(args.model)
    args.config = os.path.join(args.out, "tp.toml")
    with open(args.config, "w") as handle:
        handle.write('[runtime]\ncache_dir = "/tmp/tierstore-bench-cache"\n')
    rows = []
    for ranks in [int(n) for n in args.ranks.split(",") if int(n) <= torch.cuda.device_count()]:
        link = concurrent_pinned_gbps(ranks)
        result = run_ranks(args.model, ranks, args.vram, args)
        result.update(ranks=ranks, link_gbps=link)
        if "error" not in result:
            result["link_bound_s"] = result["h2d_bytes_per_pass"] / (link * 1e9)
            resident = run_ranks(args.model, ranks, args.resident_vram, args) if args.resident_vram else {}
            result["resident_s"] = resident.get("s_per_token")  # None: not measured, or its run's error below
            result["resident_error"] = resident.get("error")
            result["bound_s"] = max(result["link_bound_s"], result["resident_s"] or 0.0)
        rows.append(result)
        print("RESULT " + json.dumps(result), flush=True)
    base = rows[0] if rows and "error" not in rows[0] else None
    print(f"{'N':>2} {'s/token':>8} {'speed-up':>8} {'GB/link/pass':>12} {'link GB/s':>9} {'link bound':>10} "
          f"{'resident':>8} {'x bound':>7}  same tokens")
    for row in rows:
        if "error" in row:
            print(f"{row['ranks']:>2} error: {row['error']}")
            continue
        speed = base["s_per_token"] / row["s_per_token"] if base else float("nan")
        ratio = row["s_per_token"] / row["bound_s"] if row["bound_s"] else float("nan")
        same = "n/a" if base is None else same_tokens(row["tokens"][0], base["tokens"][0])
        resident = "-" if row["resident_s"] is None else f"{row['resident_s']:.4f}"
        print(f"{row['ranks']:>2} {row['s_per_token']:>8.4f} {speed:>8.2f} {row['h2d_bytes_per_pass'] / 1e9:>12.2f} "
              f"{row['link_gbps']:>9.1f} {row['link_bound_s']:>10.4f} {resident:>8} {ratio:>7.2f}  {same}")
        if row["resident_error"]:
            print(f"   resident step: {row['resident_error']}")
    for row in rows:
        if "answer" in row:
            print(f"N={row['ranks']}: {row['answer']}")


def same_tokens(tokens: list[int], reference: list[int]) -> str:
    """"yes" when two runs gave the same tokens, else where they first part."""
    if tokens == reference:
        return "yes"
    at = first_difference(tokens, reference)
    return f"no, from token {min(len(tokens), len(reference)) if at is None else at}"


if __name__ == "__main__":
    main()
