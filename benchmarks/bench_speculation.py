"""Speculative decoding on a 7B-byte-cost model with real language: tokens/s against no draft, at vram 4 GB /
ram 16 GB, one process.

The target is SmolLM2-135M-Instruct inflated without changing its function: hidden 576 -> 4032 (63 query and 21
key-value heads of 64, the 9/3 original heads first so each keeps its key-value group), intermediate 1536 -> 11008,
all padding zero; every RMSNorm weight times sqrt(576/4032) and its eps times 576/4032, so each norm's output on
the original dimensions is unchanged. Written as bf16 safetensors (about 11 GB), read in place.

Drafts: SmolLM2 itself as nf4 and int8 layer stores (tierstore convert --compress), the GGUF as is (the upper
bound: the same function as the target), and ngram on a prompt that asks to rewrite a paragraph.

    python benchmarks/bench_speculation.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/spec --out $OUT

Every row is one generate call after a warm-up call on the same model object; tokens are compared with the
no-draft row of the same prompt.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

WIDTH_FACTOR, INTER = 7, 11008  # hidden 576 * 7 = 4032, 9 * 7 = 63 query and 3 * 7 = 21 key-value heads
QUESTION = "Explain how a refrigerator keeps food cold, step by step."
REWRITE = ("Rewrite the following paragraph in the same words, only fixing the spelling: The old lighthouse "
           "stood on the rocky cape for more then a hundred years. Every night its keeper climbed the narrow "
           "stairs, lit the great lamp, and watched the ships pass safely threw the dark water. When the storms "
           "came, the light never failed, and the sailors new they were close to home.")


class Inflation:
    """SmolLM2 made wider (hidden and heads times `factor`, the MLP `inter_size` wide) and optionally deeper
    (`layers`, the ones past SmolLM2's all zero, so each passes its input through) without changing its function:
    padding is zero, and each RMSNorm weight is scaled so that its output on the original dimensions is unchanged.
    `config` is the inflated model's; `tensor(name, device)` one of its bf16 tensors, padded on `device`."""

    def __init__(self, gguf: str, factor: int = WIDTH_FACTOR, inter_size: int = INTER, layers: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory, name = os.path.dirname(gguf), os.path.basename(gguf)
        small = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        self.state = small.state_dict()
        config = small.config
        self.small_layers, self.head_dim, h = config.num_hidden_layers, config.head_dim, config.hidden_size
        assert inter_size >= config.intermediate_size
        self.hidden, self.heads, self.kv_heads = h * factor, config.num_attention_heads * factor, \
            config.num_key_value_heads * factor
        self.inter, self.scale = inter_size, math.sqrt(h / self.hidden)
        config.update(dict(hidden_size=self.hidden, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                           head_dim=self.head_dim, intermediate_size=inter_size, dtype="bfloat16",
                           rms_norm_eps=config.rms_norm_eps * h / self.hidden, tie_word_embeddings=True,
                           num_hidden_layers=layers or self.small_layers))
        config.architectures = ["LlamaForCausalLM"]
        self.config = config

    def names(self) -> list[list[str]]:
        """The tensors' names, grouped as the shards `inflate` writes: embedding and final norm, then each layer."""
        layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
        return [["model.embed_tokens.weight", "model.norm.weight"]] + [
            [f"model.layers.{i}.{part}.weight" for part in layer] for i in range(self.config.num_hidden_layers)]

    def tensor(self, name: str, device="cpu"):
        import torch

        part = name.split(".")[-2]
        q_rows, kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shape = {"embed_tokens": (self.config.vocab_size, self.hidden), "q_proj": (q_rows, self.hidden),
                 "k_proj": (kv_rows, self.hidden), "v_proj": (kv_rows, self.hidden), "o_proj": (self.hidden, q_rows),
                 "gate_proj": (self.inter, self.hidden), "up_proj": (self.inter, self.hidden),
                 "down_proj": (self.hidden, self.inter)}.get(part, (self.hidden,))
        out = torch.zeros(shape, dtype=torch.bfloat16, device=device)
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= self.small_layers:
            return out  # a layer past SmolLM2's: zero, its input passes through
        small = self.state[name].to(device)
        out[tuple(slice(0, size) for size in small.shape)] = small * self.scale if part.endswith("norm") else small
        return out


def inflate(gguf: str, out_dir: str, factor: int = WIDTH_FACTOR, inter_size: int = INTER) -> None:
    """The inflated SmolLM2 (see Inflation) as bf16 safetensors, config and tokenizer; kept when already there."""
    from safetensors.torch import save_file

    if os.path.exists(os.path.join(out_dir, "config.json")):
        return
    os.makedirs(out_dir, exist_ok=True)
    inflation = Inflation(gguf, factor, inter_size)
    inflation.tokenizer.save_pretrained(out_dir)
    shards = inflation.names()
    index = {}
    for number, names in enumerate(shards):
        file = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: inflation.tensor(name) for name in names}, os.path.join(out_dir, file),
                  metadata={"format": "pt"})
        index.update({name: file for name in names})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": index}, handle)
    inflation.config.save_pretrained(out_dir)


def first_difference(tokens: list[int], reference: list[int]) -> int | None:
    """The first position where two runs' tokens differ; None when they agree as far as both go."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)


def encode(tokenizer, prompt: str):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def run_row(target: str, draft: str | None, prompt: str, new_tokens: int, budget, config,
            reference: list[int] | None = None) -> dict:
    """One model object: a warm-up call, then the measured call. Where the tokens leave `reference` (the
    no-draft run), the margin between the model's two best logits there, from one plain forward."""
    import torch

    import tierstore

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tierstore.AutoModel.from_pretrained(target, budget=budget, config=config, draft=draft) as model:
        ids = encode(model.tokenizer, prompt)
        model.generate(ids, max_new_tokens=8, do_sample=False)
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        report = model.report().to_dict()
        plan = model.plan
        tokens = out[0, ids.shape[1]:].tolist()
        parting = first_difference(tokens, reference or tokens)
        margin = None
        if parting is not None:
            prefix = torch.tensor([ids[0].tolist() + reference[:parting]], device=model.device)
            logits = model(prefix).logits[0, -1].float()
            top = logits.topk(2).values.tolist()
            margin = top[0] - top[1]
    timing, spec = report["timing"], report["speculation"] or {}
    return {"draft": draft or "none", "tokens": tokens, "first_difference": parting,
            "top2_logit_margin_there": margin,
            "tokens_per_s": timing["decode_tokens_per_s"], "pass_s": timing["decode_step_s"],
            "predicted_pass_s": timing["predicted_step_s"], "new_tokens": timing["new_tokens"],
            "tokens_per_pass": spec.get("tokens_per_pass"), "acceptance": spec.get("acceptance_rate"),
            "draft_step_s": spec.get("draft_step_s"), "draft_s": spec.get("draft_s"),
            "verify_pass_s": spec.get("verify_pass_s"), "tree_nodes": spec.get("tree_nodes"),
            "passes": spec.get("passes"), "peak_vram": torch.cuda.max_memory_allocated() if cuda else None,
            "device_resident": len(plan.device_resident), "notes": report["notes"] + list(plan.notes),
            "graphed": spec.get("graphed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--work", default="/tmp/spec")
    parser.add_argument("--out", default=".")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--only", help="comma-separated drafts to run (none,nf4,int8,bf16,ngram)")
    parser.add_argument("--factor", type=int, default=WIDTH_FACTOR, help="width multiple of the target")
    parser.add_argument("--inter", type=int, default=INTER, help="MLP width of the target")
    args = parser.parse_args()
    import torch

    import tierstore
    from tierstore.inference.loading.convert import compress_model
    from tierstore.probe import run_probe

    config = {"runtime": {"cache_dir": os.path.join(args.work, "cache")}}
    budget = tierstore.Budget(vram="4GB", ram="16GB")
    target = os.path.join(args.work, "target")
    start = time.perf_counter()
    inflate(args.gguf, target, args.factor, args.inter)
    print(f"target built in {time.perf_counter() - start:.1f} s", flush=True)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    run_probe(config["runtime"]["cache_dir"], device)
    drafts = {"bf16": args.gguf}
    for fmt in ("nf4", "int8"):
        drafts[fmt] = os.path.join(args.work, f"draft-{fmt}")
        if not os.path.exists(os.path.join(drafts[fmt], "manifest.json")):
            compress_model(args.gguf, drafts[fmt], fmt, dtype=torch.bfloat16, config=config, progress=False)
    wanted = (args.only or "none,nf4,int8,bf16,ngram").split(",")
    rows = []
    for name in wanted:
        prompt = REWRITE if name == "ngram" else QUESTION
        if name == "ngram":
            rows.append(("none (rewrite)", run_row(target, None, prompt, args.new_tokens, budget, config)))
        base = next((row for kind, row in rows if kind == ("none (rewrite)" if name == "ngram" else "none")), None)
        row = run_row(target, "ngram" if name == "ngram" else (drafts.get(name) if name != "none" else None),
                      prompt, args.new_tokens, budget, config, base["tokens"] if base else None)
        rows.append((name, row))
        print(json.dumps({name: {k: v for k, v in row.items() if k != "tokens"}}), flush=True)
    with open(os.path.join(args.out, "speculation.json"), "w") as handle:
        json.dump({name: row for name, row in rows}, handle, indent=1)
    baseline = {prompt_kind: row for prompt_kind, row in rows if prompt_kind.startswith("none")}
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"\ncard: {card}; target {target}: vram 4GB / ram 16GB; greedy, "
          f"{args.new_tokens} new tokens")
    header = ("draft", "tokens/s", "x no draft", "tokens/pass", "accept", "draft step s", "verify pass s",
              "pass s", "predicted", "same tokens", "graphed")
    print(" | ".join(header))
    for name, row in rows:
        base = baseline["none (rewrite)"] if name in ("ngram", "none (rewrite)") else baseline.get("none")
        speedup = row["tokens_per_s"] / base["tokens_per_s"] if base and base["tokens_per_s"] else None
        same = row["tokens"] == base["tokens"] if base else None
        cells = [name, f"{row['tokens_per_s']:.2f}", f"{speedup:.2f}" if speedup else "-",
                 _f(row["tokens_per_pass"], "{:.2f}"), _f(row["acceptance"], "{:.2f}"),
                 _f(row["draft_step_s"], "{:.4f}"), _f(row["verify_pass_s"], "{:.4f}"), _f(row["pass_s"], "{:.4f}"),
                 _f(row["predicted_pass_s"], "{:.4f}"),
                 str(same) if same or row["first_difference"] is None else
                 f"from token {row['first_difference']} (top-2 margin {row['top2_logit_margin_there']:.3f})",
                 str(row["graphed"])]
        print(" | ".join(cells))


def _f(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


if __name__ == "__main__":
    main()
