"""The launch floor: decode steps replayed from a CUDA graph against eager steps and transformers, on one GPU.

One device-tool call (nvidia-h200):
    python benchmarks/bench_graphs.py --out $OUT
Builds the Llama-2-7B-shaped fp16 checkpoint (13.5 GB, random weights; bench_7b.py's), measures how fast the GPU
reads HBM (the resident bound: weight bytes over that rate), then in this one process, one row after another with
the same prompt: transformers with the model resident; tierstore with every unit on the device, eager
(`runtime.cuda_graphs = off`) and graphed (auto); the same in nf4; the streaming budgets, whose bound is the plan's;
and the graphed row with transformers' RMSNorm forward (`runtime.fused_norms = off`). A resident row's bound is the
bytes the device tier holds over the HBM read rate (for nf4 a floor: each matrix is also written and read
dequantized). Each row: decode s/token (mean step of the second of two calls), the bound, the ratio, whether the
steps were graphed, the host's ms per step, and whether the tokens equal the eager tierstore row of the same storage
(with the first difference).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from common import StepClock, build_checkpoint, first_difference, prompt_ids

ROWS = [  # (name, vram, ram, compression, cuda_graphs, fused_norms)
    ("tierstore resident, eager", "40GB", "16GB", "none", "off", "auto"),
    ("tierstore resident, graphed", "40GB", "16GB", "none", "auto", "auto"),
    ("tierstore nf4 resident, eager", "40GB", "16GB", "nf4", "off", "auto"),
    ("tierstore nf4 resident, graphed", "40GB", "16GB", "nf4", "auto", "auto"),
    ("tierstore 12 GB / 16 GB", "12GB", "16GB", "none", "auto", "auto"),
    ("tierstore 4 GB / 16 GB", "4GB", "16GB", "none", "auto", "auto"),
    ("tierstore resident, graphed, transformers' RMSNorm", "40GB", "16GB", "none", "auto", "off"),
]


MOE_ROWS = [  # the Qwen3-30B-A3B shape cut to 24 layers, every unit resident: experts kept inside their layers
    ("tierstore MoE resident, eager", "80GB", "16GB", "none", "off"),
    ("tierstore MoE resident, graphed", "80GB", "16GB", "none", "auto"),
]


def hbm_read_gbps(nbytes: int = 8 << 30, repeats: int = 10) -> float:
    """GB/s at which the GPU reads a large fp16 tensor (a sum: reads only)."""
    import torch

    data = torch.ones(nbytes // 2, dtype=torch.float16, device="cuda")
    data.sum()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        data.sum()
    torch.cuda.synchronize()
    rate = nbytes * repeats / (time.perf_counter() - start) / 1e9
    del data
    torch.cuda.empty_cache()
    return rate


def transformers_row(model_dir: str, ids, tokens: int, **kwargs) -> dict:
    """transformers' generate with the whole model on the GPU: the mean decode step of the second call."""
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cuda", **kwargs)
    for _ in range(2):
        clock = StepClock()
        out = model.generate(ids.cuda(), max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                             logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
        torch.cuda.synchronize()
    steps = [b - a for a, b in zip(clock.calls, clock.calls[1:])]
    del model
    torch.cuda.empty_cache()
    return {"s_per_token": sum(steps) / len(steps), "tokens": out[0].tolist(), "graphed": None}


def tierstore_row(model_dir: str, ids, tokens: int, vram: str, ram: str, compress: str, graphs: str,
                  cache: str, moe: bool = False, norms: str = "auto") -> dict:
    """tierstore's generate under a budget (`norms`: runtime.fused_norms): the report of the second call."""
    import torch

    import tierstore

    config = {"runtime": {"cache_dir": cache, "cuda_graphs": graphs, "fused_norms": norms},
              "compression": {"format": compress}}
    if moe:
        config["experts"] = {"streaming": False, "implementation": "grouped_mm"}
    torch.cuda.empty_cache()  # the rows share a process: an earlier row's cached blocks are not this row's peak
    torch.cuda.reset_peak_memory_stats()
    with tierstore.AutoModel.from_pretrained(model_dir, budget=tierstore.Budget(vram=vram, ram=ram), config=config,
                                             dtype=None if moe else torch.float16) as model:
        for _ in range(2):
            out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        report = model.report().to_dict()
    timing = report["timing"]
    return {"s_per_token": timing["decode_step_s"], "tokens": out[0].tolist(), "graphed": timing["graphed"],
            "host_step_s": timing["host_step_s"], "predicted_step_s": timing["predicted_step_s"],
            "peak_vram_gb": torch.cuda.max_memory_reserved() / 1e9, "notes": report["notes"][-3:],
            "device_weights_bytes": report["tiers"]["device"]["peak_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/llama7b-hf")
    parser.add_argument("--cache", default="/tmp/tierstore-bench-cache")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rows", default="all", help="comma-separated row numbers (0: transformers), or all")
    parser.add_argument("--moe", action="store_true",
                        help="the MoE rows instead (bench_moe.py's checkpoint, built in --moe-model)")
    parser.add_argument("--moe-model", default="/tmp/qwen3moe-24")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.moe:
        moe(args)
        return
    build_checkpoint(args.model)
    weights = sum(os.path.getsize(os.path.join(args.model, name)) for name in os.listdir(args.model)
                  if name.endswith(".safetensors"))
    import torch

    hbm = hbm_read_gbps()
    print(f"weights {weights / 1e9:.2f} GB (fp16); HBM read {hbm:.0f} GB/s; resident bound "
          f"{weights / hbm / 1e9 * 1e3:.2f} ms/token", flush=True)
    ids = prompt_ids(1)
    wanted = None if args.rows == "all" else {int(n) for n in args.rows.split(",")}
    results = []
    if wanted is None or 0 in wanted:
        row = transformers_row(args.model, ids, args.tokens, dtype=torch.float16)
        row.update(name="transformers resident", bound_s=weights / (hbm * 1e9))
        results.append(row)
        print("RESULT " + json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    for number, (name, vram, ram, compress, graphs, norms) in enumerate(ROWS, start=1):
        if wanted is not None and number not in wanted:
            continue
        try:
            row = tierstore_row(args.model, ids, args.tokens, vram, ram, compress, graphs, args.cache, norms=norms)
        except Exception as exc:  # noqa: BLE001 - a row that fails is reported, the others still run
            row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        row["name"] = name
        if "error" not in row:
            resident = vram == "40GB"
            # resident: the stored bytes read once from HBM (nf4 also writes and reads each matrix dequantized)
            row["bound_s"] = row["device_weights_bytes"] / (hbm * 1e9) if resident else row["predicted_step_s"]
        results.append(row)
        print("RESULT " + json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    print_table(results)


def moe(args: argparse.Namespace) -> None:
    """The MoE rows: transformers resident with grouped_mm, then tierstore eager and graphed."""
    import torch
    from bench_moe import SHAPE
    from bench_moe import build_checkpoint as build_moe

    build_moe(args.moe_model)
    weights = sum(os.path.getsize(os.path.join(args.moe_model, name)) for name in os.listdir(args.moe_model)
                  if name.endswith(".safetensors"))
    hbm = hbm_read_gbps()
    active = weights * (SHAPE["num_experts_per_tok"] / SHAPE["num_experts"])  # a floor: experts dominate the bytes
    print(f"weights {weights / 1e9:.2f} GB (bf16); HBM read {hbm:.0f} GB/s; a token reads at least its routed "
          f"experts (~{active / 1e9:.2f} GB of expert bytes): {active / hbm / 1e9 * 1e3:.2f} ms", flush=True)
    ids = torch.randint(100, SHAPE["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(1))
    results = [dict(transformers_row(args.moe_model, ids, args.tokens, dtype=torch.bfloat16,
                                     experts_implementation="grouped_mm"), name="transformers MoE resident")]
    print("RESULT " + json.dumps({k: v for k, v in results[0].items() if k != "tokens"}), flush=True)
    for name, vram, ram, compress, graphs in MOE_ROWS:
        try:
            row = tierstore_row(args.moe_model, ids, args.tokens, vram, ram, compress, graphs, args.cache, moe=True)
        except Exception as exc:  # noqa: BLE001 - a row that fails is reported, the others still run
            row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        row["name"] = name
        results.append(row)
        print("RESULT " + json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    print_table(results)
    eager, graphed = results[1], results[2]
    if "error" not in eager and "error" not in graphed and eager["tokens"] != graphed["tokens"]:
        print(margin_at_difference(args.moe_model, eager["tokens"], graphed["tokens"], dtype=torch.bfloat16,
                                   experts_implementation="grouped_mm"))


def margin_at_difference(model_dir: str, first: list[int], second: list[int], **kwargs) -> str:
    """Where two runs' tokens part, the two tokens' logits given the common prefix (transformers, resident): a
    margin near zero is a tie that kernels' rounding breaks either way."""
    import torch
    from transformers import AutoModelForCausalLM

    at = first_difference(first, second)
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cuda", **kwargs)
    with torch.no_grad():
        logits = model(torch.tensor([first[:at]], device="cuda")).logits[0, -1].float()
    top = torch.topk(logits, 2)
    del model
    torch.cuda.empty_cache()
    return (f"tokens part at position {at}: eager {first[at]} (logit {logits[first[at]]:.4f}), graphed {second[at]} "
            f"(logit {logits[second[at]]:.4f}); transformers' top two there: {top.indices.tolist()} "
            f"{[round(v, 4) for v in top.values.tolist()]}, margin {float(top.values[0] - top.values[1]):.4f}")


def print_table(results: list[dict]) -> None:
    eager = {r["name"]: r for r in results if "eager" in r["name"] and "error" not in r}
    print(f"\n{'row':<34} {'s/token':>8} {'bound s':>8} {'x bound':>7} {'graphed':>7} {'host ms':>7} "
          f"{'peak GB':>7}  same tokens as eager")
    for row in results:
        if "error" in row:
            print(f"{row['name']:<34} error: {row['error']}")
            continue
        base = eager.get(row["name"].replace("graphed", "eager"))
        same = "-" if base is None or base is row else \
            "yes" if row["tokens"] == base["tokens"] else \
            f"no, from token {first_difference(row['tokens'], base['tokens'])}"
        host = f"{row['host_step_s'] * 1e3:.2f}" if row.get("host_step_s") else "-"
        ratio = row["s_per_token"] / row["bound_s"] if row.get("bound_s") else float("nan")
        bound = f"{row['bound_s']:.4f}" if row.get("bound_s") else "-"
        print(f"{row['name']:<34} {row['s_per_token']:>8.4f} {bound:>8} {ratio:>7.2f} {str(row['graphed']):>7} "
              f"{host:>7} {row.get('peak_vram_gb', float('nan')):>7.2f}  {same}")
    for row in results:
        if row.get("notes"):
            print(f"{row['name']}: {row['notes']}")


if __name__ == "__main__":
    main()
