"""Every weight format at the 7B shape on one GPU: a layer's dequantization against the copy its bytes take, and a
decode step against its link bound.

One device call (nvidia-h200, about 6 minutes):
    python benchmarks/bench_formats.py --out $OUT --formats bf16,nf4,int8,Q8_0,Q6_K,Q5_K,Q4_K,Q4_0,Q3_K,Q2_K
1. For each GGUF format (ggml.py): one Qwen2.5-7B layer's matrices as random valid blocks, dequantized into bf16 on
   the GPU as a pass does it (one kernel per run of one format: Triton's for the k-quants, ggml_triton.py,
   torch.compile's for the others), the same with each matrix turned back from its Hadamard rotation afterwards
   (what `compression.rotation = "hadamard"` adds, rotation.py), by torch.compile's kernel (the k-quants'
   baseline) and one op at a time,
   against the time the layer's packed bytes take to cross the pinned link (tierstore's probe). A format pays off
   only when its dequantization is shorter than that copy.
2. For each format, a random-weight Qwen2.5-7B-shaped store (bf16 and tierstore's compression formats, e.g. nf4 or
   q4_k_m, written and quantized on the GPU by bench_scale's `write_random_store`; a GGUF format in upper case as a
   ggml store: random blocks, as a GGUF would hold them) is opened in a
   child process at vram 4 GB / ram 64 GB: everything in pinned RAM, so a pass is bound by the link. Prints the median
   decode step against the plan's bound, the bytes per pass and the peak VRAM. The store is removed after its row.
`--graphs auto,resident,off` runs each store with the graphs of a streamed pass's layers (layer_graphs.py; `resident`:
only of its resident layers) and without, `--matvec auto,off` with and without decode steps
multiplying GGML matrices in their blocks (ggml_triton.matvec), `--norms auto,off` with and without torch's fused
RMSNorm (runtime.fused_norms), `--rotary auto,off` with and without the one-kernel rotary embedding
(runtime.fused_rotary), `--no-dequant` skips part 1, `--profile` adds a
profiled decode step's breakdown. `--shape tiny` checks the script on a CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import time
import zlib

from bench_scale import model_config, write_random_store
from common import PROMPT_TOKENS, StepClock, profile_steps, run_child, vm_hwm_bytes, word_tokenizer

QUANTIZED_HERE = ("bf16", "nf4", "int8", "q4_k", "q4_k_m", "q6_k", "q8_0")  # tierstore's compression.format values
TYPICAL_CODE = {  # |code| of a typical element, so that the random blocks give weights of about WEIGHT_STD
    "Q4_0": 4, "Q4_1": 8, "Q5_0": 8, "Q5_1": 16, "Q8_0": 64, "Q2_K": 24, "Q3_K": 64, "Q4_K": 240, "Q5_K": 500,
    "Q6_K": 1000, "IQ4_NL": 60, "IQ4_XS": 1000,
}
WEIGHT_STD = 0.02


def random_blocks(format: str, numel: int, device, seed: int):
    """`numel` elements of random codes in `format`, with scales that make weights of about WEIGHT_STD."""
    import torch

    from tierstore.ggml import BLOCKS, HALF_SCALES

    elements, nbytes = BLOCKS[format]
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks = torch.randint(0, 256, (numel // elements, nbytes), dtype=torch.uint8, device=device, generator=gen)
    scale = torch.full((blocks.shape[0], 1), WEIGHT_STD / TYPICAL_CODE[format], dtype=torch.float16, device=device)
    for start in HALF_SCALES[format]:
        blocks[:, start:start + 2] = scale.view(torch.uint8)
    return blocks.reshape(-1)


def write_ggml_store(store: str, shape: str, format: str, device: str) -> dict:
    """A random-weight store whose layer matrices are `format` blocks (embeddings and norms in bf16)."""
    import torch
    from tierstore.inference.loading.gguf_packed import PackedMatrix
    from tierstore.inference.loading.skeleton import build_skeleton
    from tierstore.inference.loading.store_writer import (
        finished_units,
        store_writer,
        write_metadata,
        write_tensors,
    )

    from tierstore.compression import Codec

    config = model_config(shape)
    skeleton = build_skeleton(config, torch.bfloat16, split_experts=False)
    shapes = {name: tuple(p.shape) for name, p in skeleton.model.named_parameters()}
    start = time.perf_counter()
    with store_writer(store, None, Codec.ggml().to_dict()) as finished:
        if not finished:
            records = finished_units(store)
            for key, names in skeleton.units.items():
                if key in records:
                    continue
                gen = torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))
                tensors = {}
                for index, name in enumerate(names):
                    if name in skeleton.matrices:
                        data = random_blocks(format, shapes[name][0] * shapes[name][1], device,
                                             zlib.crc32(key.encode()) + index).cpu()
                        tensors[name] = PackedMatrix(format, data, shapes[name])
                    elif name.endswith("norm.weight"):
                        tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
                    else:
                        tensors[name] = (torch.randn(shapes[name], generator=gen, device=device)
                                         * WEIGHT_STD).bfloat16().cpu()
                records[key] = write_tensors(store, key, tensors, names, torch.bfloat16)
            write_metadata(store, "bench_formats", config, records, word_tokenizer(config.vocab_size),
                           compression=Codec.ggml().to_dict())
    nbytes = sum(entry.stat().st_size for entry in os.scandir(os.path.join(store, "units")))
    return {"write_s": time.perf_counter() - start, "store_bytes": nbytes}


def layer_dequant(format: str, shape: str, device: str, link_gbps: float) -> dict:
    """One layer's matrices dequantized into bf16 as a run dequantizes them (`Decompressor.materialize`: one fused
    kernel per run of one format), and one op at a time, against the time their bytes take to cross the link."""
    import torch

    from tierstore import ggml
    from tierstore.compression import PACKED, Codec, Decompressor, ggml_layout, ggml_runs
    from tierstore.rotation import HADAMARD

    config = model_config(shape)
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}
    layout, packed = ggml_layout("layer", {}, {name: (format, shape) for name, shape in shapes.items()})
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
    views = layout.views(buffer)
    for seed, name in enumerate(shapes):
        start, end = packed.ggml_bytes(name)
        views[PACKED][start:end].copy_(random_blocks(format, shapes[name][0] * shapes[name][1], device, seed))
    unpack = Decompressor(Codec.ggml(), {"layer": packed}, torch.bfloat16, torch.device(device))

    def eager() -> None:
        for run_format, first_byte, end_byte, first, last in ggml_runs(packed):
            ggml.dequantize_eager(run_format, views[PACKED][first_byte:end_byte], unpack.scratch[first:last])

    def compiled() -> None:
        for run_format, first_byte, end_byte, first, last in ggml_runs(packed):
            if not ggml.dequantize_compiled(run_format, views[PACKED][first_byte:end_byte], unpack.scratch[first:last]):
                raise RuntimeError(f"{run_format}: torch.compile failed")

    def timed(run) -> float:
        run()  # warm-up (and compile)
        if device == "cuda":
            torch.cuda.synchronize()
        reps = 20 if device == "cuda" else 1
        start = time.perf_counter()
        for _ in range(reps):
            run()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / reps

    fused = timed(lambda: unpack.materialize("layer", views))
    rotated = Decompressor(dataclasses.replace(Codec.ggml(), rotation=HADAMARD), {"layer": packed}, torch.bfloat16,
                           torch.device(device))
    nbytes = views[PACKED].numel()
    return {"layer_bytes": nbytes, "fused_s": fused, "rotated_s": timed(lambda: rotated.materialize("layer", views)),
            "compiled_s": timed(compiled) if device == "cuda" else None,
            "eager_s": timed(eager), "copy_s": nbytes / (link_gbps * 1e9),
            "runs": len(ggml_runs(packed))}


def child(args: argparse.Namespace) -> None:
    """One format's row: open its store at the budget, warm up, generate; prints a RESULT line."""
    import torch
    import tierstore
    from tierstore.compression import Decompressor

    if args.matvec == "off":  # every GGML matrix dequantized, decode steps too
        Decompressor.MATVEC_DEVICES = ()
    if args.matvec == "dots":  # Q4_K and Q2_K multiplied by ggml_dots' kernel (an experiment)
        from tierstore import ggml
        ggml.MATVEC_KERNEL = "dots"
    model = tierstore.AutoModel.from_pretrained(args.store, budget=tierstore.Budget(vram=args.vram, ram=args.ram),
                                                config={"runtime": {"cache_dir": args.cache,
                                                                    "cuda_graphs": args.graphs,
                                                                    "fused_norms": args.norms,
                                                                    "fused_rotary": args.rotary}})
    vocab = model.model.config.get_text_config().vocab_size
    ids = torch.randint(100, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up: fills the tiers, compiles dequantizers
    clock = StepClock()
    out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False, streamer=clock)  # graphed steps stay so
    report = model.report().to_dict()
    plan = report["plan"]
    profiled = None
    if args.profile and torch.cuda.is_available():
        row = "-".join((os.path.basename(args.store), args.graphs, args.matvec, args.norms, args.rotary))
        trace = os.path.join(args.out, f"profile-{row}.json")
        profiled = profile_steps(lambda marks: model.generate(ids, max_new_tokens=9, do_sample=False,
                                                              streamer=marks), trace)
    with torch.no_grad():  # one eager forward over the whole sequence: is each token its prefix's argmax there?
        logits = model(out).logits[0, PROMPT_TOKENS - 1:-1].float()
    chosen = out[0, PROMPT_TOKENS:].to(logits.device)
    best = logits.max(dim=-1).values
    gap = (best - logits.gather(1, chosen[:, None])[:, 0]).tolist()  # 0 where the token is the eager argmax
    model.close()
    cuda = torch.cuda.is_available()
    print("RESULT " + json.dumps({
        **clock.summary(), "predicted": plan["predicted"], "h2d_bytes_per_pass": plan["h2d_bytes_per_pass"],
        "regime": plan["regime"], "notes": plan["notes"], "run_notes": report.get("notes", []),
        "tokens": out[0, PROMPT_TOKENS:].tolist(), "gap_to_eager_argmax": gap,
        "peak_vram_reserved": torch.cuda.max_memory_reserved() if cuda else 0, "peak_rss": vm_hwm_bytes(),
        "profile": profiled}),
        flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--store", help="(child) the store")
    parser.add_argument("--formats", default="bf16,nf4,int8,Q8_0,Q6_K,Q5_K,Q4_K,Q4_0,Q3_K,Q2_K")
    parser.add_argument("--shape", default="7b", choices=["7b", "tiny"])
    parser.add_argument("--vram", default="4GB")
    parser.add_argument("--ram", default="64GB")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--work", default="/tmp/tierstore-formats")
    parser.add_argument("--out", default=".")
    parser.add_argument("--graphs", default="auto", help="runtime.cuda_graphs of each row, comma-separated: "
                        "auto,resident,off runs each store three times (a streamed pass's layers replayed from "
                        "graphs, only its resident layers, none)")
    parser.add_argument("--matvec", default="auto", help="comma-separated: auto (decode steps multiply GGML "
                        "matrices in their blocks), dots (the same, Q4_K and Q2_K by ggml_dots' kernel: an "
                        "experiment) and/or off (every matrix dequantized first), each row run so")
    parser.add_argument("--norms", default="auto", help="runtime.fused_norms of each row, comma-separated: auto,off "
                        "runs each store with transformers' RMSNorm on torch's fused rms_norm and without")
    parser.add_argument("--rotary", default="auto", help="runtime.fused_rotary of each row, comma-separated: auto,off "
                        "runs each store with transformers' rotary embedding in one kernel a layer and without")
    parser.add_argument("--no-dequant", action="store_true", help="skip the layer dequantization timings")
    parser.add_argument("--profile", action="store_true", help="after each row's timed steps, profile 8 decode "
                        "steps (torch.profiler): GPU kernel time, idle time, copies and the top kernels a step")
    args = parser.parse_args()
    args.cache = os.path.join(args.work, "cache")
    if args.child:
        child(args)
        return
    import torch

    from tierstore.probe import run_probe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    probe = run_probe(args.cache, torch.device(device), disk_nbytes=2**30 if device == "cuda" else 64 * 2**20)
    link = probe.get("h2d_pinned_gbps") or 50.0
    print("probe", json.dumps(probe), flush=True)
    formats = args.formats.split(",")
    results: dict = {"probe": probe, "dequant": {}, "rows": {}}
    for format in [] if args.no_dequant else formats:
        if format not in QUANTIZED_HERE:
            d = results["dequant"][format] = layer_dequant(format, args.shape, device, link)
            print(f"dequant {format}: layer {d['layer_bytes'] / 1e6:.1f} MB in {d['runs']} run(s), copy "
                  f"{d['copy_s'] * 1e3:.2f} ms, as a pass does {d['fused_s'] * 1e3:.3f} ms "
                  f"({d['fused_s'] / d['copy_s']:.2f}x copy), with the Hadamard rotation turned back "
                  f"{d['rotated_s'] * 1e3:.3f} ms ({d['rotated_s'] / d['copy_s']:.2f}x copy), torch.compile "
                  f"{'-' if d['compiled_s'] is None else round(d['compiled_s'] * 1e3, 3)} ms, one op at a time "
                  f"{d['eager_s'] * 1e3:.2f} ms ({d['eager_s'] / d['copy_s']:.2f}x copy)", flush=True)
    with open(os.path.join(args.out, "formats_log.txt"), "a") as log:
        for format in formats:
            store = os.path.join(args.work, f"{args.shape}-{format}")
            if format in QUANTIZED_HERE:
                written = write_random_store(store, args.shape, "none" if format == "bf16" else format, device)
            else:
                written = write_ggml_store(store, args.shape, format, device)
            for graphs, matvec, norms, rotary in itertools.product(*(getattr(args, name).split(",") for name in
                                                                     ("graphs", "matvec", "norms", "rotary"))):
                row = run_child(["--store", store, "--vram", args.vram, "--ram", args.ram, "--tokens",
                                 str(args.tokens), "--work", args.work, "--shape", args.shape, "--graphs", graphs,
                                 "--matvec", matvec, "--norms", norms, "--rotary", rotary, "--out", args.out]
                                + (["--profile"] if args.profile else []), log, script=__file__)
                name = format + "".join(f" ({what} {value})" for what, value in
                                        (("cuda_graphs", graphs), ("matvec", matvec), ("fused_norms", norms),
                                         ("fused_rotary", rotary))
                                        if value != "auto")
                results["rows"][name] = {**row, **written}
                with open(os.path.join(args.out, "formats_results.json"), "w") as handle:
                    json.dump(results, handle, indent=1)
                print_row(name, results["rows"][name], results["probe"])
            shutil.rmtree(store, ignore_errors=True)


def print_row(format: str, r: dict, probe: dict) -> None:
    if "error" in r:
        print(f"{format}: error: {r['error']}", flush=True)
        return
    bound = r["predicted"].get("step_s")
    step = r["decode_s_per_token"]
    ratio = f"{step / bound:.2f}x" if bound else "-"
    print(f"{format}: store {r['store_bytes'] / 1e9:.2f} GB (written in {r['write_s']:.0f} s), "
          f"{r['h2d_bytes_per_pass'] / 1e9:.2f} GB over the link per pass, decode {step:.4f} s/token, bound "
          f"{bound} ({r['predicted'].get('bound')}): {ratio}, peak VRAM {r['peak_vram_reserved'] / 1e9:.2f} GB "
          f"reserved, regime {r['regime']}; {'; '.join(n for n in r.get('run_notes', []) if 'decode steps' in n)}",
          flush=True)
    gaps = [gap for gap in r.get("gap_to_eager_argmax", []) if gap > 0]
    print(f"  {len(gaps)} of {len(r['tokens'])} tokens are not the argmax of one eager forward over the sequence"
          + (f" (logit gaps up to {max(gaps):.3g})" if gaps else ""), flush=True)
    if (p := r.get("profile")) is not None:
        print(f"  profiled, a decode step: span {p['span_ms']:.2f} ms, kernels {p['kernel_ms']:.2f} ms, GPU idle "
              f"{p['idle_ms']:.2f} ms, {p['kernels_per_step']:.0f} kernels; host-to-device copies {p['h2d_ms']:.2f} "
              f"ms, {p['h2d_not_overlapped_ms']:.2f} ms of them with no kernel running", flush=True)
        for name, count, ms in p["top"]:
            print(f"    {ms:7.3f} ms  {count:6.1f}x  {name}", flush=True)


if __name__ == "__main__":
    main()
