"""Mixture-of-experts streaming on a Qwen3-30B-A3B-shaped model cut to 24 layers (bf16, random weights, ~31 GB;
`--layers 44 --ram 60GB`: as deep as a 64 GB disk holds, 55 GB).

One device-tool call:
    python benchmarks/bench_moe.py --out $OUT
Builds the checkpoint (experts fused, as transformers holds them, so tierstore reads it in place), measures the
links with tierstore's probe, then runs each row in its own process with the same prompt and prints one table:
prefill s, decode s/token (median step of a second call), bytes moved per token, ratio to the bound, expert hit
rates, prediction recall, routing skew, peak VRAM and RSS, and whether the tokens equal whole-layer streaming's.
The page cache is not dropped between rows: RAM holds the whole model here, and the link is what is measured.

The bound (issue 12): max((routed-expert bytes + dense bytes moved per token) / pinned GB/s, the resident model's
step with transformers' fastest experts kernel).

The full 48 layers (issue 27) do not fit a 64 GB disk in bf16 (61 GB). With `--format q4_k` (or nf4, any
compression.format) the model is instead a tierstore store of that format written from random weights quantized
on the GPU unit by unit (no bf16 copy on disk; 18.1 GB in q4_k), and the resident row is transformers' bf16 model of
the same shape built on the GPU with random weights of its own (61 GB, which an 80 GB card holds): the same step's
work, other values, so its tokens are not compared:
    python benchmarks/bench_moe.py --out $OUT --layers 48 --format q4_k --only "resident grouped_mm;..."
`--profile` adds each tierstore row's profiled decode steps (GPU kernel and idle time, the top kernels);
`--gathered` has compressed experts' blocks gathered from their slots before they are multiplied (before
2026-12-07; the default multiplies them where they lie).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from common import StepClock, prepare, profile_steps, run_child, vm_hwm_bytes

SHAPE = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
             num_experts_per_tok=8, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
             vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=False, norm_topk_prob=True,
             decoder_sparse_step=1, mlp_only_layers=[])
PROMPT_TOKENS = 32


def qwen3_moe_config(**overrides):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**{**SHAPE, **overrides}, dtype="bfloat16")


def build_checkpoint(path: str, **overrides) -> None:
    """Random bf16 weights (norms 1), one safetensors shard per decoder layer, each tensor named and shaped as
    transformers' model holds it (experts fused in 3-D tensors), generated on the GPU when there is one."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return
    os.makedirs(path, exist_ok=True)
    config = qwen3_moe_config(**overrides)
    config.save_pretrained(path)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    shards: dict[str, dict[str, object]] = {}
    for name, param in meta.named_parameters():
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(layer, {})[name] = param.shape
    index = {}
    for number, (layer, shapes) in enumerate(shards.items()):
        tensors = {}
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen, device=device) * 0.02).bfloat16().cpu()
        file = f"model-{number:05d}.safetensors"
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        index.update({name: file for name in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": index}, handle)


def skew_routers(path: str, hot: int = 16, scale: float = 3.0) -> None:
    """A stated synthetic skew, written in place: the router rows of experts 0..hot-1 of every layer scaled by
    `scale`, so that their logits are larger in magnitude and they win the top-k more often (random routers route
    almost uniformly, which understates what an expert cache gains on real models)."""
    import torch

    from tierstore.inference.loading.checkpoint import safetensors_entries

    for name, entry in safetensors_entries(path).items():
        if not name.endswith("mlp.gate.weight"):
            continue
        with open(entry.path, "r+b") as handle:
            handle.seek(entry.start)
            weight = torch.frombuffer(bytearray(handle.read(entry.end - entry.start)), dtype=torch.bfloat16)
            weight = weight.view(entry.shape).clone()
            weight[:hot] *= scale
            handle.seek(entry.start)
            handle.write(weight.view(torch.uint8).numpy().tobytes())


def decode_settings() -> dict:
    """Sampling at temperature 1 from a fixed seed: each row draws the same tokens when its logits are the same
    bits, and the tokens vary as real text does (greedy decoding of random weights repeats one token, which routes
    every step to the same experts and flatters a cache)."""
    import torch

    torch.manual_seed(0)
    return {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def prompt_ids(vocab: int):
    import torch

    return torch.randint(100, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))


def resident_random(layers: int, kernel: str):
    """transformers' bf16 model of the shape on the GPU, random weights by its own initialisation."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(qwen3_moe_config(num_hidden_layers=layers), dtype=torch.bfloat16,
                                                 experts_implementation=kernel)
    return model.eval()


def child(args: argparse.Namespace) -> None:
    """One row, one process: prints a JSON line."""
    import torch
    from transformers import LogitsProcessorList

    ids = prompt_ids(SHAPE["vocab_size"])
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    calls, result = [], {}
    if args.system == "tierstore":
        import tierstore

        if args.gathered:  # experts' blocks gathered first, not multiplied where they lie
            from tierstore.inference.runtime import packed_experts
            packed_experts.AT_OFFSETS_DEVICES = ()
        if args.matvec_kernel == "dots":  # Q4_K and Q2_K experts multiplied by ggml_dots' kernel (an experiment)
            from tierstore import ggml
            ggml.MATVEC_KERNEL = "dots"
        if args.matvec_tile:  # the values kernel's tile (rows a program x elements of a row at once x warps)
            from tierstore import ggml_triton
            ggml_triton.MATVEC_ROWS, ggml_triton.MATVEC_ELEMENTS, ggml_triton.MATVEC_WARPS = args.matvec_tile

        experts = json.loads(args.experts)
        config = {"runtime": {"cache_dir": args.cache, "fused_rotary": args.rotary}, "experts": experts,
                  "compression": {"format": args.compress}}
        model = tierstore.AutoModel.from_pretrained(args.model, budget={"vram": args.vram, "ram": args.ram},
                                                    config=config)
        setup_s = time.perf_counter() - start
        setup_peak_vram = torch.cuda.max_memory_allocated()  # a compressed store is written on the GPU at first use
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):  # no logits processor: a call given one runs no graphed steps; timed by the report
            out = model.generate(ids, max_new_tokens=args.tokens, **decode_settings())
            timing = model.report().to_dict()["timing"]
            calls.append({"prefill_s": timing["prefill_s"], "decode_s_per_token": 1 / timing["decode_tokens_per_s"],
                          "graphed": timing["graphed"]})
        report = model.report().to_dict()
        tiers = report["tiers"]
        passes = report["timing"]["decode_steps"] + 1
        result = {"setup_peak_vram": setup_peak_vram, "predicted_s": report["timing"]["predicted_step_s"],
                  "tiers": tiers, "experts": report["experts"],
                  "dense_h2d_per_pass": tiers["device"]["bytes_in"] / passes,
                  "expert_h2d_per_pass": (tiers["experts device"]["bytes_in"] / passes if "experts device" in tiers
                                          else None),
                  "plan": {k: report["plan"][k] for k in ("regime", "device_resident", "experts", "notes")}}
        if args.profile:  # after the timed calls: 8 decode steps under torch's profiler
            trace = os.path.join(args.out, f"profile-{args.vram}.json")
            result["profile"] = profile_steps(lambda marks: model.generate(ids, max_new_tokens=9, streamer=marks,
                                                                           **decode_settings()), trace)
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"device_map": "cuda"} if args.system == "resident" else {
            "device_map": "auto", "max_memory": {0: args.vram, "cpu": args.ram},
            "offload_folder": os.path.join(args.cache, "offload")}
        if args.format != "none":  # the model is a compressed store: the baseline has weights of its own
            if args.system != "resident":
                raise SystemExit(f"--format {args.format}: only tierstore and resident rows run")
            model = resident_random(args.layers, args.kernel)
            result["own_weights"] = True
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16,
                                                         experts_implementation=args.kernel, **kwargs)
        setup_s = time.perf_counter() - start
        for _ in range(2 if args.system == "resident" else 1):
            clock = StepClock()
            with torch.no_grad():
                out = model.generate(ids.to(model.device), max_new_tokens=args.tokens,
                                     logits_processor=LogitsProcessorList([clock]), **decode_settings())
            torch.cuda.synchronize()
            calls.append(clock.summary())
    result.update(calls[-1], first_call=calls[0], setup_s=setup_s, peak_vram=torch.cuda.max_memory_allocated(),
                  peak_rss=vm_hwm_bytes(), tokens=out[:, PROMPT_TOKENS:].cpu().tolist())
    print("RESULT " + json.dumps(result), flush=True)


ROWS = [  # name, system, kernel, experts config, vram, ram, new tokens
    ("resident grouped_mm", "resident", "grouped_mm", {}, "-", "-", 16),
    ("tierstore experts (lfu cache, prediction auto: the default)", "tierstore", "-", {}, "4GB", "48GB", 16),
    ("tierstore experts copied as picked (compute device)", "tierstore", "-", {"compute": "device"}, "4GB", "48GB",
     16),
    ("tierstore experts at vram 8 GB (the default)", "tierstore", "-", {}, "8GB", "48GB", 16),
    ("tierstore experts at vram 40 GB (every expert on the device)", "tierstore", "-", {}, "40GB", "48GB", 16),
    ("tierstore experts (lfu cache, no prediction)", "tierstore", "-", {"prefetch": "none"}, "4GB", "48GB", 16),
    ("tierstore experts (lfu cache, prediction always)", "tierstore", "-", {"prefetch": "router"}, "4GB", "48GB",
     16),
    ("tierstore experts (fifo cache, no prediction)", "tierstore", "-",
     {"prefetch": "none", "device_policy": "fifo", "host_policy": "fifo"}, "4GB", "48GB", 16),
    ("tierstore whole layers", "tierstore", "-", {"streaming": False, "implementation": "grouped_mm"}, "4GB",
     "48GB", 8),
    # compressed experts (q8_0: tierstore's quantizer, fast on any machine), packed in every tier: decode steps
    # read them in place and dequantize them on the device (auto), or fill a window from their slots; their tokens
    # are compared with the same store's whole layers
    ("q8_0: tierstore experts (packed, read in place: the default)", "tierstore", "-", {}, "4GB", "48GB", 16),
    ("q8_0: tierstore experts copied into slots, window filled (compute device)", "tierstore", "-",
     {"compute": "device"}, "4GB", "48GB", 16),
    ("q8_0: tierstore whole layers", "tierstore", "-", {"streaming": False, "implementation": "grouped_mm"}, "4GB",
     "48GB", 8),
    ("accelerate 4GiB/48GiB", "accelerate", "grouped_mm", {}, "4GiB", "48GiB", 3),
]
SKEWED = [  # the same model with routers skewed by skew_routers (run after the rows above)
    ("skewed: resident grouped_mm", "resident", "grouped_mm", {}, "-", "-", 16),
    ("skewed: tierstore experts (lfu cache, prediction auto: the default)", "tierstore", "-", {}, "4GB", "48GB",
     16),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--system", default="tierstore")
    parser.add_argument("--kernel", default="grouped_mm")
    parser.add_argument("--experts", default="{}")
    parser.add_argument("--model", help="the checkpoint or store (default: in /tmp, named by layers and format)")
    parser.add_argument("--cache", default="/tmp/tierstore-moe-cache")
    parser.add_argument("--vram", default="4GB")
    parser.add_argument("--ram", help="a row's RAM budget (given to the parent: every tierstore row's instead of its "
                        "own, for a deeper model)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", default=".")
    parser.add_argument("--only", default="", help="row names separated by ;")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="decoder layers of the model")
    parser.add_argument("--compress", default="none", help="(a row's) compression.format")
    parser.add_argument("--profile", action="store_true", help="profile 8 decode steps of each tierstore row "
                        "(GPU kernel time, idle time, copies, the top kernels a step; the trace into --out)")
    parser.add_argument("--gathered", action="store_true", help="tierstore rows gather compressed experts' "
                        "blocks from their slots before multiplying them (packed_experts.AT_OFFSETS_DEVICES = ())")
    parser.add_argument("--rotary", default="auto", help="runtime.fused_rotary of the tierstore rows: auto (the "
                        "rotary embedding in one kernel a layer on a GPU) or off (transformers' function)")
    parser.add_argument("--matvec-kernel", default="values", choices=["values", "dots"], help="the tierstore rows' "
                        "matrix-vector kernel for compressed experts (ggml.MATVEC_KERNEL; dots: an experiment)")
    parser.add_argument("--matvec-tile", type=matvec_tile, default=None, help="the tierstore rows' matrix-vector "
                        "tile for the values kernel, ROWSxELEMENTSxWARPS (e.g. 16x1024x4; default: ggml_triton's)")
    parser.add_argument("--format", default="none", help="write the model as a store of this compression.format "
                        "from random weights (no bf16 checkpoint on disk); none: a bf16 checkpoint")
    args = parser.parse_args()
    args.model = args.model or f"/tmp/qwen3-30b-a3b-{args.layers}l" + ("" if args.format == "none" else
                                                                       f"-{args.format}")
    if args.child:
        child(args)
        return
    probe = prepare(args.out, args.cache, lambda: build_model(args))
    only = set(filter(None, args.only.split(";")))
    results = {}
    with open(os.path.join(args.out, "bench_moe_log.txt"), "w") as log:
        for name, system, kernel, experts, vram, ram, tokens in ROWS + SKEWED:
            if only and name not in only:
                continue
            if name.startswith("skewed:") and not any(done.startswith("skewed:") for done in results):
                skew_routers(args.model)
            compress = name.split(":")[0] if name.startswith("q8_0:") else "none"
            results[name] = run_child(["--system", system, "--kernel", kernel, "--experts", json.dumps(experts),
                                       "--model", args.model, "--cache", args.cache, "--vram", vram,
                                       "--layers", str(args.layers), "--format", args.format, "--out", args.out,
                                       *(["--profile"] if args.profile else []),
                                       *(["--gathered"] if args.gathered else []), "--rotary", args.rotary,
                                       "--matvec-kernel", args.matvec_kernel,
                                       *(["--matvec-tile", "x".join(map(str, args.matvec_tile))]
                                         if args.matvec_tile else []),
                                       "--ram", args.ram if args.ram and system == "tierstore" else ram,
                                       "--tokens", str(tokens), "--compress", compress], log, script=__file__)
            print(name, json.dumps({k: v for k, v in results[name].items() if k not in ("tokens", "tiers")}),
                  flush=True)
            with open(os.path.join(args.out, "bench_moe_results.json"), "w") as handle:
                json.dump({"probe": probe, "results": results}, handle, indent=1)
    print_table(results, probe)


def matvec_tile(text: str) -> tuple[int, int, int]:
    """A `--matvec-tile` ROWSxELEMENTSxWARPS as three positive ints (argparse reports anything else in one line)."""
    parts = text.split("x")
    if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: ROWSxELEMENTSxWARPS, three positive whole numbers, e.g. 16x1024x4")
    return tuple(int(part) for part in parts)


def build_model(args: argparse.Namespace) -> None:
    """The bf16 checkpoint, or with --format the store written from random weights on the GPU."""
    if args.format == "none":
        build_checkpoint(args.model, num_hidden_layers=args.layers)
        return
    from bench_scale import write_random_store

    written = write_random_store(args.model, qwen3_moe_config(num_hidden_layers=args.layers), args.format, "cuda")
    print(f"{args.format} store: {written['store_bytes'] / 1e9:.2f} GB written in {written['write_s']:.1f} s",
          flush=True)


def print_table(results: dict, probe: dict) -> None:
    expert_bytes = None
    for row in results.values():
        plan = row.get("plan", {}).get("experts")
        if plan:
            expert_bytes = plan["expert_bytes"]
    gbps = probe.get("h2d_pinned_gbps")
    resident = results.get("resident grouped_mm", {}).get("decode_s_per_token")
    whole = results.get("tierstore whole layers", {})
    quantized_whole = results.get("q8_0: tierstore whole layers", {})
    resident_row = results.get("resident grouped_mm", {})
    grouped = None if resident_row.get("own_weights") else resident_row.get("tokens")
    grouped_skewed = results.get("skewed: resident grouped_mm", {}).get("tokens")
    print(f"\npinned host->device {gbps:.1f} GB/s; an expert is {expert_bytes} bytes; resident grouped_mm step "
          f"{resident}")
    print("| row | prefill s | decode s/token | copied per pass (prefill included) | bound s | ratio | "
          "expert device hit | prediction recall | busiest 10% share | peak VRAM (at setup) | peak RSS | "
          "tokens = whole layers | tokens = resident grouped_mm (same routers) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        if "error" in row:
            print(f"| {name} | error: {row['error']} |")
            continue
        step = row["decode_s_per_token"]
        skewed = name.startswith("skewed:")
        quantized = name.startswith("q8_0:")  # compared with the q8_0 store's whole layers
        same_store_whole = quantized_whole if quantized else whole
        moved = bound = ratio = hit = recall = skew = "-"
        if "dense_h2d_per_pass" in row:
            per_pass = row["dense_h2d_per_pass"] + (row["expert_h2d_per_pass"] or 0)
            moved = f"{per_pass / 1e9:.2f} GB"
            experts = row["plan"]["experts"]
            if experts:  # the bound: routed experts (no cache) plus the dense bytes, or the resident step
                routed = experts["layers"] * experts["top_k"] * experts["expert_bytes"]
                bound_s = max((routed + row["dense_h2d_per_pass"]) / (gbps * 1e9), resident or 0)
            else:
                bound_s = row["dense_h2d_per_pass"] / (gbps * 1e9)
            bound, ratio = f"{bound_s:.4f}", f"{step / bound_s:.2f}x"
            tiers = row["tiers"]
            if "experts device" in tiers:
                hit = f"{tiers['experts device']['hit_rate']:.1%}"
                recall = "-" if row["experts"]["prediction_recall"] is None else \
                    f"{row['experts']['prediction_recall']:.1%}"
                skew = f"{row['experts']['busiest_tenth_share']:.1%}"
        print(f"| {name} | {row['prefill_s']:.3f} | {step:.4f} | {moved} | {bound} | {ratio} | {hit} | {recall} | "
              f"{skew} | {_peak(row)} | {row['peak_rss'] / 1e9:.1f} GB | "
              f"{'-' if skewed else _same_prefix(row['tokens'], same_store_whole.get('tokens'))} | "
              f"{'-' if quantized else _same_prefix(row['tokens'], grouped_skewed if skewed else grouped)} |")


def _peak(row: dict) -> str:
    """The run's peak device memory, and the setup's (writing a compressed store, opening) where it was higher."""
    setup = row.get("setup_peak_vram")
    more = f" ({setup / 1e9:.2f} GB)" if setup is not None and setup > row["peak_vram"] else ""
    return f"{row['peak_vram'] / 1e9:.2f} GB{more}"


def _same_prefix(tokens: list | None, reference: list | None) -> str:
    """Whether two runs' tokens agree over the shorter one's length, and that length."""
    if not tokens or not reference:
        return "-"
    count = min(len(tokens[0]), len(reference[0]))
    return f"{tokens[0][:count] == reference[0][:count]} ({count})"


if __name__ == "__main__":
    main()
