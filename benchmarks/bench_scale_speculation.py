"""Speculative decoding at 72B byte cost on real language: tokens/s with a resident SmolLM2 draft against none, at
vram 4 GB with the model in RAM, one process.

The target is SmolLM2-135M-Instruct inflated as bench_speculation.py does, 14 times wide (hidden 8064, 126 query
and 42 key-value heads of 64), the MLP 29568 wide (Qwen2.5-72B's), and 80 layers deep: its 30, then 50 whose
weights are zero, so that each passes its input through. 71.5 B parameters, written as an nf4 layer store by
`write_store`, each unit padded and quantized on the GPU (no bf16 copy on disk, about 40 GB). Its function is
SmolLM2's with nf4 weights; the drafts are SmolLM2 as nf4, int8 and 3-bit stores and the GGUF's weights
unquantized ("bf16"), so draft and target differ as a real draft and target do (by quantization, here), and ngram
on prompts that ask to rewrite a paragraph (`spec_rows.REWRITES`); each model draft runs several chat prompts
(`--prompts`), each reported against its own no-draft row.

One device-tool call on nvidia-h200, the GGUF and bitsandbytes carried:
    python benchmarks/bench_scale_speculation.py --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT
Each row is one model object: a warm-up generate, then the measured one (greedy, chat template, 128 tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from common import Inflation
from spec_rows import (check_gguf, chosen_prompts, chosen_rows, codecs_of,
                       make_drafts, print_table, spec_config, speculation_rows)

FACTOR, INTER, LAYERS = 14, 29568, 80
STORE_DRAFTS = ("nf4", "int8", "q3_k", "q3_k_gptq")  # drafts written as layer stores (spec_rows.make_drafts)


def write_target(inflation: Inflation, store: str, codec: str, device) -> dict:
    """The inflated model as a layer store (kept when already written): seconds and bytes on disk."""
    import torch

    from tierstore.compression import Codec
    from tierstore.inference.loading.store_writer import write_store

    start = time.perf_counter()
    write_store(store, inflation.config, lambda key, names: {name: inflation.tensor(name, device) for name in names},
                torch.bfloat16, codec=Codec.create(codec) if codec != "none" else None, device=device,
                tokenizer=inflation.tokenizer, progress=False)
    nbytes = sum(entry.stat().st_size for entry in os.scandir(os.path.join(store, "units")))
    return {"write_s": time.perf_counter() - start, "store_bytes": nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--work", default="/tmp/scale-spec")
    parser.add_argument("--out", default=".")
    parser.add_argument("--vram", default="4GB")
    parser.add_argument("--ram", default="64GB")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--base-tokens", type=int, default=None,
                        help="new tokens of the no-draft rows (default --new-tokens): a streamed step's cost is flat")
    parser.add_argument("--prompts", default="3", help="the chat prompts each draft runs: how many, or "
                        "their numbers (\"1,2\")")
    parser.add_argument("--only", default="none,nf4,bf16,ngram",
                        help="comma-separated drafts to run (none, nf4, int8, q3_k, q3_k_gptq = q3_k by GPTQ on "
                             "rotated matrices, bf16 = the GGUF as is, ngram; a model draft + \"+compile\" runs it "
                             "compiled, + \"+ahead\" with speculation.ahead)")
    parser.add_argument("--codec", default="nf4", choices=["nf4", "int8", "none"])
    parser.add_argument("--factor", type=int, default=FACTOR, help="width multiple of the target")
    parser.add_argument("--inter", type=int, default=INTER, help="MLP width of the target")
    parser.add_argument("--layers", type=int, default=LAYERS, help="layers of the target (SmolLM2 has 30)")
    args = parser.parse_args()
    check_gguf(args.gguf)
    wanted = chosen_rows(args.only, (*STORE_DRAFTS, "bf16"))
    prompts = chosen_prompts(args.prompts)
    import torch

    import tierstore

    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    config = spec_config(args.work)
    budget = tierstore.Budget(vram=args.vram, ram=args.ram)
    store = os.path.join(args.work, "target")
    inflation = Inflation(args.gguf, args.factor, args.inter, args.layers)
    written = write_target(inflation, store, args.codec, device)
    del inflation
    print(f"target: {written['store_bytes'] / 1e9:.2f} GB, written in {written['write_s']:.1f} s", flush=True)
    drafts = make_drafts(args.gguf, args.work, config, codecs=codecs_of(wanted, set(STORE_DRAFTS)))
    rows = speculation_rows(store, drafts, wanted, prompts, args.new_tokens, budget, config,
                            base_tokens=args.base_tokens)
    with open(os.path.join(args.out, "scale_speculation.json"), "w") as handle:
        json.dump({"written": written, "rows": [{"draft": name, "prompt": number, **row}
                                                for name, number, row in rows]}, handle, indent=1)
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"\ncard: {card}; target {written['store_bytes'] / 1e9:.1f} GB ({args.codec}); vram {args.vram} / ram "
          f"{args.ram}; greedy, {args.new_tokens} new tokens")
    print_table(rows)


if __name__ == "__main__":
    main()
