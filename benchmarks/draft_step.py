"""Where a model draft's step goes: the forward (a replayed CUDA graph), the candidates' read-back and heap, the
policy's choice, the tree's mask, on a SmolLM2-shaped draft (random weights, bf16; or `--draft`, e.g. the SmolLM2
GGUF, packed) on the GPU; the draft as it runs by default, then bound and compiled (`speculation.compile`), in one
process: the ratio of their steps is what compiling gains.

    python benchmarks/draft_step.py [--draft s.gguf] [--widths 8,16,32] [--compiled-only] [--node-caps 64,1024]
                                       [--attention auto,eager] [--draft-dtypes auto,float32]

Each phase is timed with the device synchronized at its ends, so the phases add up to a step; a step's own
time (unsynchronized phases, as the draft runs) is printed beside them.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import threading
import time

from common import word_tokenizer
from draft_phases import STEP_PHASES, draft_phases
from spec_rows import refuse

from tierstore.config import ATTENTION, DRAFT_DTYPES

WIDTHS = (8, 16)
NODE_CAPS = (64, 1024)


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tierstore

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", default=None, help="the draft (default: a SmolLM2-shaped random bf16 model)")
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="draft step widths, comma-separated")
    parser.add_argument("--compiled-only", action="store_true", help="only the compiled draft (no ratio)")
    parser.add_argument("--node-caps", default=",".join(map(str, NODE_CAPS)), help="tree node caps, comma-separated")
    parser.add_argument("--idle-ms", default="", help="also time steps after the device idled this long before "
                                                      "each tree, comma-separated ms (e.g. 150: a 7B verify pass)")
    parser.add_argument("--attention", default="auto", help="runtime.attention values to run, comma-separated "
                                                            "(auto, sdpa, eager, ...)")
    parser.add_argument("--draft-dtypes", default="auto", help="speculation.draft_dtype values to run, "
                                                              f"comma-separated ({', '.join(DRAFT_DTYPES)})")
    args = parser.parse_args()
    widths = _numbers(args.widths, "--widths", "step widths", "8,16,32")
    node_caps = _numbers(args.node_caps, "--node-caps", "node caps", "64,1024")
    idles = _numbers(args.idle_ms, "--idle-ms", "ms", "150", float, least=0) if args.idle_ms else []
    attentions = args.attention.split(",")
    if any(name not in ("auto", *ATTENTION) for name in attentions):
        refuse(f"--attention {args.attention!r}: comma-separated, each one of auto, {', '.join(ATTENTION)}")
    dtypes = args.draft_dtypes.split(",")
    if any(name not in DRAFT_DTYPES for name in dtypes):
        refuse(f"--draft-dtypes {args.draft_dtypes!r}: comma-separated, each one of {', '.join(DRAFT_DTYPES)}")
    path = args.draft or "/tmp/draft-shape"
    if args.draft is None and not os.path.exists(os.path.join(path, "config.json")):
        config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                             max_position_embeddings=8192)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        word_tokenizer(49152).save_pretrained(path)
    per_step: dict[tuple[str, str, int, int], dict[bool, float]] = collections.defaultdict(dict)
    for attention, dtype in itertools.product(attentions, dtypes):
        for compile in (True,) if args.compiled_only else (False, True):
            config = {"runtime": {"cache_dir": "/tmp/draft-cache", "attention": attention},
                      "speculation": {"compile": compile, "draft_dtype": dtype}}
            with tierstore.AutoModel.from_pretrained(path, budget=tierstore.Budget(vram="8GB", ram="8GB"),
                                                     config=config, draft=path) as model:  # drafting for itself
                print(f"attention {attention}, draft dtype {dtype}, compile {compile}: the draft takes "
                      f"{model.draft_cost.weights_bytes / 1e6:.1f} MB on the device", flush=True)
                for width in widths:
                    for nodes in node_caps:
                        per_step[(attention, dtype, width, nodes)][compile] = _step_ms(model.draft, width, nodes,
                                                                                       idles)
    for (attention, dtype, width, nodes), ms in per_step.items():
        plain = f"{ms[False]:.3f} ms a step, " if False in ms else ""
        ratio = f" ({ms[True] / ms[False]:.2f}x)" if False in ms else ""
        print(f"attention {attention}, draft dtype {dtype}, width {width}, node cap {nodes}: {plain}"
              f"compiled {ms[True]:.3f}{ratio}")


def _numbers(text: str, option: str, what: str, example: str, kind: type = int, least: float = 1) -> list:
    """A comma-separated list of `kind` numbers from `least`; refused in one line (exit 2) otherwise."""
    try:
        numbers = [kind(part) for part in text.split(",")]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < least:
        refuse(f"{option} {text!r}: comma-separated {what} from {least}, e.g. {example}")
    return numbers


def _step_ms(model, width: int, nodes: int, idles_ms: list[float]) -> float:
    """A draft step's ms as it runs, on `model` (a draft's TierstoreModel), after a warm-up (compile, graph
    recording); its synchronized phases printed, its ms after the device idled `idles_ms` before each tree (as it
    does while a streamed verify pass waits on the link), and its ms while host-to-device copies run beside it."""
    import torch

    from tierstore.inference.decoding import drafts
    from tierstore.inference.decoding.sampling import warp
    from tierstore.policies.speculation import TreePolicy

    start_s = time.perf_counter()
    vocab = model.model.config.get_text_config().vocab_size
    draft = drafts.ModelDraft(model, "shape", warp(None, None, None), vocab, width,
                              TreePolicy(max_nodes=nodes, fixed_steps=16))
    draft.reset(300)
    history = list(range(100, 140))

    def trees(count: int, idle_ms: float = 0.0) -> float:
        """ms a step over `count` trees, nothing accepted and no bonus, the device idle `idle_ms` before each."""
        steps, spent_s = draft.steps, draft.step_s
        for _ in range(count):
            if idle_ms:
                torch.cuda.synchronize()
                time.sleep(idle_ms / 1e3)
            history.append(7)
            draft.accepted(draft.propose(history, 32), [0], -1)
        return (draft.step_s - spent_s) / (draft.steps - steps) * 1e3

    with torch.no_grad():
        trees(3)  # warm: compiled, graph captured
        warm_s = time.perf_counter() - start_s
        per_step_ms = trees(5)
        with draft_phases() as passes:
            trees(5)
        idled = {idle: trees(5, idle) for idle in idles_ms}
        with _copying_to_device(model.device):
            copying_ms = trees(5) if torch.cuda.is_available() else None
        kernels = _kernels_per_forward(draft) if torch.cuda.is_available() else None
    steps = sum(record["steps"] for record in passes)
    phases = ", ".join(f"{name} {sum(r.get(name, 0.0) for r in passes) / steps * 1e3:.3f}"
                       for name in (*STEP_PHASES, "catch-up"))
    after_idle = "".join(f"; after {idle:g} ms idle {ms:.3f} ms a step" for idle, ms in idled.items())
    after_idle += f"; while host-to-device copies run {copying_ms:.3f} ms a step" if copying_ms else ""
    print(f"width {width}, node cap {nodes}, buffer {draft._kv.max_tokens} tokens, graphed {draft.graphed}, "
          f"compiled {draft.compiled} (warm-up {warm_s:.1f} s): {per_step_ms:.3f} ms a step as it runs; "
          f"synchronized phases (ms a step): {phases}; kernels a forward: {kernels}{after_idle}", flush=True)
    return per_step_ms


@contextlib.contextmanager
def _copying_to_device(device, nbytes: int = 512 * 2**20):
    """While the block runs, a thread copies a pinned buffer to the device over and over on a stream of its own,
    as a streamed target's store does while its draft steps (the copies of the next pass's layers)."""
    import torch

    if device.type != "cuda":
        yield
        return
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream, stop = torch.cuda.Stream(device), threading.Event()

    def copy() -> None:
        while not stop.is_set():
            with torch.cuda.stream(stream):
                target.copy_(source, non_blocking=True)
            stream.synchronize()

    worker = threading.Thread(target=copy, daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()


def _kernels_per_forward(draft) -> str:
    """The GPU kernels one replay of the draft's widest recorded forward launches (torch.profiler): their count,
    their summed device time and the three that take the most of it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    forward = draft._forwards[max(draft._forwards)] if draft._forwards else None
    if forward is None or forward.graph is None:
        return "none (not graphed)"
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward.graph.replay()
        torch.cuda.synchronize()
    kernels = [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = collections.defaultdict(float)
    for event in kernels:
        by_name[event.name[:60]] += event.time_range.elapsed_us() / 1e3
    top = sorted(by_name.items(), key=lambda item: -item[1])[:3]
    return (f"{len(kernels)}, {sum(by_name.values()):.3f} ms on the device (" +
            "; ".join(f"{name} {ms:.3f} ms" for name, ms in top) + ")")


if __name__ == "__main__":
    main()
