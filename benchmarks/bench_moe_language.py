"""Mixture-of-experts on real language, against resident transformers on the same machine.

The model: SmolLM2-135M-Instruct inflated 2x wide (hidden 1152; `common.Inflation`, which keeps its function) and
upcycled into Mixtral layers: each layer's MLP copied into 128 identical experts behind a fixed random router (top
8, weights renormalised over the top 8, as Mixtral does). The tokens are SmolLM2's whatever the router picks, and
the routing is a projection of real hidden states. 30 layers, bf16, 128 experts of 10.6 MB: 41 GB, experts fused
in safetensors (tierstore reads them in place).

    python benchmarks/bench_moe_language.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT --rows resident,4GB

Rows (each one process): `resident` = transformers with every weight on the GPU (grouped_mm); `4GB`, `8GB`, `all`
(a budget holding every expert in device slots) = tierstore at that vram and ram 56 GB, run with missed experts
copied into slots (`device`), read in place from mapped host RAM in decode steps (`mapped`, which auto picks on a
GPU when RAM holds every expert), or all on the CPU (`host`): the modes are switched on one model object
(`model.experts.compute`; `--mode` overrides the list), each after a warm-up call per prompt; `draft` = vram 4 GB
with SmolLM2 itself as the draft (the GGUF; the same function as the target). A row named with "+q8_0" (any
compression.format) runs the model stored that way, its experts packed in every tier; "+compile" compiles the
draft. Greedy, several prompts with the chat template, each reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from common import QUESTION, Inflation, StepClock, encode, fmt, run_child, vm_hwm_bytes

from tierstore import config as settings

EXPERTS, TOP_K, FACTOR, LAYERS = 128, 8, 2, 30
PROMPTS = [QUESTION, "What is the capital of France? Answer in two sentences.",
           "Write a short poem about the sea."]
BUDGETS = {"4GB": ("4GB", "56GB"), "8GB": ("8GB", "56GB"), "all": ("60GB", "56GB"), "draft": ("4GB", "56GB")}
MODES = {"4GB": "device,mapped,host", "8GB": "device,mapped", "all": "device,mapped", "draft": "auto"}
# a row's name may add "+compile" (the draft bound and compiled: speculation.compile), "+float32", "+tfloat32", ...
# (the draft in that speculation.draft_dtype), "+ahead" (speculation.ahead: the draft grows its next tree while a
# verify pass waits on each layer's copies) and "+FORMAT" (the model stored with compression.format FORMAT, its
# experts packed in every tier: "4GB+q8_0", "draft+q4_k+compile", "draft+compile+float32+ahead")
DRAFT_DTYPES = tuple(name for name in settings.DRAFT_DTYPES if name != settings.AUTO)  # a row names one


def expert_budget_setting(word: str) -> int | str | None:
    """An `--expert-budgets` word as speculation.expert_budget takes it: a count, "auto" or "none" (None); a
    KeyError or ValueError for anything else."""
    return int(word) if word.isdigit() else {"auto": "auto", "none": None}[word]


@dataclasses.dataclass(frozen=True)
class RowParts:
    """What a row's name asks for: its budget row, its compression format ("none"), whether its draft is compiled,
    its draft's dtype (speculation.draft_dtype: auto unless named), and whether the draft grows its trees while
    the model verifies them (speculation.ahead)."""

    base: str
    compress: str = "none"
    compile: bool = False
    draft_dtype: str = "auto"
    ahead: bool = False


FLAGS = ("compile", "ahead")


def row_parts(row: str) -> RowParts:
    """A row name's parts (see the comment on DRAFT_DTYPES)."""
    base, *extras = row.split("+")
    formats = [extra for extra in extras if extra not in FLAGS and extra not in DRAFT_DTYPES]
    dtypes = [extra for extra in extras if extra in DRAFT_DTYPES]
    return RowParts(base, formats[0] if formats else "none", "compile" in extras, dtypes[0] if dtypes else "auto",
                    "ahead" in extras)


def upcycle(gguf: str, out_dir: str, experts: int = EXPERTS, top_k: int = TOP_K, factor: int = FACTOR) -> None:
    """The upcycled model (see the module docstring) as one safetensors shard per layer, config and tokenizer;
    kept when already written."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    if os.path.exists(os.path.join(out_dir, "config.json")):
        return
    os.makedirs(out_dir, exist_ok=True)
    inflation = Inflation(gguf, factor, inter_size=1536)
    small = inflation.config
    config = MixtralConfig(
        vocab_size=small.vocab_size, hidden_size=small.hidden_size, intermediate_size=small.intermediate_size,
        num_hidden_layers=small.num_hidden_layers, num_attention_heads=small.num_attention_heads,
        num_key_value_heads=small.num_key_value_heads, head_dim=small.head_dim, hidden_act=small.hidden_act,
        max_position_embeddings=small.max_position_embeddings, rms_norm_eps=small.rms_norm_eps,
        rope_parameters=small.rope_parameters, tie_word_embeddings=True, num_local_experts=experts,
        num_experts_per_tok=top_k, sliding_window=None, bos_token_id=small.bos_token_id,
        eos_token_id=small.eos_token_id, pad_token_id=small.pad_token_id, dtype="bfloat16")
    router = torch.Generator().manual_seed(0)
    index = {}
    for number, names in enumerate(inflation.names()):
        tensors = {}
        for name in names:
            if not name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
                tensors[name] = inflation.tensor(name)
        if number:  # a decoder layer: its MLP as `experts` copies, and a router
            prefix = f"model.layers.{number - 1}.mlp"
            gate, up, down = (inflation.tensor(f"{prefix}.{part}.weight") for part in ("gate_proj", "up_proj",
                                                                                        "down_proj"))
            tensors[f"{prefix}.experts.gate_up_proj"] = torch.cat([gate, up]).expand(experts, -1, -1).contiguous()
            tensors[f"{prefix}.experts.down_proj"] = down.expand(experts, -1, -1).contiguous()
            tensors[f"{prefix}.gate.weight"] = (torch.randn(experts, config.hidden_size, generator=router)
                                                * 0.02).bfloat16()
        file = f"model-{number:05d}.safetensors"
        save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
        index.update({name: file for name in tensors})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": index}, handle)
    config.save_pretrained(out_dir)
    inflation.tokenizer.save_pretrained(out_dir)


def resident_row(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map="cuda",
                                                 experts_implementation="grouped_mm")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    setup_s = time.perf_counter() - start
    prompts = []
    for prompt in PROMPTS:
        ids = encode(tokenizer, prompt).cuda()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=8, do_sample=False)
            clock = StepClock()
            out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False,
                                 logits_processor=LogitsProcessorList([clock]))
        torch.cuda.synchronize()
        prompts.append({**clock.summary(), "tokens": out[0, ids.shape[1]:].tolist()})
    return {"setup_s": setup_s, "prompts": {"resident": prompts}, "peak_vram": torch.cuda.max_memory_allocated()}


def tierstore_row(args: argparse.Namespace) -> dict:
    import torch

    import tierstore

    start = time.perf_counter()
    parts = row_parts(args.row)
    vram, ram = BUDGETS[parts.base]
    drafting = parts.base == "draft"
    model = tierstore.AutoModel.from_pretrained(
        args.model, budget={"vram": vram, "ram": ram},
        config={"runtime": {"cache_dir": args.cache},
                "speculation": {"compile": parts.compile, "draft_dtype": parts.draft_dtype, "ahead": parts.ahead},
                "compression": {"format": parts.compress}},
        draft=args.gguf if drafting else None)
    setup_s = time.perf_counter() - start
    reference = _reference_tokens(args.out)
    results = {}
    modes = (args.mode or MODES[parts.base]).split(",")
    budgets = args.expert_budgets.split(",") if drafting else [None]
    for mode, expert_budget in ((mode, budget) for mode in modes for budget in budgets):
        model.experts.compute = mode
        if expert_budget is not None:  # speculation.expert_budget for this variant's verify passes
            model.config = dataclasses.replace(model.config, speculation=dataclasses.replace(
                model.config.speculation, expert_budget=expert_budget_setting(expert_budget)))
            mode = f"{mode}, expert budget {expert_budget}"
            model.forget_tree_costs()  # each budget's tree policy learns from its own passes
        rows = []
        for prompt in PROMPTS:
            ids = encode(model.tokenizer, prompt)
            model.generate(ids, max_new_tokens=8, do_sample=False)
            out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
            report = model.report().to_dict()
            timing, experts = report["timing"], report["experts"]
            tokens = out[0, ids.shape[1]:].tolist()
            tiers = report["tiers"]
            rows.append({"s_per_token": 1 / timing["decode_tokens_per_s"], "prefill_s": timing["prefill_s"],
                         "graphed": timing["graphed"],
                         "tokens": tokens, "experts": experts, "slot_hit_rate": tiers["experts device"]["hit_rate"],
                         "host_tier": {k: tiers["experts host"][k] for k in ("hits", "misses", "stall_s")},
                         "speculation": report["speculation"],
                         "margin": _margin(model, ids, tokens, reference.get(prompt))})
            print(mode, json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
        results[mode] = rows
    # the rows' peak, before the check below adds its own 1 GiB link buffer on the device
    peak_vram = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None
    shape = next((row["experts"] for row in reversed(rows) if (row["experts"] or {}).get("host_calls")), None)
    host_check = None if shape is None else host_rate_check(
        model, round(shape["host_experts_per_call"] + 0.5), round(shape["host_tokens_per_expert"] + 0.5))
    if host_check is not None:
        print("host rate check", json.dumps(host_check), flush=True)
    plan = model.plan.experts
    costs = plan.costs
    model.close()
    return {"setup_s": setup_s, "prompts": results, "device_slots": plan.device_slots, "host_check": host_check,
            "costs": None if costs is None else vars(costs), "expert_bytes": plan.expert_bytes,
            "peak_vram": peak_vram, "peak_rss": vm_hwm_bytes()}


def host_rate_check(model, experts_per_call: int, tokens_each: int, calls: int = 30) -> dict | None:
    """The CPU's experts rate in this process after the row, at the shape its layer calls had (experts a call,
    tokens an expert): first layer's experts as the host tier holds them (the pinned arena) and as pageable copies,
    calls back to back and with 5 ms idle before each (as between a pass's layers, where torch's threads may
    sleep). Which of these falls to the run's figure says what slows the CPU in a run. None for packed experts."""
    import contextlib
    import statistics

    import torch
    from cpu_expert_rate import LinkLoad, routing

    from tierstore.inference.runtime.host_experts import cpu_threads, host_outputs, host_threads

    runner = model.experts
    if runner._unpacker is not None:
        return None
    group = runner.groups[0]
    count = max(1, min(experts_per_call, group.num_experts))
    keys = [group.keys[e] for e in range(group.num_experts)]
    units = runner.store.get_host_many(keys, count=False)
    try:
        arena = [{attr: tensor for (attr, _), tensor in zip(group.attrs, unit.values())} for unit in units]
        pageable = [{attr: tensor.clone() for attr, tensor in unit.items()} for unit in arena]
        down = arena[0]["down_proj"]
        hidden_size = down.shape[1] if group.module.is_transposed else down.shape[0]
        top_k = min(8, count)
        tokens, routed_base = routing(tokens_each, count, top_k)
        hidden = torch.randn(tokens, hidden_size, dtype=down.dtype)
        routing_weights = torch.full((tokens, top_k), 1 / top_k)
        expert_bytes = sum(t.numel() * t.element_size() for t in arena[0].values())
        threads = host_threads(torch.device("cuda"), torch.get_num_threads())
        result = {"experts_per_call": count, "tokens_each": tokens_each, "threads": threads}
        variants = [(memory, weights, idle_s, False) for memory, weights in (("arena", arena), ("pageable", pageable))
                    for idle_s in (0.0, 0.005)]
        if torch.cuda.is_available():  # and with the link copying pinned RAM to the GPU meanwhile, as a pass's copies
            variants.append(("arena", arena, 0.005, True))
        for memory, weights, idle_s, linked in variants:
            with (LinkLoad(blocking=True) if linked else contextlib.nullcontext()):
                seconds = []
                for call in range(calls):
                    first = (call * count) % (group.num_experts - count + 1)  # other experts each call
                    experts = list(range(first, first + count))
                    routed = [first + expert for expert in routed_base]
                    if idle_s:
                        time.sleep(idle_s)
                    start = time.perf_counter()
                    with cpu_threads(threads):
                        host_outputs(group.module, experts, weights[first:first + count], routed, top_k, hidden,
                                     routing_weights, pin_memory=torch.cuda.is_available())
                    seconds.append(time.perf_counter() - start)
            name = f"{memory}{'_after_idle' if idle_s else ''}{'_link_copying' if linked else ''}_gbps"
            result[name] = count * expert_bytes / statistics.median(seconds) / 1e9
        return result
    finally:
        runner.store.release_host_many(keys)


def _reference_tokens(out: str) -> dict[str, list[int]]:
    """The tokens per prompt of the row the others are compared with: the resident row when it ran first, else the
    first row that ran (its first mode), so that a run without the resident row still measures where rows part."""
    try:
        with open(os.path.join(out, "moe_language.json")) as handle:
            results = json.load(handle)
    except (OSError, ValueError):
        return {}
    first = results.get("resident") or next((row for name, row in results.items()
                                              if name != "probe" and "prompts" in row), None)
    if first is None:
        return {}
    rows = next(iter(first["prompts"].values()))
    return {prompt: row["tokens"] for prompt, row in zip(PROMPTS, rows)}


def _margin(model, ids, tokens: list[int], reference: list[int] | None) -> dict | None:
    """Where `tokens` leave the resident model's, the step and the gap between tierstore's two best logits
    there (from one forward over the common prefix): a tie is a gap of one bf16 rounding or less."""
    import torch

    if reference is None:
        return None
    count = min(len(tokens), len(reference))
    parting = next((i for i in range(count) if tokens[i] != reference[i]), None)
    if parting is None:
        return None
    prefix = torch.tensor([ids[0].tolist() + reference[:parting]])
    top = model(prefix).logits[0, -1].float().topk(2).values.tolist()
    return {"step": parting, "top2_gap": top[0] - top[1], "top1": top[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--model", default="/tmp/moe-language")
    parser.add_argument("--cache", default="/tmp/moe-language-cache")
    parser.add_argument("--out", default=".")
    parser.add_argument("--rows", default="resident,4GB,8GB,all,draft")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--mode", help="run tierstore rows in these modes only (e.g. auto), instead of each row's")
    parser.add_argument("--expert-budgets", default="32,64,none",
                        help="the draft row: speculation.expert_budget values tried in turn (missed experts a verify "
                             "pass moves per MoE layer, auto: pruned by worth, or none)")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--row", default="")
    args = parser.parse_args()
    if args.child:
        row = resident_row(args) if args.row == "resident" else tierstore_row(args)
        print("RESULT " + json.dumps(row), flush=True)
        return
    import torch

    from tierstore.probe import run_probe

    start = time.perf_counter()
    upcycle(args.gguf, args.model)
    print(f"upcycled model ready in {time.perf_counter() - start:.1f} s", flush=True)
    probe_path = os.path.join(args.cache, "probe.json")
    probe = json.load(open(probe_path)) if os.path.exists(probe_path) else \
        run_probe(args.cache, torch.device("cuda", 0), disk_nbytes=2**30)
    print("probe", json.dumps(probe), flush=True)
    os.makedirs(args.out, exist_ok=True)
    saved = os.path.join(args.out, "moe_language.json")
    results = json.load(open(saved)) if os.path.exists(saved) else {}
    with open(os.path.join(args.out, "moe_language_log.txt"), "a") as log:
        for row in args.rows.split(","):
            mode = ["--mode", args.mode] if args.mode and row != "resident" else []
            results[row] = run_child(["--row", row, "--gguf", args.gguf, "--model", args.model, "--cache", args.cache,
                                      "--tokens", str(args.tokens), "--out", args.out,
                                      "--expert-budgets", args.expert_budgets, *mode], log, script=__file__)
            with open(saved, "w") as handle:
                json.dump({**results, "probe": probe}, handle, indent=1)
            print(row, "done", flush=True)
    print_table(results, probe, torch.cuda.get_device_name(0))


def print_table(results: dict, probe: dict, card: str) -> None:
    """One line per row, mode and prompt: s/token against the resident step of the same prompt."""
    resident = results.get("resident", {}).get("prompts", {}).get("resident", [])
    plain = next(iter(results.get("4GB", {}).get("prompts", {}).values()), [])  # no draft at the draft's budget
    print(f"\ncard: {card}; link {probe['h2d_pinned_gbps']:.1f} GB/s pinned; CPU linear "
          f"{probe.get('cpu_linear_gbps', 0):.1f} GB/s at 1 token, {probe.get('cpu_linear_gbps_32', 0):.1f} at 32")
    print("| row | mode | prompt | s/token | x resident | x no draft (4GB row) | copied/pass | read in place/pass | "
          "CPU experts/pass | CPU tokens/expert | CPU GB/s | host work/layer call | slot hits | tokens/pass | "
          "verify pass s | draft s/pass | grown during passes: steps/pass (s/pass), carried trees | largest tree | "
          "pruned nodes/pass | most moved/layer | same tokens as resident | "
          "top-2 gap where it parts from the reference row |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        if name == "probe":
            continue
        if "error" in row:
            print(f"| {name} | error: {row['error']} |")
            continue
        for mode, prompts in row["prompts"].items():
            for number, got in enumerate(prompts):
                step = got.get("s_per_token") or got.get("decode_mean_s_per_token")
                base = resident[number]["decode_mean_s_per_token"] if number < len(resident) else None
                experts = got.get("experts") or {}
                spec = got.get("speculation") or {}
                same = "-" if number >= len(resident) else _same(got["tokens"], resident[number]["tokens"])
                copied = experts.get("h2d_bytes_per_pass")
                speedup = plain[number]["s_per_token"] / step if spec and number < len(plain) else None
                cells = [name, mode, number, f"{step:.4f}", fmt(base and step / base, "{:.2f}"),
                         fmt(speedup, "{:.2f}"),
                         fmt(copied and copied / 1e9, "{:.2f} GB"),
                         fmt(experts.get("mapped_bytes_per_pass") and experts["mapped_bytes_per_pass"] / 1e9,
                             "{:.2f} GB"),
                         fmt(experts.get("host_computed_per_pass"), "{:.1f}"),
                         fmt(experts.get("host_tokens_per_expert"), "{:.1f}"), fmt(experts.get("cpu_gbps"), "{:.1f}"),
                         fmt(experts.get("host_work_s_per_call"), "{:.2e}"),
                         fmt(got.get("slot_hit_rate"), "{:.1%}"), fmt(spec.get("tokens_per_pass"), "{:.1f}"),
                         fmt(spec.get("verify_pass_s"), "{:.3f}"),
                         fmt(spec.get("passes") and spec["draft_s"] / spec["passes"], "{:.3f}"),
                         _grown(spec, experts), fmt(spec.get("largest_tree"), "{}"),
                         fmt(spec.get("passes") and spec["pruned_nodes"] / spec["passes"], "{:.1f}"),
                         fmt(spec.get("most_missed_experts"), "{}"), same,
                         fmt((got.get("margin") or {}).get("top2_gap"), "{:.4f}")]
                print("| " + " | ".join(map(str, cells)) + " |")
    for name, row in results.items():
        if isinstance(row, dict) and row.get("host_check"):
            print(f"{name}: the CPU's experts after the run, same process, at the run's shape: {row['host_check']}")


def _grown(spec: dict, experts: dict) -> str:
    """A draft row's steps grown while the model verified (speculation.ahead), a pass: how many, the time the MoE
    layers' routing waits gave them, and the passes that started from such a tree."""
    passes = spec.get("passes")
    if not passes or not spec.get("ahead_steps"):
        return "-"
    return (f"{spec['ahead_steps'] / passes:.1f} ({experts.get('meanwhile_s', 0.0) / passes:.3f} s), "
            f"{spec['carried_trees']} of {passes}")


def _same(tokens: list[int], reference: list[int]) -> str:
    count = min(len(tokens), len(reference))
    parting = next((i for i in range(count) if tokens[i] != reference[i]), None)
    return f"all {count}" if parting is None else f"first {parting} of {count}"


if __name__ == "__main__":
    main()
