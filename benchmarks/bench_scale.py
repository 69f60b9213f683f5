"""The headline at full scale: a Qwen2.5-72B-shaped model in nf4 on a 4 GB GPU, what a token costs as RAM grows,
and what setting it up costs.

The store is written once under --work by `write_store`: random weights generated on the GPU one unit at a time
and quantized there, so no bf16 copy ever reaches the disk (72B nf4: 44.5 GB, of which the bf16 embedding
and output layer are 5 GB). A killed write resumes. Then each row is one process (peak RSS and VRAM its own):
open the store under the row's budget, generate, and report the median decode step against the plan's bound.

Two device-tool calls on nvidia-h200 (128 GiB RAM, about 47 GB of free disk), the second while the machine is
warm (else it writes the store again):
    python benchmarks/bench_scale.py --out $OUT --rows 4GB/64GB+drop+b32 4GB/16GB+drop 4GB/32GB+drop 8GB/64GB
    python benchmarks/bench_scale.py --out $OUT --rows ...   (the rows the first call's time limit cut)
A row is VRAM/RAM, then +drop (drop the page cache first: set-up from a cold disk, and a disk-bound row reads
past the cache) and +bN (a batch of N prompts after the single prompt, in the same process). --shape 405b is
Llama-3.1-405B's shape (234 GB in nf4), --shape 7b Qwen2.5-7B's; --shape tiny checks the script on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import zlib

from common import (PROMPT_TOKENS, StepClock, drop_page_cache, run_child, vm_hwm_bytes,
                      vm_rss_bytes, word_tokenizer)

SHAPES = {  # model type, config fields
    "72b": ("qwen2", {"num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 29568,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064}),
    "405b": ("llama", {"num_hidden_layers": 126, "hidden_size": 16384, "intermediate_size": 53248,
                       "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256}),
    "7b": ("qwen2", {"num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064}),
    "tiny": ("qwen2", {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}),
}
WEIGHT_STD = 0.02
PROGRESS_UNITS = 512  # write_random_store prints a line each time it has been asked for this many units


def model_config(shape: str, context: int = 4096):
    from transformers import AutoConfig

    model_type, fields = SHAPES[shape]
    return AutoConfig.for_model(model_type, **fields, max_position_embeddings=context, tie_word_embeddings=False,
                                dtype="bfloat16")


def write_random_store(store: str, shape, codec: str, device: str, context: int = 4096) -> dict:
    """The store of `shape` (a SHAPES name, or a transformers config) with random weights made on `device` unit by
    unit (seeded by the unit's key, so a resumed write makes the same bytes); returns the seconds it took and its
    bytes on disk."""
    import torch

    from tierstore.compression import Codec
    from tierstore.inference.loading.skeleton import parse_slice
    from tierstore.inference.loading.store_writer import write_store

    config = model_config(shape, context) if isinstance(shape, str) else shape
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM
        shapes = {name: tuple(p.shape) for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}

    def tensor_shape(name: str) -> tuple[int, ...]:
        """A tensor's shape; `name[e]`: expert e's slice of a fused experts tensor (an expert unit's)."""
        fused, expert = parse_slice(name)
        return shapes[fused] if expert is None else shapes[fused][1:]

    asked, start = [0], time.perf_counter()

    def unit_tensors(key: str, names: list[str]) -> dict[str, torch.Tensor]:
        asked[0] += 1
        if asked[0] % PROGRESS_UNITS == 0:  # a line now and then: a killed write shows how far it got, at what pace
            print(f"  {asked[0] - 1} units written in {time.perf_counter() - start:.1f} s", flush=True)
        gen = torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(tensor_shape(name), dtype=torch.bfloat16, device=device)
            else:
                tensors[name] = (torch.randn(tensor_shape(name), generator=gen, device=device) * WEIGHT_STD).bfloat16()
        return tensors

    write_store(store, config, unit_tensors, torch.bfloat16, codec=Codec.create(codec) if codec != "none" else None,
                device=device, tokenizer=word_tokenizer(config.vocab_size))
    nbytes = sum(entry.stat().st_size for entry in os.scandir(os.path.join(store, "units")))
    return {"write_s": time.perf_counter() - start, "store_bytes": nbytes}


def parse_row(row: str) -> dict:
    """'4GB/16GB+drop+b32' -> budgets, whether to drop the page cache, the batch sizes to run."""
    budget, *flags = row.split("+")
    vram, ram = budget.split("/")
    batches = [1] + [int(flag[1:]) for flag in flags if flag.startswith("b")]
    unknown = [flag for flag in flags if flag != "drop" and not flag.startswith("b")]
    if unknown:
        raise SystemExit(f"row {row!r}: unknown flag {unknown[0]!r} (use +drop or +bN)")
    return {"vram": vram, "ram": ram, "drop": "drop" in flags, "batches": batches}


def child(args: argparse.Namespace) -> None:
    """One row: open the store under its budget, then one generate call per batch size; prints a RESULT line."""
    import torch
    from transformers import LogitsProcessorList

    import tierstore

    row = parse_row(args.row)
    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    model = tierstore.AutoModel.from_pretrained(args.store, budget=tierstore.Budget(vram=row["vram"], ram=row["ram"]),
                                                config={"runtime": {"cache_dir": args.cache}})
    open_s = time.perf_counter() - start
    rss = {"after open": vm_rss_bytes(), "peak after open": vm_hwm_bytes()}
    plan = model.report().to_dict()["plan"]
    result = {"open_s": open_s, "pin_s": model.store.transfer.setup_s, "regime": plan["regime"],
              "units": {tier: len(plan[tier]) for tier in ("device_resident", "host_resident", "streamed_from_host",
                                                         "streamed_from_disk")},
              "h2d_bytes_per_pass": plan["h2d_bytes_per_pass"], "disk_bytes_per_pass": plan["disk_bytes_per_pass"],
              "predicted": plan["predicted"], "plan_notes": plan["notes"], "batches": {}}
    vocab = model.model.config.get_text_config().vocab_size
    for batch in row["batches"]:
        ids = torch.randint(100, vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
        tokens = args.batch_tokens if batch > 1 else args.disk_tokens if plan["disk_bytes_per_pass"] else args.tokens
        clock = StepClock()
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]))
        result["batches"][batch] = {**clock.summary(), "tokens": out[:, PROMPT_TOKENS:].tolist()}
        rss[f"after batch {batch}"] = vm_rss_bytes()
    result["first_token_s"] = open_s + result["batches"][1]["prefill_s"]
    result["tiers"] = {name: {"peak_bytes": tier["peak_bytes"], "budget_bytes": tier["budget_bytes"]}
                       for name, tier in model.report().to_dict()["tiers"].items()}
    model.close()
    result.update(rss=rss, peak_vram_allocated=torch.cuda.max_memory_allocated() if cuda else 0,
                  peak_vram_reserved=torch.cuda.max_memory_reserved() if cuda else 0, peak_rss=vm_hwm_bytes())
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--row", help="(child) the row to run")
    parser.add_argument("--store", help="(child) the store")
    parser.add_argument("--shape", default="72b", choices=sorted(SHAPES))
    parser.add_argument("--codec", default="nf4", choices=["nf4", "int8", "none"])
    parser.add_argument("--rows", nargs="+", default=["4GB/64GB+b32"])
    parser.add_argument("--tokens", type=int, default=6, help="new tokens for the single prompt")
    parser.add_argument("--disk-tokens", type=int, default=4, help="new tokens where a pass reads the disk")
    parser.add_argument("--batch-tokens", type=int, default=8, help="new tokens for a batch")
    parser.add_argument("--work", default="/tmp/tierstore-scale")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    cache = os.path.join(args.work, "cache")
    if args.child:
        args.cache = cache
        child(args)
        return
    import torch

    from tierstore.probe import run_probe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [(row, parse_row(row)) for row in args.rows]
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.work, f"{args.shape}-{args.codec}")
    probe = run_probe(cache, torch.device(device), disk_nbytes=2 * 2**30 if device == "cuda" else 64 * 2**20)
    print("probe", json.dumps(probe), flush=True)
    written = write_random_store(store, args.shape, args.codec, device)
    print(f"store {store}: {written['store_bytes'] / 1e9:.2f} GB, written in {written['write_s']:.1f} s", flush=True)
    results: dict = {"probe": probe, "store": written, "shape": args.shape, "codec": args.codec, "rows": {}}
    with open(os.path.join(args.out, "scale_log.txt"), "a") as log:
        for name, row in rows:
            if row["drop"]:
                drop_page_cache()
            results["rows"][name] = run_child(["--row", name, "--store", store, "--tokens", str(args.tokens),
                                               "--disk-tokens", str(args.disk_tokens),
                                               "--batch-tokens", str(args.batch_tokens), "--work", args.work],
                                              log, script=__file__)
            with open(os.path.join(args.out, "scale_results.json"), "w") as handle:  # what finished, if cut off
                json.dump(results, handle, indent=1)
            print_row(name, results["rows"][name], results["rows"])


def print_row(name: str, r: dict, rows: dict) -> None:
    """One line per batch: s/token against the plan's bound, peaks against the budgets, tokens against the first
    row of the same batch."""
    if "error" in r:
        print(f"{name}: error: {r['error']}", flush=True)
        return
    bound = r["predicted"].get("step_s")
    print(f"{name}: open {r['open_s']:.1f} s (pinning {r['pin_s']:.1f} s), first token {r['first_token_s']:.1f} s, "
          f"plan {r['regime']} {r['units']}, h2d {r['h2d_bytes_per_pass'] / 1e9:.2f} GB + disk "
          f"{r['disk_bytes_per_pass'] / 1e9:.2f} GB per pass, bound {bound} ({r['predicted'].get('bound')}), "
          f"peak VRAM {r['peak_vram_reserved'] / 1e9:.2f} GB reserved, peak RSS {r['peak_rss'] / 1e9:.2f} GB",
          flush=True)
    first = next(iter(rows.values()))
    for batch, b in r["batches"].items():
        step = b["decode_s_per_token"]
        reference = first.get("batches", {}).get(batch, {}).get("tokens")
        length = min(len(b["tokens"][0]), len(reference[0])) if reference else 0  # rows make different lengths
        same = "-" if reference is None else "same" if all(
            mine[:length] == theirs[:length] for mine, theirs in zip(b["tokens"], reference)) else "DIFFERENT"
        ratio = f"{step / bound:.2f}x bound" if bound else "no bound"
        print(f"  batch {batch}: prefill {b['prefill_s']:.2f} s, decode {step:.3f} s/step ({ratio}), "
              f"{int(batch) / step:.2f} tokens/s, tokens {same} (vs {next(iter(rows))})", flush=True)


if __name__ == "__main__":
    main()
