"""tierstore against transformers (resident), accelerate and AirLLM on a random-weight Llama-2-7B-shaped model.

One device-tool call (under 10 minutes on the lent H100):
    python benchmarks/bench_7b.py --out $OUT
Builds the fp16 checkpoint (13.5 GB, random weights) under --work, measures the links with tierstore's probe, then
runs each system in its own process (peak RSS from wait4, peak VRAM from torch) with the same prompt, and prints
one table: prefill s, decode s/token, ratio to the bound, peak VRAM, peak RSS, tokens equal to the resident run.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from common import (PROMPT_TOKENS, StepClock, build_checkpoint, drop_page_cache, prepare, prompt_ids, run_child,
                    vm_hwm_bytes)


def child(args: argparse.Namespace) -> None:
    """One system, one process: prints a JSON line with timings, peak VRAM and tokens."""
    import torch
    from transformers import LogitsProcessorList

    ids = prompt_ids(args.batch)
    new = args.tokens
    torch.cuda.reset_peak_memory_stats()
    setup_start = time.perf_counter()
    extra: dict = {}
    if args.system == "pair":
        pair_child(args, ids, new)
        return
    if args.system == "tierstore":
        import tierstore

        config = {"runtime": {"cache_dir": args.cache}, "compression": {"format": args.compress}}
        model = tierstore.AutoModel.from_pretrained(args.model, budget=tierstore.Budget(vram=args.vram, ram=args.ram),
                                                    config=config, dtype=torch.float16)
        setup_s = time.perf_counter() - setup_start
        clock = StepClock()
        out = model.generate(ids, max_new_tokens=new, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]))
        first_call = clock.summary()
        clock = StepClock()
        model.generate(ids, max_new_tokens=new, do_sample=False, logits_processor=LogitsProcessorList([clock]))
        report = model.report().to_dict()
        result = {**clock.summary(), "first_call": first_call, "predicted_s": report["timing"]["predicted_step_s"],
                  "bound": report["plan"]["predicted"]["bound"], "tiers": report["tiers"],
                  "regime": report["plan"]["regime"], "notes": report["notes"],
                  "report_decode_s_per_token": report["timing"]["decode_step_s"]}
        extra = {"plan_notes": report["plan"]["notes"], "setup_pin_s": model.store.transfer.setup_s,
                 **logits_error(model, args)}
    else:
        if args.system == "resident":
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16, device_map="cuda")
            if args.compress != "none":
                dequantize_layers(model, args.compress)
        elif args.system == "accelerate":
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16, device_map="auto",
                                                         max_memory={0: args.vram, "cpu": args.ram},
                                                         offload_folder=os.path.join(args.cache, "offload"))
        else:
            from airllm import AutoModel as AirModel
            model = AirModel.from_pretrained(args.model, layer_shards_saving_path=os.path.join(args.cache, "air"),
                                             max_seq_len=PROMPT_TOKENS + new + 8)
        setup_s = time.perf_counter() - setup_start
        calls = []
        for _ in range(1 if args.system == "airllm" else 2):  # AirLLM is too slow for a second call here
            clock = StepClock()
            with torch.no_grad():
                generated = model.generate(ids.cuda(), max_new_tokens=new, do_sample=False, use_cache=True,
                                           logits_processor=LogitsProcessorList([clock]))
            torch.cuda.synchronize()
            calls.append(clock.summary())
            if len(calls) == 1:  # tokens of the first call
                out = generated
        if hasattr(out, "sequences"):
            out = out.sequences
        result = {**calls[-1], "first_call": calls[0]}
        if args.system == "resident" and args.batch == 1 and args.compress == "none":  # the fp16 reference logits
            with torch.no_grad():
                logits = model(out.cuda()).logits[0, PROMPT_TOKENS - 1:-1].float().cpu()
            torch.save({"sequence": out.cpu(), "logits": logits}, os.path.join(args.cache, "reference_logits.pt"))
        elif args.system == "resident":
            extra = logits_error(model, args)
    result.update(setup_s=setup_s, peak_vram=torch.cuda.max_memory_allocated(),
                  tokens=out[:, PROMPT_TOKENS:].tolist(), peak_rss=vm_hwm_bytes(), **extra)
    print("RESULT " + json.dumps(result), flush=True)


def dequantize_layers(model, codec: str) -> None:
    """The decoder layers' matrices through bitsandbytes' own quantize/dequantize, in place: the model tierstore's
    compressed runs must reproduce, token for token."""
    import bitsandbytes.functional as F
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and param.dim() >= 2:
                if codec == "nf4":
                    q, state = F.quantize_4bit(param.data, blocksize=64, quant_type="nf4")
                    param.copy_(F.dequantize_4bit(q, state))
                else:
                    q, state = F.quantize_blockwise(param.data, blocksize=256)
                    param.copy_(F.dequantize_blockwise(q, state))


def logits_error(model, args: argparse.Namespace) -> dict:
    """Teacher-forced on the resident run's greedy sequence: relative logits error against fp16, top-1 agreement
    and the mean KL divergence of the next-token distributions."""
    import torch

    path = os.path.join(args.cache, "reference_logits.pt")
    if args.batch != 1 or not os.path.exists(path):
        return {}
    reference = torch.load(path)
    with torch.no_grad():
        got = model(reference["sequence"].cuda()).logits[0, PROMPT_TOKENS - 1:-1].float().cpu()
    want = reference["logits"]
    return {"logits_rel_error": ((got - want).norm() / want.norm()).item(),
            "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
            "kl_nats": torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                                  reduction="batchmean").item()}


def pair_child(args: argparse.Namespace, ids, new: int) -> None:
    """A budget that fits the whole model against the resident model, alternating in one process (the decode
    step here is CPU-launch-bound, and varies between processes more than the two differ)."""
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    import tierstore

    resident = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16, device_map="cuda")
    fits = tierstore.AutoModel.from_pretrained(args.model, budget=tierstore.Budget(vram=args.vram, ram=args.ram),
                                               config={"runtime": {"cache_dir": args.cache}}, dtype=torch.float16)
    steps = {"resident": [], "tierstore": []}
    tokens = {}
    for _ in range(6):
        for name, model in (("resident", resident), ("tierstore", fits)):
            clock = StepClock()
            with torch.no_grad():
                out = model.generate(ids.cuda(), max_new_tokens=new, do_sample=False,
                                     logits_processor=LogitsProcessorList([clock]))
            steps[name].append(clock.summary()["decode_s_per_token"])
            tokens[name] = out[:, PROMPT_TOKENS:].tolist()
    result = {"prefill_s": float("nan"), "decode_s_per_token": min(steps["tierstore"]),
              "resident_s_per_token": min(steps["resident"]), "all_steps": steps,
              "same_tokens": tokens["resident"] == tokens["tierstore"], "peak_vram": torch.cuda.max_memory_allocated(),
              "tokens": tokens["tierstore"], "setup_s": 0.0, "peak_rss": vm_hwm_bytes()}
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--system", default="tierstore")
    parser.add_argument("--model", default="/tmp/llama7b-hf")
    parser.add_argument("--cache", default="/tmp/tierstore-bench-cache")
    parser.add_argument("--vram", default="4GB")
    parser.add_argument("--ram", default="16GB")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compress", default="none", choices=["none", "nf4", "int8"])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", default=".")
    parser.add_argument("--only", default="", help="comma-separated run names")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    probe = prepare(args.out, args.cache, lambda: build_checkpoint(args.model))
    runs = [  # name, system, vram, ram, batch, tokens, drop cache, compression
        ("resident", "resident", "80GB", "100GB", 1, 16, False, "none"),
        ("resident nf4-dequantized", "resident", "80GB", "100GB", 1, 16, False, "nf4"),
        ("resident int8-dequantized", "resident", "80GB", "100GB", 1, 16, False, "int8"),
        ("tierstore 4GB/16GB", "tierstore", "4GB", "16GB", 1, 16, False, "none"),
        ("tierstore 4GB/16GB nf4", "tierstore", "4GB", "16GB", 1, 16, False, "nf4"),
        ("tierstore 4GB/16GB int8", "tierstore", "4GB", "16GB", 1, 16, False, "int8"),
        ("tierstore fits vs resident (same process)", "pair", "60GB", "16GB", 1, 16, False, "none"),
        ("tierstore 4GB/16GB b32", "tierstore", "4GB", "16GB", 32, 16, False, "none"),
        ("resident b32", "resident", "80GB", "100GB", 32, 16, False, "none"),
        ("tierstore 4GB/4GB disk", "tierstore", "4GB", "4GB", 1, 6, True, "none"),
        ("tierstore 4GB/4GB disk nf4", "tierstore", "4GB", "4GB", 1, 16, True, "nf4"),
        ("tierstore 1.5GB/1GB disk nf4", "tierstore", "1.5GB", "1GB", 1, 6, True, "nf4"),
        ("accelerate 4GiB/16GiB", "accelerate", "4GiB", "16GiB", 1, 8, False, "none"),
        ("airllm", "airllm", "-", "-", 1, 3, True, "none"),
    ]
    only = set(filter(None, args.only.split(",")))
    results = {}
    with open(os.path.join(args.out, "bench_log.txt"), "w") as log:
        for name, system, vram, ram, batch, tokens, drop, compress in runs:
            if only and name not in only:
                continue
            if drop:
                drop_page_cache()
            t0 = time.perf_counter()
            results[name] = run_child(["--system", system, "--model", args.model, "--cache", args.cache, "--vram",
                                       vram, "--ram", ram, "--batch", str(batch), "--tokens", str(tokens),
                                       "--compress", compress], log, script=__file__)
            results[name]["wall_s"] = time.perf_counter() - t0
            results[name]["batch"] = batch
            print(name, json.dumps({k: v for k, v in results[name].items() if k not in ("tokens", "tiers")}),
                  flush=True)
            with open(os.path.join(args.out, "bench_results.json"), "w") as handle:  # what finished, if cut off
                json.dump({"probe": probe, "results": results}, handle, indent=1)
    with open(os.path.join(args.out, "bench_results.json"), "w") as handle:
        json.dump({"probe": probe, "results": results}, handle, indent=1)
    print_table(results, probe)


def print_table(results: dict, probe: dict) -> None:
    references = {1: results.get("resident", {}).get("tokens"), 32: results.get("resident b32", {}).get("tokens")}
    floors = {1: results.get("resident", {}).get("decode_s_per_token"),
              32: results.get("resident b32", {}).get("decode_s_per_token")}
    pcie = results.get("tierstore 4GB/16GB", {}).get("predicted_s")
    print(f"\nh2d pinned {probe['h2d_pinned_gbps']:.1f} GB/s, pageable {probe['h2d_gbps']:.1f} GB/s, "
          f"disk {probe['disk_gbps']:.2f} GB/s")
    print("s/token: median decode step of the 2nd call; bound: max(plan's link bound, resident step of the same "
          "batch = compute floor); tokens: against the resident run of the same batch (compressed rows: against "
          "the resident model with bitsandbytes-dequantized layers); logit err/top1/KL: against fp16 resident")
    pair = results.get("tierstore fits vs resident (same process)", {})
    if "resident_s_per_token" in pair:
        print(f"fits vs resident in one process: {pair['decode_s_per_token']:.4f} vs {pair['resident_s_per_token']:.4f}"
              f" s/token = {pair['decode_s_per_token'] / pair['resident_s_per_token']:.2f}x, "
              f"tokens {'same' if pair['same_tokens'] else 'DIFFERENT'}")
    print(f"{'system':30} {'prefill':>7} {'s/token':>8} {'1st s/t':>8} {'tok/s':>7} {'link s':>7} {'bound':>7} "
          f"{'ratio':>5} {'VRAM GB':>7} {'RSS GB':>6} {'tokens':>8} {'logit err':>9} {'top1':>5} {'KL':>6} "
          f"{'vs fp16':>7}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:30} error: {r['error'][:100]}")
            continue
        link = r.get("predicted_s") or (pcie if not name.startswith("resident") else None)
        floor = floors.get(r["batch"]) if not name.startswith("resident") else None
        bound = max(x for x in (link, floor, 0.0) if x is not None) or None
        step = r["decode_s_per_token"]
        ratio = step / bound if bound and step else float("nan")
        codec = next((c for c in ("nf4", "int8") if name.endswith(c)), None)
        reference = results.get(f"resident {codec}-dequantized", {}).get("tokens") if codec else \
            references.get(r["batch"])
        if reference is None or name.startswith("resident"):
            same = "-"
        else:  # length of the common prefix of every row against the resident run of the same batch
            prefix = min(next((i for i, (a, b) in enumerate(zip(row, ref)) if a != b), len(row))
                         for row, ref in zip(r["tokens"], reference))
            same = "same" if prefix == len(r["tokens"][0]) else f"{prefix}/{len(r['tokens'][0])}"
        fp16 = results.get(name.replace(" nf4", "").replace(" int8", ""), {}) if name.endswith(("nf4", "int8")) else {}
        speedup = f"{fp16['decode_s_per_token'] / step:6.1f}x" if fp16.get("decode_s_per_token") else "-"
        first = r.get("first_call", {})
        print(f"{name[:30]:30} {first.get('prefill_s', r['prefill_s']):7.3f} {step:8.4f} "
              f"{first.get('decode_s_per_token', float('nan')):8.4f} {r['batch'] / step:7.2f} "
              f"{link or float('nan'):7.4f} {bound or float('nan'):7.4f} {ratio:5.2f} {r['peak_vram'] / 1e9:7.2f} "
              f"{r['peak_rss'] / 1e9:6.2f} {same:>8} {r.get('logits_rel_error', float('nan')):9.4f} "
              f"{r.get('top1_agreement', float('nan')):5.2f} {r.get('kl_nats', float('nan')):6.3f} {speedup:>7}")


if __name__ == "__main__":
    main()
