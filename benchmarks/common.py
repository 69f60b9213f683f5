"""What the benchmarks share: the random-weight 7B-shaped checkpoint and its prompts (bench_7b.py), real-language
targets made by inflating SmolLM2 (bench_speculation.py), one row per child process with its peak memory, the
page cache dropped, and the load generator of a running server (bench_serve.py). A library, not a benchmark."""
from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

HIDDEN, INTER, LAYERS, HEADS, VOCAB = 4096, 11008, 32, 32, 32000  # Llama-2-7B's shape
PROMPT_TOKENS = 32
WIDTH_FACTOR = 7  # SmolLM2 inflated: hidden 576 * 7 = 4032, 9 * 7 = 63 query and 3 * 7 = 21 key-value heads


def build_checkpoint(path: str, hidden: int = HIDDEN, inter: int = INTER, layers: int = LAYERS,
                     heads: int = HEADS) -> None:
    """Random fp16 weights, one safetensors shard per layer, written straight from the GPU (Llama-2-7B's shape
    unless told otherwise)."""
    HIDDEN, INTER, LAYERS, HEADS = hidden, inter, layers, heads  # noqa: N806
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    os.makedirs(path, exist_ok=True)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        write_tokenizer(path)
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                         max_position_embeddings=4096, dtype="float16", tie_word_embeddings=False)
    config.save_pretrained(path)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32) * scale).half().cpu()

    index: dict[str, str] = {}
    shards: list[tuple[str, dict[str, torch.Tensor]]] = [(f"model-00001-of-{LAYERS + 1:05d}.safetensors", {
        "model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": torch.ones(HIDDEN).half(),
        "lm_head.weight": rand(VOCAB, HIDDEN)})]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shards.append((f"model-{i + 2:05d}-of-{LAYERS + 1:05d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": rand(HIDDEN, HIDDEN),
            p + "self_attn.v_proj.weight": rand(HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": rand(INTER, HIDDEN), p + "mlp.up_proj.weight": rand(INTER, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, INTER),
            p + "input_layernorm.weight": torch.ones(HIDDEN).half(),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN).half()}))
    for name, tensors in shards:
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": index}, handle)


def write_tokenizer(path: str) -> None:
    """A word-level tokenizer over the 32000 ids (AirLLM loads one; the benchmark itself feeds token ids)."""
    word_tokenizer(VOCAB).save_pretrained(path)


def word_tokenizer(vocab: int):
    """A word-level tokenizer over `vocab` ids, "t0" to "t<vocab - 1>" (benchmarks feed token ids; a checkpoint or
    a layer store wants a tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", bos_token="t1", eos_token="t2")


def prompt_text() -> str:
    """The prompt the benchmarks that run the CLI or the server send: PROMPT_TOKENS words of the word tokenizer."""
    return " ".join(f"t{100 + i}" for i in range(PROMPT_TOKENS))


def prompt_ids(batch: int):
    import torch

    gen = torch.Generator().manual_seed(1)
    return torch.randint(100, VOCAB, (batch, PROMPT_TOKENS), generator=gen)


class StepClock:
    """Each token's time: as a logits processor (`generate(logits_processor=[clock])`, which keeps generate eager),
    or as a streamer (`generate(streamer=clock)`, which graphed decoding keeps; its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.calls: list[float] = []
        self._prompt_seen = False

    def __call__(self, input_ids, scores):
        self.calls.append(time.perf_counter())
        return scores

    def put(self, value) -> None:
        if self._prompt_seen:
            self.calls.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass

    def summary(self) -> dict:
        """Prefill = time to the first token; decode = median step (the first steps carry one-off costs)."""
        steps = sorted(b - a for a, b in zip(self.calls, self.calls[1:]))
        return {"prefill_s": self.calls[0] - self.start, "decode_s_per_token": steps[len(steps) // 2],
                "decode_mean_s_per_token": sum(steps) / len(steps), "decode_steps": len(steps)}


TOKEN_MARK = "bench.token"


class _TokenMarks:
    """A streamer that marks each token on the profiler's timeline (its first `put` is the prompt)."""

    def put(self, value) -> None:
        import torch

        with torch.profiler.record_function(TOKEN_MARK):
            pass

    def end(self) -> None:
        pass


def profile_steps(generate, trace_path: str) -> dict:
    """Where a GPU's time goes in the decode steps of `generate(streamer)` (one generate call), from torch's
    profiler: per step, the span from one token to the next, the time some kernel ran (the union of kernel
    intervals), the time some host-to-device copy ran and how much of it no kernel overlapped, the idle time (span
    minus kernel time); and the kernels that took most. A token's mark comes after its logits reached the host,
    when the GPU has caught up, so the kernels after the first token's mark are the decode steps'. The Chrome trace
    is kept at `trace_path` + ".gz"."""
    import gzip

    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(_TokenMarks())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    prof.export_chrome_trace(trace_path)
    with open(trace_path) as handle:
        events = json.load(handle)["traceEvents"]
    with open(trace_path, "rb") as src, gzip.open(trace_path + ".gz", "wb") as dst:
        dst.write(src.read())
    os.remove(trace_path)
    marks = sorted(e["ts"] for e in events if e.get("name") == TOKEN_MARK)
    first, last = marks[1], marks[-1]  # the first token (prefill's end) to the last
    steps = len(marks) - 2

    def within(category: str, word: str = "") -> list[tuple[float, float, str]]:
        return [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == category
                and first <= e["ts"] < last and word in e.get("name", "")]

    kernels = within("kernel")
    busy = _union([(a, b) for a, b, _ in kernels])
    copied = _union([(a, b) for a, b, _ in within("gpu_memcpy", "HtoD")])
    kernel_us, copy_us = sum(b - a for a, b in busy), sum(b - a for a, b in copied)
    by_name: dict[str, list[float]] = {}
    for a, b, name in kernels:
        entry = by_name.setdefault(name[:90], [0, 0.0])
        entry[0] += 1
        entry[1] += b - a
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:14]
    per = 1e3 * steps  # microseconds in all -> ms a step
    return {"steps": steps, "span_ms": (last - first) / per, "kernel_ms": kernel_us / per,
            "idle_ms": (last - first - kernel_us) / per, "h2d_ms": copy_us / per,
            "h2d_not_overlapped_ms": (copy_us - _overlap(copied, busy)) / per,
            "kernels_per_step": len(kernels) / steps,
            "top": [[name, count / steps, total / per] for name, (count, total) in top]}


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _overlap(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> float:
    """Time covered by both of two sorted, disjoint interval lists."""
    total, j = 0.0, 0
    for a, b in first:
        while j < len(second) and second[j][1] <= a:
            j += 1
        k = j
        while k < len(second) and second[k][0] < b:
            total += max(0.0, min(b, second[k][1]) - max(a, second[k][0]))
            k += 1
    return total


def vm_hwm_bytes() -> int:
    """This process's peak RSS. (wait4's ru_maxrss would inherit the parent's peak across fork and exec.)"""
    return _status_bytes("VmHWM")


def vm_rss_bytes() -> int:
    """This process's RSS now."""
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field + ":"))


def run_child(argv: list[str], log, script: str) -> dict:
    """Run `script --child argv` (one row, one process), its output into `log`; its RESULT line as a dict."""
    proc = subprocess.Popen([sys.executable, script, "--child", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        log.write(line)
    status = proc.wait()
    result = next((json.loads(line[7:]) for line in lines if line.startswith("RESULT ")), None)
    if result is None:
        return {"error": "".join(lines[-5:]).strip().splitlines()[-1] if lines else f"exit {status}"}
    return result


def prepare(out: str, cache: str, build) -> dict:
    """The output folder, the checkpoint (`build()`, timed) and the links measured by tierstore's probe."""
    import torch

    from tierstore.probe import run_probe

    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    build()
    print(f"checkpoint ready in {time.perf_counter() - start:.1f}s", flush=True)
    probe = run_probe(cache, torch.device("cuda", 0), disk_nbytes=2 * 2**30)
    print("probe", json.dumps(probe), flush=True)
    return probe


def drop_page_cache() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError as exc:
        print(f"could not drop the page cache: {exc}")


QUESTION = "Explain how a refrigerator keeps food cold, step by step."


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
            reference: list[int] | None = None, warm_tokens: int = 8) -> dict:
    """One model object: a warm-up call of `warm_tokens`, then the measured call. Where the tokens leave
    `reference` (the no-draft run), the margin between the model's two best logits there, from one plain forward."""
    import torch

    import tierstore

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tierstore.AutoModel.from_pretrained(target, budget=budget, config=config, draft=draft) as model:
        ids = encode(model.tokenizer, prompt)
        model.generate(ids, max_new_tokens=warm_tokens, do_sample=False)
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
            "acceptance_by_depth": spec.get("acceptance_by_depth"),
            "draft_step_s": spec.get("draft_step_s"), "draft_s": spec.get("draft_s"),
            "verify_pass_s": spec.get("verify_pass_s"), "tree_nodes": spec.get("tree_nodes"),
            "largest_tree": spec.get("largest_tree"), "ahead_steps": spec.get("ahead_steps"),
            "carried_trees": spec.get("carried_trees"),
            "passes": spec.get("passes"), "peak_vram": torch.cuda.max_memory_allocated() if cuda else None,
            "device_resident": len(plan.device_resident), "notes": report["notes"] + list(plan.notes),
            "graphed": spec.get("graphed"), "verify_graphed": spec.get("verify_graphed"),
            "decode_graphed": timing.get("graphed")}


def fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


PROMPTS = ["Tell me about the sea.", "What is the capital of France?", "Write a haiku about autumn.",
           "Explain gravity in one sentence.", "List three colors.", "What is 12 times 12?",
           "Describe a cat.", "Why is the sky blue?"]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      chat: bool) -> dict:
    """One streamed completion (chat, or text for a model without a chat template): its latency, time to first
    token, and completion tokens."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{url}/{'chat/completions' if chat else 'completions'}", json=body) as response:
        if response.status_code != 200:
            return {"status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 500}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and (chunk["choices"][0]["delta"].get("content") if chat
                                                         else chunk["choices"][0]["text"]):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"status": 200, "latency_s": end - start, "first_s": first - start, "tokens": tokens,
            "per_token_s": (end - first) / max(tokens - 1, 1)}


async def load(url: str, model: str, requests: int, concurrency: int, max_tokens: int, api_key: str | None,
               time_limit_s: float, chat: bool = True, prompts: list[str] = PROMPTS) -> dict:
    """`requests` requests, `concurrency` at a time; raises TimeoutError past `time_limit_s`."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency)

    async def run(index: int, client: httpx.AsyncClient) -> dict:
        async with gate:
            return await one_request(client, url, model, prompts[index % len(prompts)], max_tokens, chat)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=time_limit_s, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(run(i, client) for i in range(requests))), time_limit_s)
        wall_s = time.perf_counter() - start
    done = [r for r in results if r["status"] == 200]
    latency = sorted(r["latency_s"] for r in done)
    per_token = sorted(r["per_token_s"] for r in done)
    tokens = sum(r["tokens"] for r in done)
    return {"requests": requests, "concurrency": concurrency, "ok": len(done),
            "failed": len(results) - len(done), "wall_s": wall_s, "requests_per_s": len(done) / wall_s,
            "tokens": tokens, "tokens_per_s": tokens / wall_s,
            "latency_p50_s": _percentile(latency, 50), "latency_p99_s": _percentile(latency, 99),
            "per_token_p50_s": _percentile(per_token, 50), "per_token_p99_s": _percentile(per_token, 99)}


def _percentile(values: list[float], percent: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(percent) - 1]


def measure_swapped(logprobs, reference, parts, weights, originals, approximate) -> tuple[dict, float, float]:
    """The quality scripts' harness (quality_hqq.py, quality_bound.py): each matrix of `originals` (name -> tensor)
    swapped for `approximate(name, tensor)` in `weights` (name -> the model's parameter), the model measured as
    `tierstore eval` measures it (`logprobs()`: its log-probabilities per window of `parts`, against `reference`),
    and the matrices put back. Returns the agreement summary, the relative squared weight error and the seconds
    spent approximating."""
    from tierstore.inference.front.quality import Agreement

    start_s, error, norm = time.perf_counter(), 0.0, 0.0
    for name, weight in originals.items():
        approximated = approximate(name, weight).float()
        error += float((approximated - weight).square().sum())
        norm += float(weight.square().sum())
        weights[name].copy_(approximated)
    spent_s = time.perf_counter() - start_s
    try:
        agreement = Agreement()
        for expected, got, part in zip(reference, logprobs(), parts):
            agreement.add(expected, got, part[1:])
    finally:
        for name, weight in originals.items():
            weights[name].copy_(weight)
    return agreement.summary(), error / norm, spent_s
